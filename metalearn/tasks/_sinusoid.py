"""Sinusoid regression task family (Finn et al., 2017)."""

import functools
import math

import jax
import jax.numpy as jnp

from metalearn.tasks._episodes import TaskSampler
from metalearn.types import Episode


def sample_sinusoid(
    key: jax.Array,
    data: None = None,
    *,
    num_shots: int,
    num_queries: int,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> Episode:
  """Draws one sinusoid regression task ``y = A sin(x - phi)``.

  Amplitude, phase and inputs are uniform on their ranges, as in Finn et al.
  Support and query inputs are drawn independently.

  Args:
    key: a PRNG key.
    data: unused; present so the signature matches other samplers.
    num_shots: number of support points ``K``.
    num_queries: number of query points.
    amplitude: range of ``A``.
    phase: range of ``phi``.
    x_range: range of the inputs.

  Returns:
    An :class:`Episode` with ``support_x, support_y [K, 1]`` and
    ``query_x, query_y [num_queries, 1]``, all float32.

  References:
    Finn, Abbeel & Levine, `Model-Agnostic Meta-Learning for Fast Adaptation
    of Deep Networks <https://arxiv.org/abs/1703.03400>`_, 2017.
  """
  del data
  ka, kp, ks, kq = jax.random.split(key, 4)
  amp = jax.random.uniform(ka, (), minval=amplitude[0], maxval=amplitude[1])
  phi = jax.random.uniform(kp, (), minval=phase[0], maxval=phase[1])

  def points(k, n):
    x = jax.random.uniform(
        k, (n, 1), minval=x_range[0], maxval=x_range[1]
    )
    return x, amp * jnp.sin(x - phi)

  support_x, support_y = points(ks, num_shots)
  query_x, query_y = points(kq, num_queries)
  return Episode(support_x, support_y, query_x, query_y)


def sinusoid_sampler(
    *,
    num_shots: int = 10,
    num_queries: int = 10,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> TaskSampler:
  """Builds a :class:`TaskSampler` of sinusoid regression tasks.

  Args:
    num_shots: support points per task (Finn et al.: 5, 10 or 20).
    num_queries: query points per task.
    amplitude: range of the amplitude.
    phase: range of the phase.
    x_range: range of the inputs.

  Returns:
    A sampler whose data is ``None``.

  Examples:
    >>> import jax
    >>> s = sinusoid_sampler(num_shots=5, num_queries=10)
    >>> s.sample(jax.random.key(0), s.data).support_x.shape
    (5, 1)
  """
  if num_shots < 1 or num_queries < 1:
    raise ValueError(
        f"num_shots and num_queries must be >= 1, got {num_shots}, "
        f"{num_queries}"
    )
  for name, (lo, hi) in (
      ("amplitude", amplitude), ("phase", phase), ("x_range", x_range)
  ):
    if not lo <= hi:
      raise ValueError(f"{name} range must be (low, high), got {(lo, hi)}")
  sample = functools.partial(
      sample_sinusoid,
      num_shots=num_shots,
      num_queries=num_queries,
      amplitude=tuple(amplitude),
      phase=tuple(phase),
      x_range=tuple(x_range),
  )
  return TaskSampler(sample=sample, data=None)
