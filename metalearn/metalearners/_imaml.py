"""Implicit MAML: a proximal inner problem and its implicit meta-gradient."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn import models
from metalearn.metalearners._base import (
    MetaLearner,
    adaptation_learner,
    task_loss,
)
from metalearn.metalearners._inner import InnerResult, inner_optimize
from metalearn.metalearners._maml import _init, check_inner
from metalearn.models import Model
from metalearn.types import Episode

PyTree = Any

_INNER = ("proximal", "pull_back")


def proximal(anchor: PyTree, reg: float) -> optax.GradientTransformation:
  r"""Adds the gradient of :math:`\tfrac{\lambda}{2}\|\phi - \theta\|^2`.

  Chained before ``optax.sgd`` it turns gradient descent on a loss into
  gradient descent on the proximal objective of :func:`imaml`.

  Args:
    anchor: :math:`\theta`, the point the parameters are pulled towards.
    reg: :math:`\lambda \ge 0`.

  Returns:
    A stateless transformation; its ``update`` needs ``params``.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("the proximal term needs params")
    return jax.tree.map(lambda g, p, a: g + reg * (p - a),
                        updates, params, anchor), state

  return optax.GradientTransformation(init, update)


def conjugate_gradient(matvec, b: PyTree, num_steps: int) -> PyTree:
  """Solves ``matvec(x) = b`` by ``num_steps`` of conjugate gradient from 0.

  A fixed number of steps in a ``lax.scan`` rather than
  ``jax.scipy.sparse.linalg.cg``: that one loops until a tolerance is met
  (a ``while_loop``), so under ``vmap`` over tasks every task runs until
  the slowest converges and the cost of a meta-step depends on the data;
  iMAML truncates the solve at a few steps by design (Rajeswaran et al.
  use 5). The operator must be symmetric; where it shows non-positive
  curvature along a search direction (a network's Hessian can be
  indefinite) the iterate stops there, as in truncated (Steihaug) CG,
  instead of stepping along a direction that increases the error.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``b``.
    b: the right-hand side.
    num_steps: CG iterations (static).

  Returns:
    The approximate solution, shaped like ``b``.
  """
  vdot = optax.tree_utils.tree_vdot
  x = jax.tree.map(jnp.zeros_like, b)
  rs = vdot(b, b)

  def step(carry, _):
    x, r, p, rs, going = carry
    ap = matvec(p)
    pap = vdot(p, ap)
    going = going & (pap > 0) & (rs > 0)
    alpha = jnp.where(going, rs / jnp.where(going, pap, 1.0), 0.0)
    x = jax.tree.map(lambda x, p: x + alpha * p, x, p)
    r = jax.tree.map(lambda r, ap: r - alpha * ap, r, ap)
    rs_new = vdot(r, r)
    beta = jnp.where(going, rs_new / jnp.where(going, rs, 1.0), 0.0)
    p = jax.tree.map(lambda r, p: r + beta * p, r, p)
    return (x, r, p, rs_new, going), None

  carry = (x, b, b, rs, jnp.array(True))
  return jax.lax.scan(step, carry, None, length=num_steps)[0][0]


def _zero_cotangent(tree: PyTree) -> PyTree:
  """Zero cotangents for ``tree``'s leaves (``float0`` for integers)."""

  def zero(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)

  return jax.tree.map(zero, tree)


