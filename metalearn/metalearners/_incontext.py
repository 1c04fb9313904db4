"""In-context learning: a transformer reads the support set as tokens."""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metalearn import models
from metalearn.metalearners._base import (
    MetaLearner,
    WithModelState,
    make_learner,
    split_model_state,
    task_loss,
    with_model_state,
)
from metalearn.metalearners._base import embed_episode as _embed_episode
from metalearn.models import Model
from metalearn.types import Episode

PyTree = Any


class InContextParams(NamedTuple):
  """The in-context learner's learned meta-parameters.

  Attributes:
    embed: the image encoder's parameters.
    transformer: the :class:`InContextTransformer`'s parameters.
  """

  embed: PyTree
  transformer: PyTree


class ContextCache(NamedTuple):
  """A task's encoded support set: what a query attends to.

  Attributes:
    keys: one ``[n, num_heads, head_dim]`` array per layer, the attention
      keys of the ``n`` support tokens at that layer's input.
    values: the same for the attention values.
    center: ``[d]``, the mean support embedding, subtracted from every
      embedding before the projection.
    present: ``[max_ways]`` bool, the label slots the support set has.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  center: jax.Array
  present: jax.Array


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  """``[t, dim]`` -> ``[t, num_heads, dim // num_heads]``."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _attention(q, k, v, mask=None):
  """Softmax attention of ``q [t, h, d]`` over ``k, v [s, h, d]``;
  ``mask [t, s]`` (true: may attend)."""
  scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    scores = jnp.where(mask[None], scores, -jnp.inf)
  return jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, -1), v)


def _matching_qkv_init(key, shape, dtype=jnp.float32):
  """``[d, 3 dim]`` query, key and value kernels, the query and key ones
  equal (LeCun normal).

  Attention then starts as a similarity kernel (the score of two tokens
  is the inner product of one projection of both), so a query already
  leans towards the support examples that resemble it, and the value path
  gets a gradient to carry their labels from the first step. Independent
  query and key kernels start with scores uncorrelated with similarity:
  neither path has a gradient in expectation, and meta-training sits at
  chance (5-way Gaussian-cluster tasks: no progress in 400 steps, where
  this learns).
  """
  qk_key, v_key = jax.random.split(key)
  d, dim = shape[0], shape[1] // 3
  w = nn.initializers.lecun_normal()(qk_key, (d, dim), dtype)
  v = nn.initializers.lecun_normal()(v_key, (d, dim), dtype)
  return jnp.concatenate([w, w, v], -1)


class Block(nn.Module):
  """A pre-LN transformer block whose attention is split into its parts,
  so the keys and values of the support tokens can be cached.

  ``update(x, attend(project(x)))`` is the block:
  ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.
  """

  dim: int
  num_heads: int
  mlp_ratio: int = 4

  def setup(self):
    self.attn_norm = nn.LayerNorm()
    self.qkv = nn.Dense(3 * self.dim, kernel_init=_matching_qkv_init)
    self.attn_out = nn.Dense(self.dim)
    self.mlp_norm = nn.LayerNorm()
    self.mlp_hidden = nn.Dense(self.mlp_ratio * self.dim)
    self.mlp_out = nn.Dense(self.dim)

  def project(self, x: jax.Array):
    """Queries, keys and values of tokens ``x [t, dim]``, each
    ``[t, num_heads, head_dim]``."""
    qkv = jnp.split(self.qkv(self.attn_norm(x)), 3, -1)
    return tuple(_heads(a, self.num_heads) for a in qkv)

  def update(self, x: jax.Array, attended: jax.Array) -> jax.Array:
    """The residual updates given the attention output ``[t, h, d]``."""
    x = x + self.attn_out(attended.reshape(x.shape))
    return x + self.mlp_out(nn.gelu(self.mlp_hidden(self.mlp_norm(x))))


