"""The Square attack: score-based random search with square-shaped updates (L-inf and L2).

Each iteration proposes one random square-shaped change of the current best point, queries the
model once and keeps the proposal if it lowers the loss (margin loss for untargeted attacks,
cross-entropy for targeted ones, as in the paper). The side of the square follows the paper's
piecewise-constant schedule for ``p``, the fraction of pixels changed, rescaled to the query
budget. An example stops as soon as its margin is <= 0 (it is adversarial).

Query accounting: one query for the initial point plus one per iteration, so ``max_queries``
queries at most; the count is exact per example.

Differences to the authors' code (``max-andr/square-attack: attack.py``), all deliberate:

- the square positions (and the L2 attack's random signs and transpositions) are drawn per
  example from that example's key; the reference L2 code shares one position across the batch;
- the L2 loop runs ``max_queries - 1`` iterations so that the initial query plus the loop stay
  within the budget (the reference L2 loop makes ``n_iters + 1`` queries);
- the L-inf resampling loop ("draw a new sign until the square changes the image") draws at
  most ``_NUM_TRIES`` signs; if none changes the image (only possible for ``eps = 0``) the
  proposal equals the current point and is rejected;
- the schedule uses exact integer arithmetic for ``int(it / n_iters * 10000)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import loop
from advtrace._src.attacks import losses
from advtrace._src.attacks.hopskipjump import l2_norm
from advtrace._src.attacks.hopskipjump import pairwise_sum
from advtrace._src.attacks.hopskipjump import random_uniform

LOSSES = {"margin": losses.margin, "ce": losses.cross_entropy}
SQUARE_NORMS = ("linf", "l2")
_SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_NUM_TRIES = 20  # L-inf: resampling attempts for a square that changes the image


class _Config(NamedTuple):
  norm: str
  loss: str
  targeted: bool
  p_init: float
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x: jax.Array
  x_best: jax.Array
  label: jax.Array
  eps: jax.Array
  schedule: jax.Array  # int32[9]: iterations at which p halves (from the budget)
  loss_min: jax.Array
  margin_min: jax.Array
  key: jax.Array
  queries: jax.Array
  active: jax.Array
  iteration: jax.Array


def schedule_thresholds(n_iters: int) -> tuple[int, ...]:
  """Iterations at which the paper's ``p_selection`` halves ``p``, for a budget of ``n_iters``.

  ``p_selection`` maps iteration ``i`` to ``it = int(i / n_iters * 10000)`` and halves ``p``
  each time ``it`` passes 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000. ``it > b`` holds
  exactly when ``i >= ceil((b + 1) * n_iters / 10000)``.
  """
  return tuple(-(-(b + 1) * n_iters // 10000) for b in _SCHEDULE_BOUNDS)


def p_selection(p_init: float, iteration: jax.Array, schedule) -> jax.Array:
  """The fraction of pixels the square covers at ``iteration`` (0-based, after the init query).

  ``schedule`` is :func:`schedule_thresholds` of the budget (as an array of 9 ints).
  """
  schedule = jnp.asarray(schedule, jnp.int32)
  halvings = jnp.sum(jnp.asarray(iteration)[..., None] >= schedule, axis=-1)
  return p_init / (2.0 ** halvings.astype(jnp.float32))


def _signs(u: jax.Array, dtype) -> jax.Array:
  """Rademacher signs from uniforms (one random draw per step keeps compiles small)."""
  return jnp.where(u < 0.5, -1.0, 1.0).astype(dtype)


def _randint(u: jax.Array, high: jax.Array) -> jax.Array:
  """A uniform integer in ``[0, high)`` from a uniform in ``[0, 1)``."""
  return jnp.minimum(jnp.floor(u * high).astype(jnp.int32), high - 1)


def _window(h: int, w: int, top: jax.Array, left: jax.Array, side: jax.Array) -> jax.Array:
  """Bool mask ``(h, w, 1)`` of the square ``[top, top+side) x [left, left+side)``."""
  rows = jnp.arange(h)[:, None, None]
  cols = jnp.arange(w)[None, :, None]
  return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)


def _losses(cfg: _Config, logits_fn, x, label):
  logits = base.single_logits(logits_fn, x)
  loss = LOSSES[cfg.loss](logits, label, cfg.targeted)
  margin = losses.margin(logits, label, cfg.targeted, kappa=jnp.inf)
  return loss, margin


# ---------------------------------------------------------------------------- L-inf


def _linf_init(cfg: _Config, x, eps, key):
  """Vertical stripes: one random sign per (column, channel), constant along each column."""
  _, w, c = x.shape
  signs = _signs(random_uniform(key, (1, w, c)), x.dtype)
  return jnp.clip(x + eps * signs, cfg.clip_min, cfg.clip_max)


def _linf_proposal(cfg: _Config, s: _State):
  h, w, c = s.x.shape
  u = jax.random.uniform(jax.random.fold_in(s.key, s.iteration), (2 + _NUM_TRIES * c,))
  p = p_selection(cfg.p_init, s.iteration, s.schedule)
  side = jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32)
  side = jnp.clip(side, 1, min(h, w) - 1)
  top, left = _randint(u[0], h - side), _randint(u[1], w - side)
  win = _window(h, w, top, left, side)
  # One sign per channel for the whole square; redraw while the square leaves x_best unchanged.
  signs = _signs(u[2:], s.x.dtype).reshape(_NUM_TRIES, 1, 1, c) * s.eps
  candidates = jnp.clip(s.x[None] + signs, cfg.clip_min, cfg.clip_max)
  changed = jnp.any(win[None] & (jnp.abs(candidates - s.x_best[None]) >= 1e-7), axis=(1, 2, 3))
  first = jnp.argmax(changed)
  delta = s.x_best - s.x
  new_delta = jnp.where(win & jnp.any(changed), signs[first], delta)
  return jnp.clip(s.x + new_delta, cfg.clip_min, cfg.clip_max)


# ---------------------------------------------------------------------------- L2


def _square_sum_table(n: int) -> jax.Array:
  """``table[k] = sum_{j < k} 1 / (j + 1)^2`` for ``k = 0..n``."""
  return jnp.asarray(np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1) ** 2)]),
                     jnp.float32)


def _pseudo_gaussian(a, b, rows, cols, table):
  """The paper's centred pseudo-Gaussian bump on a ``rows x cols`` rectangle, unit L2 norm.

  Rectangle cell ``(a, b)`` gets ``sum_{k=d}^{K-1} 1/(k+1)^2`` with ``d`` its Chebyshev distance
  to the centre ``(rows // 2, cols // 2)`` and ``K = max(rows // 2, cols // 2) + 1``: the sum of
  nested concentric squares of weight ``1/(k+1)^2`` (``pseudo_gaussian_pert_rectangles``).
  ``a``, ``b`` are integer coordinate grids; cells outside the rectangle are 0.
  """
  valid = (a >= 0) & (a < rows) & (b >= 0) & (b < cols)
  k_max = jnp.maximum(rows // 2, cols // 2) + 1
  d = jnp.maximum(jnp.abs(a - rows // 2), jnp.abs(b - cols // 2))
  last = table.shape[0] - 1
  v = jnp.where(valid, table[jnp.clip(k_max, 0, last)] - table[jnp.clip(d, 0, last)], 0.0)
  return v / jnp.maximum(l2_norm(v), 1e-12)


def _meta_pattern(side, n: int, table) -> jax.Array:
  """``meta_pseudo_gaussian_pert(side)`` on an ``n x n`` grid (zero outside the square).

  The top half is a positive bump and the bottom half a negative one, normalised to unit norm.
  """
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  half = side // 2
  top = _pseudo_gaussian(i, j, half, side, table)
  bottom = _pseudo_gaussian(i - half, j, side - half, side, table)
  m = top - bottom
  return m / jnp.maximum(l2_norm(m), 1e-12)


def _place(pattern, transpose, h: int, w: int, top, left) -> jax.Array:
  """Puts an ``n x n`` pattern (optionally transposed) at ``(top, left)`` of an ``h x w`` map."""
  pattern = jnp.where(transpose, pattern.T, pattern)
  n = pattern.shape[0]
  r = jnp.arange(h)[:, None] - top
  c = jnp.arange(w)[None, :] - left
  inside = (r >= 0) & (r < n) & (c >= 0) & (c < n)
  return jnp.where(inside, pattern[jnp.clip(r, 0, n - 1), jnp.clip(c, 0, n - 1)], 0.0)


def _l2_init(cfg: _Config, x, eps, key):
  """Tiles of ``side = h // 5`` bumps, each with a random transpose and per-channel sign."""
  h, w, c = x.shape
  side = h // 5
  start = (h - side * 5) // 2
  nbh, nbw = h // side, w // side
  table = _square_sum_table(max(h, w) + 1)
  pattern = _meta_pattern(side, side, table)  # static size
  u = random_uniform(key, (nbh, nbw, 1 + c))
  transpose = u[..., 0] < 0.5
  signs = _signs(u[..., 1:], x.dtype)
  # Static block layout: block index and offset of every pixel (blocks may run off the image).
  r = np.arange(h) - start
  col = np.arange(w) - start
  bi, oi = r // side, r % side
  bj, oj = col // side, col % side
  valid_r = (r >= 0) & (bi < nbh)
  valid_c = (col >= 0) & (bj < nbw)
  bi, bj = np.clip(bi, 0, nbh - 1), np.clip(bj, 0, nbw - 1)
  t = transpose[bi[:, None], bj[None, :]]
  value = jnp.where(t, pattern[oj[None, :], oi[:, None]], pattern[oi[:, None], oj[None, :]])
  valid = jnp.asarray(valid_r[:, None] & valid_c[None, :])
  delta = jnp.where(valid, value, 0.0)[..., None] * signs[bi[:, None], bj[None, :]]
  delta = delta / jnp.maximum(l2_norm(delta), 1e-12) * eps
  return jnp.clip(x + delta, cfg.clip_min, cfg.clip_max)


def _l2_proposal(cfg: _Config, s: _State):
  h, w, c = s.x.shape
  n = min(h, w)
  u = jax.random.uniform(jax.random.fold_in(s.key, s.iteration), (5 + c,))
  p = p_selection(cfg.p_init, s.iteration, s.schedule)
  side = jnp.maximum(jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32), 3)
  side = side + (side % 2 == 0)
  side = jnp.minimum(side, n - 1)
  top1, left1 = _randint(u[0], h - side), _randint(u[1], w - side)
  top2, left2 = _randint(u[2], h - side), _randint(u[3], w - side)
  win1 = _window(h, w, top1, left1, side)
  win2 = _window(h, w, top2, left2, side)

  delta = s.x_best - s.x
  sq = lambda a: pairwise_sum(jnp.moveaxis(a * a, -1, 0), 2)  # per channel
  norms_window1 = jnp.sqrt(sq(jnp.where(win1, delta, 0.0)))
  norm_image = l2_norm(delta)
  norms_windows = jnp.sqrt(sq(jnp.where(win1 | win2, delta, 0.0)))

  table = _square_sum_table(n + 1)
  pattern = _place(_meta_pattern(side, n, table), u[4] < 0.5, h, w, top1, left1)
  signs = _signs(u[5:], s.x.dtype)
  new = pattern[..., None] * signs + jnp.where(win1, delta, 0.0) / (1e-10 + norms_window1)
  budget = jnp.maximum(s.eps ** 2 - norm_image ** 2, 0.0) / c + norms_windows ** 2
  new = new / jnp.maximum(jnp.sqrt(sq(new)), 1e-12) * jnp.sqrt(budget)
  delta = jnp.where(win2, 0.0, delta)
  delta = jnp.where(win1, new, delta)
  delta = delta / jnp.maximum(l2_norm(delta), 1e-12) * s.eps
  return jnp.clip(s.x + delta, cfg.clip_min, cfg.clip_max)


