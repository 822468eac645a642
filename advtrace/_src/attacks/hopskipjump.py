"""HopSkipJump: a decision-based attack that walks along the decision boundary (L2 and L-inf).

Only the top-1 label of each query is used. From an adversarial start the attack repeats:

1. estimate the gradient direction of the boundary at the current point by Monte-Carlo sampling
   (``init_num_evals * sqrt(t)`` decisions, capped at ``max_num_evals``) around it;
2. step along it (L2) or its sign (L-inf) with a geometric step-size search, halving the step
   ``dist / sqrt(t)`` until the point is adversarial;
3. binary-search back to the boundary between the original image and the new point.

The structure, thresholds (``theta = gamma / d^{3/2}`` for L2, ``gamma / d^2`` for L-inf) and the
sampling radius ``delta`` follow the authors' code (``Jianbo-Lab/HSJA: hsja.py``). Every accepted
point was queried and found adversarial, so the output is adversarial whenever a start was found.

Differences to the reference, all deliberate: the untargeted start tries at most ``init_size``
noise images (ART's rule; the reference tries up to 10^4); a start given in ``x_init`` costs one
query to verify it; the geometric search halves at most 30 times (the reference loops until it
succeeds); the labels are the ones passed in (the reference attacks the model's own prediction,
which is what to pass to reproduce it). ART 1.10 (used by adv_tracing) orders each iteration as
binary search, gradient, step, so its output is the last stepped point without a final
projection; here, as in the authors' code, every step ends with the projection.

Batching: the whole batch runs together (one ``vmap``); Monte-Carlo samples are evaluated in
fixed-size chunks of ``eval_batch_size`` with a mask on the unused tail of the last chunk, and
the variable-length searches are ``lax.while_loop`` calls with per-example stopping, so shapes
are static and each example's queries are counted exactly. Sums use :func:`pairwise_sum` so that a
batched call gives bitwise the same result as single-example calls.

Query accounting: every model evaluation of a candidate counts one query for its example. The
optional ``max_queries`` budget is respected exactly: a search that runs out of queries stops and
keeps the last point that was verified adversarial.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import batching
from advtrace._src import checks
from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import loop

HSJ_NORMS = ("l2", "linf")
NO_BUDGET = np.iinfo(np.int32).max
_MAX_HALVINGS = 30  # cap on the geometric step-size search (the reference loops forever)
_INIT_BLEND_TOL = 0.001  # the reference's tolerance for the blended-noise binary search
_MAX_EVALS = 30000  # keeps the exact integer num_evals schedule within int32


class _Config(NamedTuple):
  norm: str
  targeted: bool
  init_num_evals: int
  max_num_evals: int
  eval_batch_size: int
  init_size: int
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x: jax.Array
  x_adv: jax.Array  # the current boundary point; always verified adversarial
  label: jax.Array
  theta: jax.Array  # binary-search threshold
  dist: jax.Array  # distance of x_adv to x
  dist_post: jax.Array  # distance of the point before the last binary search
  key: jax.Array
  queries: jax.Array
  budget: jax.Array
  active: jax.Array
  iteration: jax.Array


# ---------------------------------------------------------------------------- shared helpers


def decide(logits_fn, images: jax.Array, label: jax.Array, targeted: bool, clip_min: float,
           clip_max: float) -> jax.Array:
  """Top-1 decisions for a batch of candidates of one example: True on the adversarial side."""
  pred = jnp.argmax(logits_fn(jnp.clip(images, clip_min, clip_max)), axis=-1)
  return pred == label if targeted else pred != label


def random_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """``jax.random.normal`` drawn flat, then reshaped: flat draws compile several times faster."""
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def random_uniform(key: jax.Array, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
  """``jax.random.uniform`` drawn flat, then reshaped (see :func:`random_normal`)."""
  return jax.random.uniform(key, (int(np.prod(shape)),), dtype, minval, maxval).reshape(shape)


def pairwise_sum(v: jax.Array, num_axes: int | None = None) -> jax.Array:
  """Sums the trailing ``num_axes`` axes of ``v`` (all by default) in a fixed pairwise order.

  XLA's reductions can round differently for different batch sizes, and a decision-based
  attack turns a last-bit difference into a different path. Explicit pairwise additions give
  bitwise the same sum for any batch size, so row ``i`` of a batched call equals the
  single-example call.
  """
  num_axes = v.ndim if num_axes is None else num_axes
  lead = v.shape[:v.ndim - num_axes]
  v = v.reshape(lead + (-1,))
  n = v.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()
  v = jnp.pad(v, [(0, 0)] * len(lead) + [(0, size - n)])
  while size > 1:
    size //= 2
    v = v[..., :size] + v[..., size:]
  return v[..., 0]


def l2_norm(v: jax.Array, num_axes: int | None = None) -> jax.Array:
  """L2 norm over the trailing ``num_axes`` axes, batch-size invariant (see pairwise_sum)."""
  return jnp.sqrt(pairwise_sum(v * v, num_axes))


def distance(a: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  d = a - b
  return l2_norm(d) if norm == "l2" else jnp.max(jnp.abs(d))


def check_budget(max_queries, name: str = "max_queries") -> int:
  """Validates an optional query budget; None means unlimited (returns the int32 maximum)."""
  if max_queries is None:
    return int(NO_BUDGET)
  if not isinstance(max_queries, (int, np.integer)) or max_queries < 0:
    raise ValueError(f"{name} must be None or an integer >= 0, got {max_queries!r}.")
  return int(min(max_queries, NO_BUDGET))


def check_starts(x_init, x, name: str = "x_init"):
  """Validates per-example starting images (same shape as ``x``), or returns None."""
  if x_init is None:
    return None
  if np.shape(x_init) != np.shape(x):
    raise ValueError(f"{name} must have the same shape as x, {np.shape(x)} (one start per "
                     f"example), got {np.shape(x_init)}. Use starting_points() to pick them.")
  return jnp.asarray(x_init, jnp.asarray(x).dtype)


def starting_points(logits_fn: base.LogitsFn, pool: jax.Array, targets: jax.Array,
                    key: jax.Array, *, batch_size: int = 256) -> jax.Array:
  """Per-example starting images for targeted decision-based attacks.

  For each target class, picks (uniformly at random, from the example's key) one image of
  ``pool`` that the model classifies as that class. These classifications are model queries
  shared by the whole batch and are not included in the attacks' per-example query counts.

  Args:
    logits_fn: the attacked model.
    pool: candidate images, NHWC in [0, 1] (for example training images).
    targets: int labels, one target per example.
    key: a typed PRNG key, or one per example.
    batch_size: batch size for classifying the pool.

  Returns:
    ``(len(targets), H, W, C)`` starting images, classified as their targets.

  Raises:
    ValueError: if no pool image is classified as some target.
  """
  checks.check_images(pool, "pool")
  checks.check_labels(targets, None, "targets")
  targets = np.asarray(targets)
  keys = base.example_keys(key, targets.shape[0])
  pred = batching.map_batched(xla.jit(lambda z: jnp.argmax(logits_fn(z), -1)), np.asarray(pool),
                              batch_size)
  matches = pred[None, :] == targets[:, None]
  missing = sorted(set(targets[~matches.any(axis=1)].tolist()))
  if missing:
    raise ValueError(f"No pool image is classified as class(es) {missing}; add images of those "
                     "classes to the pool or choose other targets.")
  scores = jax.vmap(lambda k: jax.random.uniform(k, (pred.shape[0],)))(keys)
  idx = np.argmax(np.where(matches, np.asarray(scores), -1.0), axis=1)
  return jnp.asarray(np.asarray(pool)[idx])


# ---------------------------------------------------------------------------- HSJ parts


def _project(x, x_pert, alpha, norm):
  if norm == "l2":
    return (1.0 - alpha) * x + alpha * x_pert
  return jnp.clip(x_pert, x - alpha, x + alpha)


def _decide_one(logits_fn, cfg, image, label):
  return decide(logits_fn, image[None], label, cfg.targeted, cfg.clip_min, cfg.clip_max)[0]


def _binary_search(logits_fn, cfg: _Config, x, x_pert, label, theta, queries, budget):
  """Binary search on the segment (L2) or box (L-inf) between ``x`` and adversarial ``x_pert``.

  Returns the closest verified adversarial point, the distance of ``x_pert`` (the reference's
  ``dist_post_update``) and the updated query count.
  """
  dist_post = distance(x_pert, x, cfg.norm)
  if cfg.norm == "l2":
    high, threshold = jnp.ones_like(dist_post), theta
  else:
    high, threshold = dist_post, jnp.minimum(dist_post * theta, theta)

  def cond(c):
    low, high, q = c
    return ((high - low) / threshold > 1) & (q < budget)

  def body(c):
    low, high, q = c
    mid = (high + low) / 2.0
    adv = _decide_one(logits_fn, cfg, _project(x, x_pert, mid, cfg.norm), label)
    return jnp.where(adv, low, mid), jnp.where(adv, mid, high), q + 1

  _, high, queries = jax.lax.while_loop(cond, body, (jnp.zeros_like(high), high, queries))
  return _project(x, x_pert, high, cfg.norm), dist_post, queries


def _estimate_gradient(logits_fn, cfg: _Config, x_adv, label, delta, num_evals, key, queries,
                       budget):
  """Monte-Carlo estimate of the boundary's normal direction at ``x_adv`` (unit L2 norm)."""
  n = jnp.minimum(num_evals, budget - queries)
  chunk = cfg.eval_batch_size

  def cond(c):
    return c[0] * chunk < n

  def body(c):
    i, s_rv, s_frv, s_f = c
    k = jax.random.fold_in(key, i)
    shape = (chunk,) + x_adv.shape
    if cfg.norm == "l2":
      rv = random_normal(k, shape, x_adv.dtype)
    else:
      rv = random_uniform(k, shape, x_adv.dtype, -1.0, 1.0)
    rv = rv / l2_norm(rv, 3)[:, None, None, None]
    pert = jnp.clip(x_adv + delta * rv, cfg.clip_min, cfg.clip_max)
    rv = (pert - x_adv) / delta
    f = 2.0 * decide(logits_fn, pert, label, cfg.targeted, cfg.clip_min, cfg.clip_max) - 1.0
    used = (i * chunk + jnp.arange(chunk)) < n
    f = jnp.where(used, f, 0.0)
    rv = jnp.where(used[:, None, None, None], rv, 0.0)
    over_samples = lambda a: pairwise_sum(jnp.moveaxis(a, 0, -1), 1)
    return (i + 1, s_rv + over_samples(rv), s_frv + over_samples(f[:, None, None, None] * rv),
            s_f + jnp.sum(f))

  zeros = jnp.zeros_like(x_adv)
  _, s_rv, s_frv, s_f = jax.lax.while_loop(
      cond, body, (jnp.int32(0), zeros, zeros, jnp.float32(0.0)))
  count = jnp.maximum(n, 1).astype(x_adv.dtype)
  mean_rv, f_bar = s_rv / count, s_f / count
  # The reference subtracts the baseline mean(f) unless every decision agrees.
  grad = jnp.where(f_bar == 1.0, mean_rv,
                   jnp.where(f_bar == -1.0, -mean_rv, s_frv / count - f_bar * mean_rv))
  grad = grad / jnp.maximum(l2_norm(grad), 1e-12)
  return grad, queries + jnp.maximum(n, 0)


def _geometric_step(logits_fn, cfg: _Config, x_adv, update, dist, cur_iter, label, queries,
                    budget):
  """Halves ``dist / sqrt(t)`` until ``x_adv + eps * update`` is adversarial."""

  def cond(c):
    _, found, n, q = c
    return (~found) & (n < _MAX_HALVINGS) & (q < budget)

  def body(c):
    eps, _, n, q = c
    adv = _decide_one(logits_fn, cfg, x_adv + eps * update, label)
    return jnp.where(adv, eps, eps / 2.0), adv, n + 1, q + 1

  eps0 = dist / jnp.sqrt(cur_iter.astype(dist.dtype))
  eps, found, _, queries = jax.lax.while_loop(
      cond, body, (eps0, jnp.bool_(False), jnp.int32(0), queries))
  x_new = jnp.clip(x_adv + eps * update, cfg.clip_min, cfg.clip_max)
  return jnp.where(found, x_new, x_adv), queries


def _num_evals(cfg: _Config, t: jax.Array) -> jax.Array:
  """``min(int(init_num_evals * sqrt(t)), max_num_evals)`` in exact integer arithmetic."""
  init, cap = cfg.init_num_evals, cfg.max_num_evals
  capped = init * jnp.sqrt(t.astype(jnp.float32)) >= cap + 1
  t = jnp.minimum(t, int(((cap + 2) / init) ** 2) + 1)  # keeps init^2 * t within int32
  v = init * init * t
  r = jnp.floor(jnp.sqrt(v.astype(jnp.float32))).astype(jnp.int32)
  r = jnp.where(r * r > v, r - 1, r)
  r = jnp.where((r + 1) * (r + 1) <= v, r + 1, r)
  return jnp.where(capped, cap, jnp.minimum(r, cap))


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  # Finished examples are frozen by the driver; a zero budget keeps their loops empty.
  budget = jnp.where(s.active, s.budget, s.queries)
  cur_iter = s.iteration + 1
  d = s.x.size
  scale = np.sqrt(d) if cfg.norm == "l2" else float(d)
  delta = jnp.where(cur_iter == 1, 0.1 * (cfg.clip_max - cfg.clip_min),
                    jnp.maximum(scale * s.theta * s.dist_post, 1e-12))
  num_evals = _num_evals(cfg, cur_iter)
  key = jax.random.fold_in(s.key, s.iteration)
  grad, q = _estimate_gradient(logits_fn, cfg, s.x_adv, s.label, delta, num_evals, key,
                               s.queries, budget)
  update = jnp.sign(grad) if cfg.norm == "linf" else grad
  x_new, q = _geometric_step(logits_fn, cfg, s.x_adv, update, s.dist, cur_iter, s.label, q,
                             budget)
  x_adv, dist_post, q = _binary_search(logits_fn, cfg, s.x, x_new, s.label, s.theta, q, budget)
  return s._replace(x_adv=x_adv, dist=distance(x_adv, s.x, cfg.norm), dist_post=dist_post,
                    queries=q, active=q < s.budget)


def _init_one(logits_fn, cfg: _Config, x, label, x_init, key, theta, budget):
  """Finds an adversarial start and projects it onto the boundary (one example)."""
  q = jnp.int32(0)
  if x_init is None:
    # Uniform noise until adversarial (at most init_size draws), then a blended binary search.
    def noise_cond(c):
      i, found, _, q = c
      return (~found) & (i < cfg.init_size) & (q < budget)

    def noise_body(c):
      i, _, noise, q = c
      cand = random_uniform(jax.random.fold_in(key, i), x.shape, x.dtype, cfg.clip_min,
                                cfg.clip_max)
      adv = _decide_one(logits_fn, cfg, cand, label)
      return i + 1, adv, jnp.where(adv, cand, noise), q + 1

    _, found, noise, q = jax.lax.while_loop(
        noise_cond, noise_body, (jnp.int32(0), jnp.bool_(False), x, q))

    def blend_cond(c):
      low, high, q = c
      return found & (high - low > _INIT_BLEND_TOL) & (q < budget)

    def blend_body(c):
      low, high, q = c
      mid = (high + low) / 2.0
      adv = _decide_one(logits_fn, cfg, (1.0 - mid) * x + mid * noise, label)
      return jnp.where(adv, low, mid), jnp.where(adv, mid, high), q + 1

    _, high, q = jax.lax.while_loop(blend_cond, blend_body, (jnp.float32(0), jnp.float32(1), q))
    start = (1.0 - high) * x + high * noise
  else:
    found = (budget > 0) & _decide_one(logits_fn, cfg, x_init, label)
    q = q + (budget > 0).astype(jnp.int32)
    start = x_init
  x_adv, dist_post, q = _binary_search(logits_fn, cfg, x, start, label, theta, q,
                                       jnp.where(found, budget, 0))
  x_adv = jnp.where(found, x_adv, x)
  return x_adv, dist_post, q, found


@functools.partial(xla.jit, static_argnums=(0, 1))
def _init(logits_fn, cfg: _Config, x, labels, x_init, keys, theta, budget) -> _State:
  k_init = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
  k_loop = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
  init = functools.partial(_init_one, logits_fn, cfg)
  if x_init is None:
    x_adv, dist_post, q, found = jax.vmap(
        lambda xi, yi, ki, ti, bi: init(xi, yi, None, ki, ti, bi))(x, labels, k_init, theta,
                                                                   budget)
  else:
    x_adv, dist_post, q, found = jax.vmap(init)(x, labels, x_init, k_init, theta, budget)
  dist = jax.vmap(lambda a, b: distance(a, b, cfg.norm))(x_adv, x)
  return _State(x=x, x_adv=x_adv, label=labels, theta=theta, dist=dist, dist_post=dist_post,
                key=k_loop, queries=q, budget=budget, active=found & (q < budget),
                iteration=jnp.zeros_like(q))


def hop_skip_jump(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    norm: str = "l2",
    targeted: bool = False,
    x_init: jax.Array | None = None,
    num_iterations: int = 40,
    max_queries: int | None = None,
    gamma=1.0,
    init_num_evals: int = 100,
    max_num_evals: int = 10000,
    init_size: int = 100,
    eval_batch_size: int = 128,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""HopSkipJump (HSJA): decision-based, minimises the L2 or L-inf distance to ``x``.

  Args:
    logits_fn: batched model; only ``argmax`` of its output is used.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``). The reference code
      uses the model's prediction on ``x`` as the label; pass that to reproduce it.
    key: a typed PRNG key, or one per example.
    norm: ``"l2"`` or ``"linf"``.
    targeted: whether ``labels`` are targets. Targeted attacks need ``x_init``.
    x_init: optional per-example adversarial starts (same shape as ``x``), e.g. images of the
      target class from :func:`starting_points`. One query checks each start; an example whose
      start is not adversarial fails (returns ``x``). Without it (untargeted only), the start is
      the first adversarial uniform-noise image among ``init_size`` draws, blended towards ``x``
      by a binary search (tolerance 0.001), as in the reference.
    num_iterations: boundary-walk iterations after the initial projection onto the boundary.
    max_queries: optional per-example query budget (None: unlimited). ``0`` returns ``x``.
    gamma: sets the binary-search threshold ``theta``; scalar or per-example.
    init_num_evals: Monte-Carlo samples at iteration 1; iteration ``t`` uses
      ``int(init_num_evals * sqrt(t))``, capped at ``max_num_evals``.
    max_num_evals: the cap on Monte-Carlo samples per iteration (at most 30000).
    init_size: random-noise draws tried for the untargeted start.
    eval_batch_size: Monte-Carlo samples per model call (a shape, not a budget).
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``. ``x_adv`` is adversarial for every example where a start was
    found (``x`` itself otherwise); ``info.queries`` counts every decision query.

  References:
    Chen, Jordan, Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack",
    IEEE S&P 2020. https://arxiv.org/abs/1904.02144
  """
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  if norm not in HSJ_NORMS:
    raise ValueError(f"Unknown norm {norm!r} for HopSkipJump. Valid choices: "
                     f"{', '.join(HSJ_NORMS)}.")
  if targeted and x_init is None:
    raise ValueError("A targeted HopSkipJump attack needs x_init, one start per example "
                     "classified as its target (see starting_points()).")
  for name, value, low, high in (("num_iterations", num_iterations, 0, None),
                                 ("init_num_evals", init_num_evals, 1, _MAX_EVALS),
                                 ("max_num_evals", max_num_evals, 1, _MAX_EVALS),
                                 ("init_size", init_size, 1, None),
                                 ("eval_batch_size", eval_batch_size, 1, None)):
    if (not isinstance(value, (int, np.integer)) or value < low
        or (high is not None and value > high)):
      bound = f">= {low}" if high is None else f"in [{low}, {high}]"
      raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
  budget_value = check_budget(max_queries)
  x_init = check_starts(x_init, x)
  if x_init is not None:
    checks.check_images(x_init, "x_init", value_range=(clip_min, clip_max))
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  gamma = base.per_example(gamma, batch, "gamma", allow_zero=False)
  keys = base.example_keys(key, batch)
  d = int(np.prod(x.shape[1:]))
  theta = gamma / (d * np.sqrt(d)) if norm == "l2" else gamma / d ** 2
  cfg = _Config(norm, bool(targeted), int(init_num_evals), int(max_num_evals),
                int(eval_batch_size), int(init_size), float(clip_min), float(clip_max))
  budget = jnp.full((batch,), budget_value, jnp.int32)
  state = _init(logits_fn, cfg, x, labels, x_init, keys, theta, budget)
  state = loop.run(_step, logits_fn, cfg, state, num_iterations, loop=loop_mode)
  return base.finalize(logits_fn, x, state.x_adv, labels, targeted=targeted,
                       iterations=state.iteration, queries=state.queries)