def implicit_solution(model: Model, reg: float, cg_steps: int,
                      cg_damping: float = 0.0, cg_reg_damping: float = 0.0):
  r"""Attaches the implicit meta-gradient to an inner solution.

  Returns ``attach(theta, phi, x, y) -> phi``: the identity on ``phi``,
  whose vector-Jacobian product sends a cotangent :math:`g` on ``phi``
  to :math:`v \approx ((1 + \delta) I + H / (\lambda + \mu))^{-1} g` on
  ``theta`` (``cg_steps`` of :func:`conjugate_gradient`, :math:`\delta` =
  ``cg_damping``, :math:`\mu` = ``cg_reg_damping``), :math:`H` the Hessian
  of the support loss
  :math:`L(\phi)` (``task_loss`` of ``model`` on ``(x, y)`` with batch
  statistics) at ``phi``, reached by Hessian-vector products. With
  :math:`\delta = \mu = 0` and an exact solve this is the derivative of the
  minimiser :math:`\phi^*(\theta)` of
  :math:`L(\phi) + \tfrac{\lambda}{2}\|\phi - \theta\|^2` (its
  stationarity condition differentiated in :math:`\theta`), whatever path
  computed ``phi``; nothing of that path is kept.

  Args:
    model: the network.
    reg: :math:`\lambda > 0`.
    cg_steps: CG iterations.
    cg_damping: :math:`\delta \ge 0`, added to the identity.
    cg_reg_damping: :math:`\mu \ge 0`, added to :math:`\lambda` where it
      divides the Hessian.

  Returns:
    ``attach``; ``x``, ``y`` and ``phi`` get zero cotangents.
  """

  def support_loss(phi, x, y):
    return task_loss(models.forward(model, phi, None, x, training=True)[0],
                     y)[0]

  @jax.custom_vjp
  def attach(theta, phi, x, y):
    del theta, x, y
    return phi

  def fwd(theta, phi, x, y):
    del theta
    return phi, (phi, x, y)

  def bwd(res, g):
    phi, x, y = res
    grad = jax.grad(support_loss)

    def matvec(v):
      # Reverse over reverse: forward mode cannot enter the custom_vjp
      # convolution of metalearn.models (_conv.py).
      hv = jax.grad(lambda p: optax.tree_utils.tree_vdot(grad(p, x, y), v))(
          phi)
      return jax.tree.map(
          lambda v, hv: (1.0 + cg_damping) * v + hv / (reg + cg_reg_damping),
          v, hv)

    v = conjugate_gradient(matvec, g, cg_steps)
    return v, *_zero_cotangent((phi, x, y))

  attach.defvjp(fwd, bwd)
  return attach