# ---------------------------------------------------------------------------- driver


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  propose = _linf_proposal if cfg.norm == "linf" else _l2_proposal
  x_new = propose(cfg, s)
  loss, margin = _losses(cfg, logits_fn, x_new, s.label)
  improved = loss < s.loss_min
  margin_min = jnp.where(improved, margin, s.margin_min)
  return s._replace(
      x_best=jnp.where(improved, x_new, s.x_best),
      loss_min=jnp.where(improved, loss, s.loss_min),
      margin_min=margin_min,
      queries=s.queries + 1,
      active=margin_min > 0)


@functools.partial(xla.jit, static_argnums=(0, 1))
def _init(logits_fn, cfg: _Config, x, labels, eps, schedule, keys) -> _State:
  init = _linf_init if cfg.norm == "linf" else _l2_init
  x_best = jax.vmap(functools.partial(init, cfg))(x, eps, keys)
  loss, margin = jax.vmap(functools.partial(_losses, cfg, logits_fn))(x_best, labels)
  batch = x.shape[0]
  return _State(x=x, x_best=x_best, label=labels, eps=eps, schedule=schedule, loss_min=loss,
                margin_min=margin,
                key=jax.vmap(jax.random.fold_in, (0, None))(keys, 1),
                queries=jnp.ones((batch,), jnp.int32), active=margin > 0,
                iteration=jnp.zeros((batch,), jnp.int32))