class InContextTransformer(nn.Module):
  """The sequence model of :func:`in_context`.

  A support token is ``proj(z - c) + E[y]``, a query token ``proj(z - c)
  + E[max_ways]`` (the "unknown label" row), ``c`` the mean support
  embedding; no positional encoding, so the
  support set is read as a set. Support tokens attend to support tokens,
  query tokens to support tokens only. Logits are tied to the label
  embedding: ``readout(LN(h)) . E[j]`` for slots ``j < max_ways``.

  ``__call__`` runs support and queries as one masked sequence (the
  reference), ``context`` and ``read`` the same computation split at the
  key/value cache.
  """

  max_ways: int
  dim: int
  depth: int
  num_heads: int
  mlp_ratio: int = 4

  def setup(self):
    self.proj = nn.Dense(self.dim)
    self.labels = nn.Embed(self.max_ways + 1, self.dim)
    self.blocks = [Block(self.dim, self.num_heads, self.mlp_ratio)
                   for _ in range(self.depth)]
    self.final_norm = nn.LayerNorm()
    self.readout = nn.Dense(self.dim)

  def _tokens(self, z, center, y=None):
    if y is None:  # queries: the "unknown label" embedding
      y = jnp.full(z.shape[:1], self.max_ways, jnp.int32)
    return self.proj(z - center) + self.labels(y)

  def _logits(self, h):
    return self.labels.attend(
        self.readout(self.final_norm(h)))[:, :self.max_ways]

  def __call__(self, zs: jax.Array, ys: jax.Array,
               zq: jax.Array) -> jax.Array:
    """Query logits ``[m, max_ways]`` from one pass over ``[support;
    query]`` tokens with the mask: every token attends to the support
    tokens alone."""
    n, center = zs.shape[0], zs.mean(0)
    x = jnp.concatenate([self._tokens(zs, center, ys),
                         self._tokens(zq, center)])
    mask = jnp.broadcast_to(jnp.arange(x.shape[0]) < n, (x.shape[0],) * 2)
    for block in self.blocks:
      x = block.update(x, _attention(*block.project(x), mask))
    return self._logits(x[n:])

  def context(self, zs: jax.Array, ys: jax.Array):
    """The support tokens' per-layer ``(keys, values)``, and ``center``."""
    center = zs.mean(0)
    x = self._tokens(zs, center, ys)
    keys, values = [], []
    for i, block in enumerate(self.blocks):
      q, k, v = block.project(x)
      keys.append(k)
      values.append(v)
      if i + 1 < self.depth:  # the last layer's support outputs go unread
        x = block.update(x, _attention(q, k, v))
    return tuple(keys), tuple(values), center

  def read(self, keys, values, center, zq: jax.Array) -> jax.Array:
    """Query logits ``[m, max_ways]`` attending to the cache."""
    x = self._tokens(zq, center)
    for block, kc, vc in zip(self.blocks, keys, values, strict=True):
      q, _, _ = block.project(x)
      x = block.update(x, _attention(q, kc, vc))
    return self._logits(x)


def _ways_error(label, max_ways: int) -> str:
  return (f"an episode has label {label} (at least {label + 1} ways), but "
          f"in_context was built with max_ways={max_ways} label slots: "
          "build it with max_ways at least the ways of every episode "
          "(learner.max_ways)")


def _check_ways(labels: jax.Array, max_ways: int) -> None:
  """Raises if a label needs a slot beyond ``max_ways``.

  Without a check when the support set is no larger than ``max_ways``
  (then neither are its ways); eagerly a ``ValueError``; under tracing a
  host callback whose ``ValueError`` surfaces as the runtime error of
  the computation (the number of ways is data, not a shape).
  """
  if labels.shape[0] <= max_ways:
    return
  if not isinstance(labels, jax.core.Tracer):
    label = int(np.max(np.asarray(labels)))
    if label >= max_ways:
      raise ValueError(_ways_error(label, max_ways))
    return

  def check(label):
    if int(label) >= max_ways:
      raise ValueError(_ways_error(int(label), max_ways))

  jax.debug.callback(check, jnp.max(labels))