def imaml(
    model: Model,
    inner_lr: float = 0.1,
    num_inner_steps: int = 16,
    *,
    reg: float = 2.0,
    cg_steps: int = 5,
    cg_damping: float = 0.0,
    cg_reg_damping: float = 0.0,
    inner: str = "proximal",
    eval_inner_lr: float | None = None,
    eval_num_inner_steps: int | None = None,
    eval_reg: float | None = None,
) -> MetaLearner:
  r"""Implicit MAML: a proximal inner problem, differentiated implicitly.

  Adaptation approximately solves, by ``num_inner_steps`` of gradient
  descent from :math:`\theta`,

  .. math::
    \phi^*(\theta) = \arg\min_\phi \; L_{support}(\phi)
      + \tfrac{\lambda}{2} \|\phi - \theta\|^2,

  and the meta-gradient of the query loss is, by the implicit function
  theorem on the stationarity condition :math:`\nabla L_{support}(\phi^*)
  + \lambda(\phi^* - \theta) = 0`,

  .. math::
    \frac{d L_{query}(\phi^*)}{d\theta}
      = \Big(I + \tfrac{1}{\lambda} \nabla^2 L_{support}(\phi^*)\Big)^{-1}
        \nabla L_{query}(\phi^*),

  computed by ``cg_steps`` of conjugate gradient with Hessian-vector
  products at the adapted :math:`\phi` (:func:`implicit_solution`). No
  gradient flows through the inner steps, so the meta-gradient's memory
  does not grow with ``num_inner_steps`` (it is that of about one
  Hessian-vector product), and it depends on the inner loop's end point,
  not its path. It is exact when the inner problem is solved and CG has
  converged (``cg_damping=0``); the tests check it against the closed
  form on a quadratic problem.

  The meta-gradient is expressed as a ``jax.custom_vjp`` of the adapted
  parameters, so the learner is an ordinary :func:`adaptation_learner`:
  ``training.make_meta_step`` maps it over tasks unchanged, and the
  model's ``norm`` works as in :func:`~metalearn.metalearners.maml`
  (``"support"``: queries normalised with the support statistics under
  :math:`\phi`, differentiated through; ``"running"``: running statistics
  carried, and the same warning). The Hessian is that of the support loss
  with batch statistics, the loss the inner steps descend.

  Args:
    model: the network; its output size is the number of ways.
    inner_lr: the inner gradient-descent step size.
    num_inner_steps: inner steps during meta-training (Rajeswaran et al.:
      16 for 5-way, 25 for 20-way Omniglot).
    reg: the proximal strength :math:`\lambda > 0` (theirs: 2.0).
    cg_steps: conjugate-gradient iterations for the meta-gradient
      (theirs: 5), at least 1.
    cg_damping: :math:`\delta \ge 0`, solve :math:`((1 + \delta) I +
      H/(\lambda + \mu)) v = g` instead: a better-conditioned, biased
      solve, closer to the first-order gradient. The authors' code's
      ``--cg_damping`` (1.0 in their Omniglot command); 0 is the paper's
      equation.
    cg_reg_damping: :math:`\mu \ge 0` in that solve (their code's
      ``lam_damping``, fixed at 10); 0 is the paper's equation.
    inner: ``"proximal"`` (the paper's algorithm): every inner step
      descends the proximal objective. ``"pull_back"`` (the authors'
      released code): the inner steps descend the support loss alone, then
      one step of ``inner_lr`` on the proximal term alone pulls
      :math:`\phi` back to :math:`\theta + (1 - \alpha\lambda)(\phi -
      \theta)`; the meta-gradient is taken at that point as for
      ``"proximal"``. At meta-test, with ``eval_reg=0`` the two are the
      same plain gradient descent.
    eval_inner_lr: the step size at meta-test time (default ``inner_lr``).
    eval_num_inner_steps: inner steps at meta-test time (default
      ``num_inner_steps``).
    eval_reg: :math:`\lambda` at meta-test time (default ``reg``); 0 is
      plain gradient descent (their ``measure_accuracy.py`` uses 0).

  Returns:
    A :class:`MetaLearner` whose meta-parameters are the model's params.

  Raises:
    ValueError: for a step size, ``reg`` or ``cg_steps`` out of range.

  Examples:
    >>> import jax
    >>> from metalearn import models, tasks
    >>> sampler = tasks.sinusoid_sampler(num_shots=10, num_queries=10)
    >>> ep = sampler.sample(jax.random.key(0), None)
    >>> learner = imaml(models.mlp(), inner_lr=0.01, num_inner_steps=5,
    ...                 reg=1.0, cg_steps=3)
    >>> params = jax.jit(learner.init)(jax.random.key(1), ep)
    >>> meta_grad = jax.jit(learner.meta_grad)
    >>> grads, metrics = meta_grad(params, ep, jax.random.key(2))
    >>> sorted(metrics)
    ['outer/loss']

  References:
    Rajeswaran, Finn, Kakade & Levine, `Meta-Learning with Implicit
    Gradients <https://arxiv.org/abs/1909.04630>`_, 2019.
  """
  check_inner(inner_lr, num_inner_steps)
  eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
  eval_num_inner_steps = (
      num_inner_steps if eval_num_inner_steps is None else eval_num_inner_steps
  )
  eval_reg = reg if eval_reg is None else eval_reg
  check_inner(eval_inner_lr, eval_num_inner_steps, "eval_inner")
  if not reg > 0:
    raise ValueError(f"reg must be > 0, got {reg}")
  if not eval_reg >= 0:
    raise ValueError(f"eval_reg must be >= 0, got {eval_reg}")
  if not isinstance(cg_steps, int) or cg_steps < 1:
    raise ValueError(f"cg_steps must be an int >= 1, got {cg_steps!r}")
  if not cg_damping >= 0:
    raise ValueError(f"cg_damping must be >= 0, got {cg_damping}")
  if not cg_reg_damping >= 0:
    raise ValueError(f"cg_reg_damping must be >= 0, got {cg_reg_damping}")
  if inner not in _INNER:
    raise ValueError(f"inner must be one of {_INNER}, got {inner!r}")
  attach = implicit_solution(model, reg, cg_steps, cg_damping,
                             cg_reg_damping)
  pull_back = inner == "pull_back"

  def adapt(params, model_state, episode: Episode, key,
            training: bool) -> InnerResult:
    del key
    theta = jax.lax.stop_gradient(params)
    lam, lr, steps = ((reg, inner_lr, num_inner_steps) if training else
                      (eval_reg, eval_inner_lr, eval_num_inner_steps))
    tx = optax.sgd(lr)
    if not pull_back:
      tx = optax.chain(proximal(theta, lam), tx)
    result = inner_optimize(
        model, tx, theta, episode.support_x, episode.support_y,
        num_steps=steps, model_state=model_state, training=training)
    if pull_back:
      result = result._replace(params=jax.tree.map(
          lambda p, t: t + (1.0 - lr * lam) * (p - t), result.params, theta))
    if not training:
      return result
    # The model state the inner steps moved (running statistics) takes no
    # part in the query loss's gradient (the query pass uses batch
    # statistics), so only the parameters need the implicit gradient.
    phi = attach(params, result.params, episode.support_x,
                 episode.support_y)
    return result._replace(params=phi)

  return adaptation_learner(model, _init(model), adapt)
