"""The sinusoid regression family: y = A sin(x - phi) (Finn et al., 2017)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.tasks import sample_batch, sinusoid_sampler


@functools.cache
def _jitted_batch(batch_size, **kwargs):
  """One compiled batch sampler per configuration, shared by the tests."""
  sampler = sinusoid_sampler(**kwargs)
  return jax.jit(lambda key: sample_batch(sampler, key, batch_size))


def _batch(key, batch_size, **kwargs):
  return _jitted_batch(batch_size, **kwargs)(key)


def _fit(x, y):
  """Least squares of y on [sin x, cos x]: returns (A, phi, coefficients).

  ``A sin(x - phi) = A cos(phi) sin x - A sin(phi) cos x``.
  """
  x = np.asarray(x, np.float64)[:, 0]
  y = np.asarray(y, np.float64)[:, 0]
  design = np.stack([np.sin(x), np.cos(x)], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
  return math.hypot(a, b), math.atan2(-b, a), (a, b)


@pytest.mark.parametrize(
    "num_shots,num_queries",
    [
        pytest.param(5, 10, id="5shot"),
        pytest.param(10, 10, id="10shot"),
        pytest.param(20, 7, id="20shot"),
    ],
)
def test_shapes_and_dtypes(num_shots, num_queries):
  dims = chex.Dimensions(B=32, K=num_shots, Q=num_queries, F=1)
  eps = _batch(
      jax.random.key(0), 32, num_shots=num_shots, num_queries=num_queries
  )
  chex.assert_shape([eps.support_x, eps.support_y], dims["BKF"])
  chex.assert_shape([eps.query_x, eps.query_y], dims["BQF"])
  chex.assert_type(list(eps), jnp.float32)


RANGES = [
    pytest.param({}, id="finn-defaults"),
    pytest.param(
        dict(amplitude=(2.0, 3.0), phase=(0.5, 1.0), x_range=(0.0, 2.0)),
        id="narrow",
    ),
]


@pytest.mark.parametrize("ranges", RANGES)
def test_ranges(ranges):
  amplitude = ranges.get("amplitude", (0.1, 5.0))
  phase = ranges.get("phase", (0.0, math.pi))
  x_range = ranges.get("x_range", (-5.0, 5.0))
  eps = _batch(jax.random.key(1), 32, num_shots=10, num_queries=10, **ranges)
  eps = jax.tree.map(np.asarray, eps)
  for x, y in ((eps.support_x, eps.support_y), (eps.query_x, eps.query_y)):
    assert x.min() >= x_range[0] and x.max() <= x_range[1]
    # |A sin(.)| <= A <= the top of the amplitude range.
    assert np.abs(y).max() <= amplitude[1] + 1e-5
  fits = [_fit(eps.support_x[t], eps.support_y[t]) for t in range(32)]
  amps = np.array([f[0] for f in fits])
  phis = np.array([f[1] for f in fits])
  assert (amps >= amplitude[0] - 1e-4).all()
  assert (amps <= amplitude[1] + 1e-4).all()
  assert (phis >= phase[0] - 1e-4).all() and (phis <= phase[1] + 1e-4).all()
  # Spread over the range, not a constant.
  assert amps.max() - amps.min() > 0.5 * (amplitude[1] - amplitude[0])


def test_support_and_query_share_one_sinusoid():
  eps = _batch(jax.random.key(3), 32, num_shots=5, num_queries=10)
  eps = jax.tree.map(np.asarray, eps)
  for t in range(32):
    amp, phi, (a, b) = _fit(eps.support_x[t], eps.support_y[t])
    # The support points lie exactly on the fitted sinusoid...
    np.testing.assert_allclose(
        amp * np.sin(np.asarray(eps.support_x[t], np.float64) - phi),
        eps.support_y[t],
        atol=1e-4 * max(amp, 1.0),
    )
    # ...and so do the query points, drawn at independent inputs.
    qx = np.asarray(eps.query_x[t], np.float64)
    np.testing.assert_allclose(
        a * np.sin(qx) + b * np.cos(qx),
        eps.query_y[t],
        atol=1e-4 * max(amp, 1.0),
    )
  # Different tasks are different sinusoids.
  fits = [_fit(eps.support_x[t], eps.support_y[t])[:2] for t in range(32)]
  assert len({(round(a, 4), round(p, 4)) for a, p in fits}) == 32


def test_same_key_same_task():
  sampler = sinusoid_sampler(num_shots=5, num_queries=7)
  sample = jax.jit(sampler.sample)
  first = sample(jax.random.key(5), sampler.data)
  chex.assert_shape([first.support_x, first.support_y], (5, 1))
  chex.assert_shape([first.query_x, first.query_y], (7, 1))
  chex.assert_trees_all_equal(first, sample(jax.random.key(5), sampler.data))
  other = sample(jax.random.key(6), sampler.data)
  assert not np.array_equal(first.support_y, other.support_y)
  # Support and query inputs are drawn independently.
  assert not np.array_equal(first.support_x[:5], first.query_x[:5])


def test_no_retrace_across_steps():
  sampler = sinusoid_sampler(num_shots=5, num_queries=5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(key):
    return sample_batch(sampler, key, 8).query_y.sum()

  chex.clear_trace_counter()
  for seed in range(3):
    step(jax.random.key(seed)).block_until_ready()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param(
            dict(amplitude=(5.0, 0.1)),
            r"amplitude range must be \(low, high\), got \(5\.0, 0\.1\)",
            id="amplitude-reversed",
        ),
        pytest.param(
            dict(phase=(1.0, 0.0)),
            r"phase range must be \(low, high\)",
            id="phase-reversed",
        ),
        pytest.param(
            dict(x_range=(5.0, -5.0)),
            r"x_range range must be \(low, high\)",
            id="x-range-reversed",
        ),
        pytest.param(
            dict(num_shots=0),
            r"num_shots and num_queries must be >= 1, got 0, 10",
            id="zero-shots",
        ),
        pytest.param(
            dict(num_queries=-1),
            r"num_shots and num_queries must be >= 1, got 10, -1",
            id="negative-queries",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sinusoid_sampler(**kwargs)