def _positive_int(value, name: str) -> None:
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def in_context(
    encoder: Model,
    *,
    max_ways: int,
    dim: int = 128,
    depth: int = 2,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    permute_labels: bool = True,
    freeze_encoder: bool = False,
) -> MetaLearner:
  r"""An in-context learner: a transformer reads the support set and
  labels each query in one forward pass.

  Every image is encoded, :math:`z = f(x)`, and centred on the mean
  support embedding :math:`c`. A support example :math:`(x, y)` becomes
  the token :math:`P (z - c) + E_y` and a query the token :math:`P (z - c)
  + E_\varnothing`, with a learned embedding per label slot (``max_ways``
  of them) and one for the unknown label. A pre-LN
  transformer (:class:`InContextTransformer`, no positional encoding)
  runs them with a mask: every token attends to the support tokens
  alone. So the support set is read as a set (its order does not matter),
  and queries are independent of one another. The logit of slot
  :math:`j` is :math:`\langle W\, \mathrm{LN}(h), E_j \rangle` (tied to
  the label embedding, so every slot is scored alike), ``-inf`` for slots
  the support set lacks.

  Three choices let meta-training leave chance at once (Omniglot 5-way,
  150 steps of 8 tasks: 82% validation accuracy, and chance without the
  centring; 5-way Gaussian-cluster tasks: chance after 400 steps with
  independent query and key kernels, or with queries attending to
  themselves): attention starts as a similarity kernel
  (:func:`_matching_qkv_init`), so queries lean towards the support
  examples that resemble them; and the embeddings are centred on the
  support mean, since the embedding's common component (ReLU features are
  positive) would otherwise make every image resemble every other. A
  query does not attend to itself: under the similarity kernel its score
  with itself would outweigh those with the support set and hide the
  labels, and its own token stays in the residual stream anyway. So a
  layer's queries need only the support tokens' keys and values (and the
  centre), which :func:`in_context`'s ``adapt`` caches.

  Adaptation is encoding the context: the task parameters are the
  support tokens' keys and values at every layer (:class:`ContextCache`),
  and ``predict`` runs query tokens through the layers against that
  cache. Everything (encoder, projection, embeddings, transformer) is
  meta-learned by the gradient of the query cross-entropy, unless
  ``freeze_encoder``: then the encoder is a fixed feature extractor, as
  CAML's pretrained image encoder (load one with ``trainer.init_from``):
  its parameters (and running statistics) are carried state that the
  meta-step leaves as they are, whatever the meta-optimizer (weight decay
  included), it always normalises with its running statistics, and no
  gradient flows into it.

  With ``permute_labels`` meta-training assigns an episode's labels to
  random slots (a random injection of :math:`[0, N)` into
  :math:`[0, \texttt{max\_ways})`, drawn from the task key), so every slot
  is trained even when the training episodes have fewer ways than
  ``max_ways``, and the model cannot tie a class to a slot number.

  The encoder's normalisation is handled as in
  :func:`~metalearn.metalearners.protonet`: meta-training encodes support
  and queries in one batch; at meta-test ``norm="running"`` normalises
  every image with the carried running statistics, ``norm="support"``
  the queries with the support set's statistics (task parameters are
  then :class:`WithModelState` ``(cache, statistics)``),
  ``norm="transductive"`` encodes the episode as one batch
  (``transductive=True``), and ``norm="none"`` does not normalise.

  Args:
    encoder: the image embedding (``conv4(None)``).
    max_ways: the label slots: the most ways any episode, in training or
      at test, may have (fewer always work; more raise, shapes being
      static).
    dim: the token width.
    depth: the number of transformer blocks.
    num_heads: attention heads (dividing ``dim``).
    mlp_ratio: the width of each block's MLP, in multiples of ``dim``.
    permute_labels: meta-train on labels assigned to random slots.
    freeze_encoder: keep the encoder as it is initialised or loaded
      (``norm="running"`` or ``"none"``).

  Returns:
    A :class:`MetaLearner` whose meta-parameters are
    :class:`InContextParams` (in :class:`WithModelState` with running
    statistics) and task parameters :class:`ContextCache`.

  Raises:
    ValueError: if a size is not a positive int or ``num_heads`` does not
      divide ``dim``; from ``adapt`` and ``meta_grad``, if an episode has
      more than ``max_ways`` ways (under ``jit``, as the runtime error).

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
    >>> learner = in_context(models.conv4(None, norm="running"),
    ...                      max_ways=5, dim=32, depth=1)
    >>> params = jax.jit(learner.init)(jax.random.key(1), ep)
    >>> adapt = jax.jit(learner.adapt, static_argnames="training")
    >>> cache = adapt(params, ep, None, training=False)
    >>> cache.keys[0].shape  # 3 support tokens, 4 heads of 8
    (3, 4, 8)
    >>> jax.jit(learner.predict)(params, cache, ep.query_x).shape
    (6, 5)

  References:
    Kirsch, Harrison, Sohl-Dickstein & Metz, `General-Purpose In-Context
    Learning by Meta-Learning Transformers
    <https://arxiv.org/abs/2212.04458>`_, 2022.

    Fifty, Duan, Junkins, Amid, Leskovec, Ré & Thrun, `Context-Aware
    Meta-Learning <https://arxiv.org/abs/2310.10971>`_, ICLR 2024.
  """
  for value, name in ((max_ways, "max_ways"), (dim, "dim"),
                      (depth, "depth"), (num_heads, "num_heads"),
                      (mlp_ratio, "mlp_ratio")):
    _positive_int(value, name)
  if dim % num_heads:
    raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
  net = InContextTransformer(max_ways, dim, depth, num_heads, mlp_ratio)
  support = models.uses_support_statistics(encoder)
  stateful = models.has_state(encoder) and not support
  if freeze_encoder and (support or encoder.transductive):
    raise ValueError(
        "freeze_encoder needs an encoder normalised alone (norm='running' "
        "or 'none'): a frozen encoder keeps its running statistics")

  def split(meta_params):
    return split_model_state(meta_params, stateful)

  def init(key, episode: Episode):
    embed_key, net_key = jax.random.split(key)
    x = episode.support_x
    embed = encoder.init(embed_key, x)
    shape = jax.eval_shape(encoder.apply, embed, x)
    z = jnp.zeros(shape.shape, shape.dtype)
    params = InContextParams(
        embed, net.init(net_key, z, episode.support_y, z)["params"])
    if not stateful:
      return params
    return WithModelState(params, encoder.init_state(embed_key, x))

  def encode(params, z, labels) -> ContextCache:
    keys, values, center = net.apply({"params": params}, z, labels,
                                     method=InContextTransformer.context)
    present = jax.nn.one_hot(labels, max_ways, dtype=z.dtype).sum(0) > 0
    return ContextCache(keys, values, center, present)

  def read(params, cache: ContextCache, z):
    logits = net.apply({"params": params}, cache.keys, cache.values,
                       cache.center, z, method=InContextTransformer.read)
    return jnp.where(cache.present[None, :], logits, -jnp.inf)

  def embed_episode(params, state, episode: Episode, training: bool):
    return _embed_episode(encoder, params, state, episode, training)

  score = task_loss

  def adapt(meta_params, episode: Episode, key, training: bool = True):
    del key, training  # one forward pass: the same in training and test
    _check_ways(episode.support_y, max_ways)
    params, state = split(meta_params)
    if support:
      z, stats = models.support_forward(encoder, params.embed,
                                        episode.support_x)
      return WithModelState(
          encode(params.transformer, z, episode.support_y), stats)
    z, _, _ = embed_episode(params.embed, state, episode, False)
    return encode(params.transformer, z, episode.support_y)

  def embed_with(meta_params, task_params, x):
    """Embeddings of ``x`` at meta-test."""
    params, state = split(meta_params)
    if support:
      state = task_params.model_state
    return models.bind(encoder, state).apply(params.embed, x)

  def predict(meta_params, task_params, x):
    cache = task_params.params if support else task_params
    return read(split(meta_params)[0].transformer, cache,
                embed_with(meta_params, task_params, x))

  def evaluate(meta_params, task_params, episode: Episode):
    if support:
      return score(predict(meta_params, task_params, episode.query_x),
                   episode.query_y)
    params, state = split(meta_params)
    _, z, _ = embed_episode(params.embed, state, episode, False)
    return score(read(params.transformer, task_params, z), episode.query_y)

  def meta_grad(meta_params, episode: Episode, key):
    _check_ways(episode.support_y, max_ways)
    params, state = split(meta_params)
    ys, yq = episode.support_y, episode.query_y
    if permute_labels and key is not None:
      slots = jax.random.permutation(key, max_ways)
      ys, yq = slots[ys], slots[yq]

    if freeze_encoder:  # Features of the fixed encoder, state unmoved.
      zs, zq, new = jax.lax.stop_gradient(
          embed_episode(params.embed, state, episode, False))

    def loss_fn(params):
      if freeze_encoder:
        (zs_, zq_), state_ = (zs, zq), new
      else:
        zs_, zq_, state_ = embed_episode(params.embed, state, episode, True)
      cache = encode(params.transformer, zs_, ys)
      loss, metrics = score(read(params.transformer, cache, zq_), yq)
      return loss, (metrics, state_)

    grads, (metrics, new) = jax.grad(loss_fn, has_aux=True)(params)
    if freeze_encoder:  # Carried: the "new value" is the value it has.
      grads = grads._replace(embed=jax.lax.stop_gradient(params.embed))
    if stateful:  # the carried entry is the new value (MetaLearner.carried)
      grads = WithModelState(grads, jax.lax.stop_gradient(new))
    return grads, metrics

  def frozen(params: InContextParams) -> InContextParams:
    """``carried`` of the parameters: the encoder's, when frozen."""
    return InContextParams(
        jax.tree.map(lambda _: freeze_encoder, params.embed),
        jax.tree.map(lambda _: False, params.transformer))

  if stateful:
    carried = with_model_state(frozen if freeze_encoder else None)
  else:
    carried = frozen if freeze_encoder else None
  return make_learner(init, adapt, evaluate, meta_grad, carried, predict,
                      encoder.transductive)
