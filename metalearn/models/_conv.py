"""A 2-D convolution whose derivatives of every order stay canonical.

XLA:CPU runs a convolution fast when its operands are in the canonical
``NHWC``/``HWIO`` form. JAX's own transpose rule for the weight gradient
instead relabels dimensions (batch becomes feature), and inside a
``while`` loop (``lax.scan`` over tasks) XLA:CPU runs that relabelled
convolution tens of times slower (``benchmarks/README.md`` has the
figures). :func:`conv2d` is the same function as
``lax.conv_general_dilated`` but its VJP computes both gradients as
canonical convolutions of explicitly transposed arrays, by calling itself,
so gradients of gradients (second-order MAML) are canonical too.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


def _dilated(size: int, dilation: int) -> int:
  return 0 if size == 0 else 1 + dilation * (size - 1)


def _explicit_padding(padding, in_hw, k_hw, strides, lhs_dil, rhs_dil):
  if not isinstance(padding, str):
    return tuple(tuple(int(v) for v in p) for p in padding)
  return tuple(
      tuple(int(v) for v in p)
      for p in jax.lax.padtype_to_pads(
          [_dilated(s, d) for s, d in zip(in_hw, lhs_dil, strict=True)],
          [_dilated(k, d) for k, d in zip(k_hw, rhs_dil, strict=True)],
          strides,
          padding,
      )
  )


def _geometry(x, w, strides, padding, lhs_dil, rhs_dil):
  in_hw, k_hw = x.shape[1:3], w.shape[:2]
  pads = _explicit_padding(padding, in_hw, k_hw, strides, lhs_dil, rhs_dil)
  return in_hw, k_hw, pads


def _kernel_outgrows_input(x, w, strides, lhs_dil, rhs_dil) -> bool:
  """Whether the (dilated) kernel is larger than the (dilated) input in
  every spatial dimension, for a stride-1 convolution.

  Second-order terms produce such convolutions (a cotangent the size of an
  activation map acting as the kernel of a 3x3 output). XLA's algebraic
  simplifier swaps their operands, which leaves a window reversal and
  relabelled dimensions that XLA:CPU runs several times slower than a
  canonical convolution; :func:`_swapped` does the swap canonically.
  """
  return all(s == 1 for s in strides) and all(
      _dilated(w.shape[i], rhs_dil[i]) > _dilated(x.shape[1 + i], lhs_dil[i])
      for i in range(2)
  )


def _swapped(x, w, padding, lhs_dil, rhs_dil):
  """A stride-1 convolution computed with its operands' roles exchanged.

  With ``L`` the padded, ``lhs_dil``-dilated input and ``R`` the
  ``rhs_dil``-dilated kernel, ``out[y] = sum_k L[y + k] R[k]``. Reading
  ``x`` as the kernel (dilated by ``lhs_dil``) and ``w`` as the input
  (dilated by ``rhs_dil``) gives the same sums in reverse order of ``y``;
  the reversal is an explicit flip of the output rather than a window
  reversal, so the convolution stays canonical.
  """
  in_hw, k_hw = x.shape[1:3], w.shape[:2]
  pads = []
  for i in range(2):
    size = (_dilated(in_hw[i], lhs_dil[i]) + padding[i][0] + padding[i][1]
            - _dilated(k_hw[i], rhs_dil[i]) + 1)
    pads.append((size - 1 - padding[i][0], size - 1 - padding[i][1]))
  out = jax.lax.conv_general_dilated(
      jnp.transpose(w, (3, 0, 1, 2)),  # [O, KH, KW, C]: O as the batch.
      jnp.transpose(x, (1, 2, 3, 0)),  # [H, W, C, N]: N as the outputs.
      (1, 1),
      tuple(pads),
      lhs_dilation=rhs_dil,
      rhs_dilation=lhs_dil,
      dimension_numbers=_DN,
  )
  return jnp.transpose(out[:, ::-1, ::-1, :], (3, 1, 2, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, lhs_dil, rhs_dil):
  if _kernel_outgrows_input(x, w, strides, lhs_dil, rhs_dil):
    return _swapped(x, w, padding, lhs_dil, rhs_dil)
  return jax.lax.conv_general_dilated(
      x,
      w,
      strides,
      padding,
      lhs_dilation=lhs_dil,
      rhs_dilation=rhs_dil,
      dimension_numbers=_DN,
  )


def _conv_fwd(x, w, strides, padding, lhs_dil, rhs_dil):
  return _conv(x, w, strides, padding, lhs_dil, rhs_dil), (x, w)


def _conv_bwd(strides, padding, lhs_dil, rhs_dil, res, g):
  x, w = res
  in_hw, k_hw, pads = _geometry(x, w, strides, padding, lhs_dil, rhs_dil)
  out_hw = g.shape[1:3]
  # Input gradient: a correlation of the stride-dilated cotangent with the
  # spatially reversed kernel whose in/out channels are swapped.
  lhs_pads = []
  for i in range(2):
    k = _dilated(k_hw[i], rhs_dil[i])
    before = k - pads[i][0] - 1
    after = (
        _dilated(in_hw[i], lhs_dil[i]) + k - 1
        - _dilated(out_hw[i], strides[i]) - before
    )
    lhs_pads.append((before, after))
  w_t = jnp.swapaxes(w[::-1, ::-1], 2, 3)
  dx = _conv(g, w_t, lhs_dil, tuple(lhs_pads), strides, rhs_dil)
  # Weight gradient: channels of x act as the batch, the batch of x as the
  # input features, and the cotangent as a (dilated) kernel.
  rhs_pads = []
  for i in range(2):
    k = _dilated(k_hw[i], rhs_dil[i])
    after = (
        _dilated(out_hw[i], strides[i]) - _dilated(in_hw[i], lhs_dil[i])
        + k - pads[i][0] - 1
    )
    rhs_pads.append((pads[i][0], after))
  dw = _conv(
      jnp.transpose(x, (3, 1, 2, 0)),
      jnp.transpose(g, (1, 2, 0, 3)),
      rhs_dil,
      tuple(rhs_pads),
      lhs_dil,
      strides,
  )
  dw = jnp.transpose(dw, (1, 2, 0, 3))
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    window_strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
  """``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels.

  Same values as ``jax.lax.conv_general_dilated`` and the same signature,
  so it can be passed as ``flax.linen.Conv(conv_general_dilated=conv2d)``;
  only the derivatives are computed differently (see the module docstring).
  Grouped convolutions and other layouts are passed to
  ``lax.conv_general_dilated`` unchanged.

  Args:
    x: ``[N, H, W, C]`` inputs (one leading batch axis).
    w: ``[KH, KW, C, O]`` kernel.
    window_strides: strides.
    padding: ``"SAME"``, ``"VALID"`` or explicit pairs.
    lhs_dilation: input dilation.
    rhs_dilation: kernel dilation.
    dimension_numbers: must describe NHWC/HWIO/NHWC or be ``None``.
    feature_group_count: groups (1 for the fast path).
    batch_group_count: batch groups (1 for the fast path).
    precision: passed through on the fallback path only.
    preferred_element_type: passed through on the fallback path only.

  Returns:
    ``[N, H', W', O]``.
  """
  canonical = dimension_numbers in (None, _DN) or (
      isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers)
      and dimension_numbers
      == jax.lax.conv_dimension_numbers(x.shape, w.shape, _DN)
  )
  if (
      not canonical
      or x.ndim != 4
      or feature_group_count != 1
      or batch_group_count != 1
  ):
    return jax.lax.conv_general_dilated(
        x, w, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count,
        precision, preferred_element_type,
    )
  lhs_dil = tuple(lhs_dilation or (1, 1))
  rhs_dil = tuple(rhs_dilation or (1, 1))
  strides = tuple(window_strides)
  if isinstance(padding, str):
    pads = _explicit_padding(
        padding, x.shape[1:3], w.shape[:2], strides, lhs_dil, rhs_dil
    )
  else:
    pads = tuple(tuple(int(v) for v in p) for p in np.asarray(padding))
  return _conv(x, w, strides, pads, lhs_dil, rhs_dil)
