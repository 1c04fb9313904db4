"""MetaOptNet: a differentiable multi-class SVM head on a learned embedding.

The head is Crammer & Singer's multi-class SVM, fitted in its dual on the
support embeddings by accelerated projected gradient, and differentiated
implicitly: a ``jax.custom_vjp`` differentiates the solver's fixed-point
equation, so the meta-gradient costs one linear solve (JAX's GMRES on
vector-Jacobian products) whatever the number of solver steps, and no
solver iteration is kept for the backward pass. The projection is optax's
``projection_simplex``. These are maintained libraries, rather than a QP
package: MetaOptNet's qpth is PyTorch's, and JAXopt, which offered QP
solvers with implicit differentiation, is no longer maintained.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import gmres
from optax.projections import projection_simplex

from metalearn.metalearners._base import MetaLearner
from metalearn.metalearners._protonet import scaled_embedding_learner
from metalearn.models import Model

# The dual variables of absent classes are held at zero by giving them this
# value before the projection onto the simplex (finite: the projection
# sorts and sums its input).
_ABSENT = -1e9


class SVMHead(NamedTuple):
  """A task's SVM: ``weights [d, slots]`` (the primal weights
  :math:`w_m = \\sum_i \\alpha_i^m x_i`) and ``present [slots]``, which
  classes the support set has."""

  weights: jax.Array
  present: jax.Array


def _rows_on_simplex(v: jax.Array, present: jax.Array) -> jax.Array:
  """Each row of ``v [n, slots]`` projected onto the probability simplex
  over the present classes (absent ones get 0)."""
  return jax.vmap(projection_simplex)(jnp.where(present, v, _ABSENT))


def crammer_singer_dual(
    kernel: jax.Array,
    labels: jax.Array,
    present: jax.Array,
    c: float = 0.1,
    jitter: float = 1.0,
    num_steps: int = 100,
) -> jax.Array:
  r"""The dual of Crammer & Singer's multi-class SVM, as MetaOptNet solves it.

  .. math::
    \min_\alpha\ \tfrac12 \sum_{i,j} K_{ij} \langle \alpha_i, \alpha_j
    \rangle + \tfrac{\epsilon}{2} \lVert \alpha \rVert^2
    - \sum_i \langle \alpha_i, y_i \rangle
    \quad \text{s.t.} \quad \alpha_i \le C y_i,\ \
    \textstyle\sum_m \alpha_i^m = 0,

  over :math:`\alpha_i \in \mathbb{R}^{\text{classes}}` for each support
  example :math:`i` with one-hot label :math:`y_i`, where :math:`K` is the
  linear kernel of the support embeddings and :math:`\epsilon` the
  ``jitter`` MetaOptNet adds to the block kernel :math:`K \otimes I`. The
  class weights are :math:`w_m = \sum_i \alpha_i^m x_i`.

  Writing :math:`\alpha_i = C (y_i - p_i)` turns the constraints into
  :math:`p_i` on the probability simplex, so the problem is solved by
  Nesterov's accelerated projected gradient for strongly convex problems
  (step :math:`1 / L`, :math:`L = C^2 (\lambda_{max}(K) + \epsilon)`,
  momentum from the condition number; ``num_steps`` steps from
  :math:`p_i = y_i`, the zero classifier). The solution is
  differentiated implicitly (the implicit function theorem at the
  projected gradient step's fixed point, its linear system solved by
  GMRES), in ``kernel`` (and so in the embeddings), not through the
  iterations; reverse mode only (``jax.grad``, not ``jax.jvp``).

  Args:
    kernel: ``[n, n]`` linear kernel of the support embeddings.
    labels: int ``[n]`` in ``[0, slots)``, with ``slots = len(present)``.
    present: bool ``[slots]``, the classes present in the support set;
      absent classes' dual variables are zero.
    c: the SVM's cost :math:`C` (MetaOptNet: 0.1).
    jitter: :math:`\epsilon > 0` (MetaOptNet: 1), which makes the problem
      strongly convex.
    num_steps: projected-gradient steps (static).

  Returns:
    ``alpha [n, slots]``.
  """
  y = jax.nn.one_hot(labels, present.shape[-1], dtype=kernel.dtype)
  return c * (y - _simplex_dual(kernel, y, present, c, jitter, num_steps))


def _schedule(kernel, c, jitter):
  """The solver's step :math:`1 / L` and momentum, constants of the fixed
  point (any step gives the same solution), so not differentiated."""
  top = jax.lax.stop_gradient(jnp.linalg.eigvalsh(kernel)[-1])
  curvature = jnp.maximum(top, 0.0) + jitter
  root_kappa = jnp.sqrt(curvature / jitter)
  return 1.0 / (c * c * curvature), (root_kappa - 1.0) / (root_kappa + 1.0)


def _projected_step(p, kernel, y, present, c, jitter, step):
  r"""One projected gradient step in :math:`p` (:math:`\alpha = C(y - p)`)."""
  alpha = c * (y - p)
  grad = -c * (kernel @ alpha + jitter * alpha - y)
  return _rows_on_simplex(p - step * grad, present)


def _solve(kernel, y, present, c, jitter, num_steps):
  step, momentum = _schedule(kernel, c, jitter)

  def body(_, carry):
    p, z = carry
    new = _projected_step(z, kernel, y, present, c, jitter, step)
    return new, new + momentum * (new - p)

  return jax.lax.fori_loop(0, num_steps, body, (y, y))[0], step


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _simplex_dual(kernel, y, present, c, jitter, num_steps):
  """The solution :math:`p` (rows on the simplex) of the reparametrised
  dual, differentiable in ``kernel`` by the implicit function theorem."""
  return _solve(kernel, y, present, c, jitter, num_steps)[0]


def _simplex_dual_fwd(kernel, y, present, c, jitter, num_steps):
  p, step = _solve(kernel, y, present, c, jitter, num_steps)
  return p, (kernel, y, present, p, step)


def _simplex_dual_bwd(c, jitter, num_steps, saved, cotangent):
  r"""At the fixed point :math:`p = T(p, K)` of the projected step,
  :math:`\bar K = (\partial_K T)^\top w` with
  :math:`(I - \partial_p T)^\top w = \bar p`, solved by GMRES on
  vector-Jacobian products (``num_steps`` does not enter)."""
  del num_steps
  kernel, y, present, p, step = saved

  def step_at(p, kernel):
    return _projected_step(p, kernel, y, present, c, jitter, step)

  _, vjp_p = jax.vjp(lambda p: step_at(p, kernel), p)
  w = gmres(lambda w: w - vjp_p(w)[0], cotangent, tol=1e-6, atol=0.0,
            restart=30, maxiter=10)[0]
  _, vjp_kernel = jax.vjp(lambda k: step_at(p, k), kernel)
  return vjp_kernel(w)[0], jnp.zeros_like(y), None


_simplex_dual.defvjp(_simplex_dual_fwd, _simplex_dual_bwd)


def metaoptnet(
    embed: Model,
    *,
    c: float = 0.1,
    jitter: float = 1.0,
    num_steps: int = 100,
    scale: float = 1.0,
    learn_scale: bool = True,
) -> MetaLearner:
  r"""MetaOptNet-SVM: a multi-class SVM fitted on the support embeddings.

  Embeds the support set, fits Crammer & Singer's multi-class SVM to it
  (:func:`crammer_singer_dual`, MetaOptNet's formulation with its
  :math:`C = 0.1` and jitter 1) and scores a query :math:`x` with the
  logits :math:`\tau\, \langle w_m, f(x) \rangle`, :math:`\tau` a learned
  scale (initially 1), trained with cross-entropy on the query set; the
  meta-gradient reaches the embedding through the SVM's solution by
  implicit differentiation. Any number of ways works: the classes are read
  from the labels, bounded by the support size, and absent ones get
  ``-inf`` logits. The embedding's normalisation is that of every
  embedding learner (:func:`~metalearn.metalearners.embedding_learner`).

  Args:
    embed: the embedding network (MetaOptNet's ResNet-12; ``conv4(None)``
      on Omniglot).
    c: the SVM's cost :math:`C`.
    jitter: the ridge on the dual variables that makes the dual strongly
      convex (MetaOptNet's released code: 1).
    num_steps: steps of the dual solver, in meta-training and at test.
    scale: :math:`\tau`, or its initial value when learned.
    learn_scale: meta-learn :math:`\tau` (MetaOptNet does).

  Returns:
    A :class:`MetaLearner` whose meta-parameters are
    :class:`~metalearn.metalearners.ScaledParams` when ``learn_scale`` (in
    :class:`WithModelState` with running statistics), task parameters
    :class:`SVMHead`.

  Raises:
    ValueError: if ``c``, ``jitter``, ``scale`` or ``num_steps`` is not
      positive.

  Examples:
    >>> import jax
    >>> import numpy as np
    >>> from metalearn import models, tasks
    >>> from metalearn.types import ClassPool
    >>> pool = ClassPool(np.zeros((8, 4, 28, 28, 1), np.uint8),
    ...                  np.arange(8, dtype=np.int32))
    >>> s = tasks.episode_sampler(pool, num_ways=3, num_shots=1,
    ...                           num_queries=2)
    >>> ep = s.sample(jax.random.key(0), pool)
    >>> learner = metaoptnet(models.conv4(None, norm="none"), num_steps=10)
    >>> params = learner.init(jax.random.key(1), ep)
    >>> head = jax.jit(learner.adapt)(params, ep, None)
    >>> head.weights.shape  # 64 features, 3 support slots
    (64, 3)

  References:
    Lee, Maji, Ravichandran & Soatto, `Meta-Learning with Differentiable
    Convex Optimization <https://arxiv.org/abs/1904.03758>`_, CVPR 2019.
    Crammer & Singer, On the Algorithmic Implementation of Multiclass
    Kernel-based Vector Machines, JMLR 2001.
  """
  for name, value in (("c", c), ("jitter", jitter), ("scale", scale),
                      ("num_steps", num_steps)):
    if not value > 0:
      raise ValueError(f"{name} must be > 0, got {value}")

  def fit(z, labels) -> SVMHead:
    slots = labels.shape[-1]
    present = jax.nn.one_hot(labels, slots, dtype=z.dtype).sum(0) > 0
    alpha = crammer_singer_dual(z @ z.T, labels, present, c, jitter,
                                num_steps)
    return SVMHead(z.T @ alpha, present)

  def classify(tau, head: SVMHead, z):
    logits = tau * (z @ head.weights)
    return jnp.where(head.present[None, :], logits, -jnp.inf)

  return scaled_embedding_learner(embed, fit, classify, scale, learn_scale)