def square_attack(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    eps,
    norm: str = "linf",
    max_queries: int = 10000,
    p_init: float | None = None,
    loss: str | None = None,
    targeted: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""Square attack: random search over square-shaped updates at the boundary of the eps-ball.

  L-inf: the start is ``x`` plus vertical stripes of random sign ``±eps``; each proposal sets a
  random ``s x s`` square (one random sign per channel) to ``±eps``. L2: the start is a grid of
  pseudo-Gaussian bumps scaled to norm ``eps``; each proposal puts a new centred bump (positive
  top half, negative bottom half) into one random square, moving there the perturbation mass of
  a second random square, and rescales the total to norm ``eps``. The side ``s`` follows
  :func:`p_selection` (``s = round(sqrt(p h w))``, at least 1 for L-inf and at least 3 and odd
  for L2). A proposal is kept when it lowers the loss.

  Args:
    logits_fn: batched model, NHWC images to logits (only its outputs are used).
    x: images, NHWC in ``[clip_min, clip_max]``; the L2 attack needs height and width >= 5,
      the L-inf one >= 2.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example.
    eps: the radius of the ``norm`` ball; scalar or per-example.
    norm: ``"linf"`` or ``"l2"``.
    max_queries: the query budget per example, including the initial query (0 returns ``x``).
      It also sets the ``p`` schedule, as ``n_iters`` does in the paper.
    p_init: the initial fraction of changed pixels; default 0.05 (L-inf) or 0.1 (L2), the
      paper's standard values.
    loss: ``"margin"`` or ``"ce"``; default margin when untargeted and cross-entropy when
      targeted, as in the paper. The stopping test always uses the margin.
    targeted: whether ``labels`` are targets.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.queries`` counts the initial query and one per
    iteration, ``info.iterations`` the iterations after the initial query.

  References:
    Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box
    adversarial attack via random search", ECCV 2020. https://arxiv.org/abs/1912.00049
  """
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  if norm not in SQUARE_NORMS:
    raise ValueError(f"Unknown norm {norm!r} for the Square attack. Valid choices: "
                     f"{', '.join(SQUARE_NORMS)}.")
  loss = loss if loss is not None else ("ce" if targeted else "margin")
  if loss not in LOSSES:
    raise ValueError(f"Unknown loss {loss!r}. Valid choices: {', '.join(LOSSES)}.")
  if not isinstance(max_queries, (int, np.integer)) or max_queries < 0:
    raise ValueError(f"max_queries must be an integer >= 0, got {max_queries!r}.")
  p_init = (0.05 if norm == "linf" else 0.1) if p_init is None else p_init
  if not 0.0 < p_init <= 1.0:
    raise ValueError(f"p_init must be in (0, 1], got {p_init}.")
  h, w = np.shape(x)[1:3]
  min_side = 2 if norm == "linf" else 5
  if min(h, w) < min_side:
    raise ValueError(f"The {norm} Square attack needs images of at least {min_side}x{min_side} "
                     f"pixels, got {h}x{w}.")
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  eps = base.per_example(eps, batch, "eps")
  keys = base.example_keys(key, batch)
  if max_queries == 0:
    zeros = jnp.zeros((batch,), jnp.int32)
    return base.finalize(logits_fn, x, x, labels, targeted=targeted, iterations=zeros,
                         queries=zeros)
  cfg = _Config(norm, loss, bool(targeted), float(p_init), float(clip_min), float(clip_max))
  schedule = jnp.broadcast_to(jnp.asarray(schedule_thresholds(int(max_queries)), jnp.int32),
                              (batch, len(_SCHEDULE_BOUNDS)))
  state = _init(logits_fn, cfg, x, labels, eps, schedule, keys)
  state = loop.run(_step, logits_fn, cfg, state, int(max_queries) - 1, loop=loop_mode)
  return base.finalize(logits_fn, x, state.x_best, labels, targeted=targeted,
                       iterations=state.iteration, queries=state.queries)
