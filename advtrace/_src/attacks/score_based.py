"""Score-based (gradient-free) query attacks: SPSA, NES, Bandits with priors, SimBA.

These attacks see only the model's output scores: logits for SPSA, NES and Bandits, the
softmax probabilities for SimBA. They never take a gradient through ``logits_fn``.

Queries. One query is one image sent to the model. A batch of ``k`` probes for one example costs
``k`` queries. Every attack counts its queries per example in ``info.queries`` and keeps that count
within ``max_queries`` exactly: a step runs only if the budget left covers all of its queries. A
query returns the whole score vector, so when an attack queries its own iterate it learns from the
same query whether that iterate is adversarial. Success checks of an iterate that was not queried
otherwise (SPSA, NES and Bandits with ``early_stop``) cost one query each and are counted. The
final success check in ``base.finalize`` is not counted.

Per-example cost, with ``T`` = ``info.iterations`` (the steps an example took) and ``n`` =
``num_samples``:

- SPSA: ``T * 2n * spsa_iters``; with ``early_stop`` ``T * (2n * spsa_iters + 1)``.
- NES: ``T * 2n``; with ``early_stop`` ``1 + T * (2n + 1)``.
- Bandits: ``T * 2``; with ``early_stop`` ``1 + T * 3``.
- SimBA: ``1 + T + (tries whose first probe did not improve)``.

The leading 1 is the query of the starting point. SPSA does not make it (cleverhans checks only
after each update); SimBA always needs it, for the starting probability. It is made only when at
least one step can follow it, so an example that cannot move (``eps`` or SimBA's ``step_size``
is 0, zero steps, or a budget too small for one step) makes no query at all and is returned
unchanged (SPSA: at its random start, which costs no query).

All attacks batch a per-example step with ``loop.run`` (vmap + jit). The probes of one example go
to ``logits_fn`` as one batch, so under vmap the model sees ``(batch, probes, H, W, C)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advtrace._src import checks
from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import loop
from advtrace._src.attacks import losses
from advtrace._src.attacks import projections

_NO_LIMIT = int(np.iinfo(np.int32).max)
_NORMS = ("linf", "l2")
_CONVENTIONS = ("ilyas", "blackboxbench")
_BASES = ("pixel", "dct")


def _margin(logits: jax.Array, label: jax.Array, targeted) -> jax.Array:
  """The unclamped margin-logit loss (``losses.margin`` with kappa = inf), as in cleverhans SPSA."""
  return losses.margin(logits, label, targeted, kappa=jnp.inf)


LOSSES = {"margin": _margin, "ce": losses.cross_entropy}


# ---------------------------------------------------------------------------- shared helpers


def _probe_losses(logits_fn, loss: str, probes: jax.Array, label, targeted) -> jax.Array:
  """Losses (to minimise) of one example's probes, shape ``(k,)``: one batch of ``k`` queries."""
  logits = logits_fn(probes)
  return jax.vmap(lambda z: LOSSES[loss](z, label, targeted))(logits)


@functools.partial(xla.jit, static_argnums=(0,))
def _batch_logits(logits_fn, x: jax.Array) -> jax.Array:
  """One query per example (the starting point), jitted once per ``logits_fn`` and shape."""
  return logits_fn(x)


def _check_common(x, labels, clip_min, clip_max, *, norm=None, loss=None):
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  if norm is not None:
    checks.check_choice(norm, _NORMS, "norm")
  if loss is not None:
    checks.check_choice(loss, LOSSES, "loss")


def _check_int(value, name: str, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _budget(max_queries, batch: int) -> np.ndarray:
  """Per-example query budgets as int32 ``(batch,)``; None means no limit."""
  if max_queries is None:
    return np.full((batch,), _NO_LIMIT, np.int32)
  arr = np.asarray(max_queries)
  if not np.issubdtype(arr.dtype, np.integer) or np.any(arr < 0):
    raise ValueError("max_queries must be None or a non-negative integer (scalar or one per "
                     f"example), got {max_queries!r}.")
  if arr.ndim == 0:
    arr = np.broadcast_to(arr, (batch,))
  if arr.shape != (batch,):
    raise ValueError(f"max_queries must be a scalar or have shape ({batch},), got {arr.shape}.")
  return np.minimum(arr.astype(np.int64), _NO_LIMIT).astype(np.int32)


def _max_steps(budget: np.ndarray, start: int, cost: int, num_steps: int | None) -> int:
  """The most steps any example can afford (capped by ``num_steps``): the loop bound."""
  if num_steps is None and np.all(budget == _NO_LIMIT):
    raise ValueError("Give max_queries or num_steps: without either the attack never stops.")
  affordable = int(max(0, (int(budget.max()) - start) // cost))
  return affordable if num_steps is None else min(affordable, num_steps)


def _same_types(new, old):
  """Casts every leaf of the new state to the old leaf's dtype (fused loops need a fixed carry;
  e.g. a bfloat16 image plus a float32 step would otherwise become float32)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def _steps_cap(num_steps: int | None) -> int:
  return _NO_LIMIT if num_steps is None else num_steps


def _end_step(logits_fn, s, cost: int, early_stop: bool, **updates):
  """The shared end of an SPSA, NES or Bandits step: counts it and decides who goes on.

  With ``early_stop`` the new iterate is queried once (part of ``cost``) and the example stops
  if it is adversarial; it also stops when the next step would not fit in its budget.

  Args:
    logits_fn: the model.
    s: the state before the step.
    cost: the queries of one step, the success check included.
    early_stop: whether to check the new iterate and stop on success.
    **updates: the fields the step changed, ``x_adv`` (the new iterate) among them.

  Returns:
    The new state, with ``queries`` and ``active`` updated, in the dtypes of ``s``.
  """
  new = s._replace(**updates)
  queries = s.queries + cost
  active = s.active
  if early_stop:
    logits = base.single_logits(logits_fn, new.x_adv)
    active = active & ~base.is_success(logits, s.label, s.targeted)
  active = active & (queries + cost <= s.budget)
  return _same_types(new._replace(queries=queries, active=active), s)


# ---------------------------------------------------------------------------- SPSA


class _SPSAConfig(NamedTuple):
  norm: str
  loss: str
  num_samples: int
  spsa_iters: int
  early_stop: bool
  clip_min: float
  clip_max: float


class _SPSAState(NamedTuple):
  x_adv: jax.Array
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  eps: jax.Array
  learning_rate: jax.Array
  delta: jax.Array
  opt_state: optax.OptState
  key: jax.Array
  queries: jax.Array
  budget: jax.Array
  active: jax.Array
  iteration: jax.Array


def _spsa_cost(cfg: _SPSAConfig) -> int:
  return 2 * cfg.num_samples * cfg.spsa_iters + int(cfg.early_stop)


def spsa_gradient(loss_fn, x: jax.Array, key: jax.Array, delta, num_samples: int,
                  spsa_iters: int = 1) -> jax.Array:
  r"""SPSA estimate of the gradient of ``loss_fn`` at one example ``x``.

  Draws ``num_samples`` Rademacher directions :math:`v_i \in \{-1, 1\}^d` per batch and
  evaluates the antithetic pairs :math:`x \pm \delta v_i` (``2 * num_samples`` queries per batch,
  ``spsa_iters`` batches):

  .. math::
    \hat g = \frac{1}{n} \sum_{i=1}^{n} \frac{L(x + \delta v_i) - L(x - \delta v_i)}{2 \delta} v_i

  Args:
    loss_fn: maps a batch of probes ``(k, *x.shape)`` to losses ``(k,)``.
    x: one example.
    key: a PRNG key.
    delta: the probe size :math:`\delta`.
    num_samples: antithetic pairs per batch.
    spsa_iters: batches averaged into one estimate (a short ``lax.scan``).

  Returns:
    The estimate, shaped like ``x``.
  """
  def one_batch(total, k):
    v = jax.random.rademacher(k, (num_samples,) + x.shape, x.dtype)
    signs = jnp.concatenate([v, -v])
    vals = loss_fn(x + delta * signs)
    vals = vals.reshape((-1,) + (1,) * x.ndim)
    return total + jnp.mean(vals * signs, axis=0) / delta, None

  total, _ = jax.lax.scan(one_batch, jnp.zeros_like(x), jax.random.split(key, spsa_iters))
  return total / spsa_iters


def _spsa_step(logits_fn, cfg: _SPSAConfig, s: _SPSAState) -> _SPSAState:
  key, sub = jax.random.split(s.key)
  loss_fn = functools.partial(_probe_losses, logits_fn, cfg.loss, label=s.label,
                              targeted=s.targeted)
  grad = spsa_gradient(loss_fn, s.x_adv, sub, s.delta, cfg.num_samples, cfg.spsa_iters)
  updates, opt_state = optax.adam(s.learning_rate).update(grad, s.opt_state)
  x_adv = projections.project_and_clip(s.x_adv + updates, s.x, s.eps, cfg.norm,
                                       cfg.clip_min, cfg.clip_max)
  return _end_step(logits_fn, s, _spsa_cost(cfg), cfg.early_stop, x_adv=x_adv,
                   opt_state=opt_state, key=key)


def spsa(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    eps,
    num_steps: int,
    learning_rate=0.01,
    delta=0.01,
    num_samples: int = 128,
    spsa_iters: int = 1,
    norm: str = "linf",
    loss: str = "margin",
    targeted: bool = False,
    random_start: bool = True,
    early_stop: bool = False,
    max_queries=None,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""SPSA: Adam on a simultaneous-perturbation estimate of the margin-loss gradient.

  Follows the semantics of cleverhans' torch SPSA (``cleverhans/torch/attacks/spsa.py``), written
  per example:

  1. Start at ``x`` plus uniform noise in ``[-eps, eps]`` (``random_start``), projected.
  2. Each step estimates the gradient of the loss with :func:`spsa_gradient`
     (``num_samples`` antithetic Rademacher pairs of size ``delta``, ``spsa_iters`` batches), takes
     one Adam step on the perturbation (torch defaults: betas 0.9 / 0.999, eps 1e-8), then projects
     the perturbation onto the ``eps``-ball and the image onto the box.
  3. With ``early_stop`` the new iterate is queried once and the example stops if it is
     adversarial (cleverhans: ``early_stop_loss_threshold=0`` on the margin loss).

  The loss is the margin-logit loss :math:`z_y - \max_{i \ne y} z_i` (untargeted) or
  :math:`\max_{i \ne t} z_i - z_t` (targeted), not clamped. Probes are not clipped to the box,
  as in cleverhans.

  Differences from cleverhans, all deliberate: (a) the gradient is estimated at the current
  iterate; cleverhans' torch port passes the clean ``x`` where its TF original passed the
  perturbation, so it probes around ``2x + delta v`` instead; (b) cleverhans evaluates the loss of
  every iterate even without early stopping (for logging); here that query is made, and counted,
  only with ``early_stop``; (c) batches are vmapped, not split into single examples.

  Settings. Attractors Table VIII: ``eps=0.3, learning_rate=0.1, num_steps=500``; with D12's
  ``delta=0.01, num_samples=128`` that is 500 x 256 = 128,000 queries per example.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example.
    eps: the radius of the ``norm`` ball; scalar or per-example.
    num_steps: Adam steps (0 returns the random start, or ``x`` without one).
    learning_rate: Adam learning rate; scalar or per-example.
    delta: SPSA probe size; scalar or per-example.
    num_samples: antithetic pairs per batch (``2 * num_samples`` queries).
    spsa_iters: batches per step (cleverhans ``spsa_iters``).
    norm: ``"linf"`` (the paper) or ``"l2"``.
    loss: ``"margin"`` (default) or ``"ce"``.
    targeted: whether ``labels`` are targets.
    random_start: start uniformly inside the ``eps``-ball, as cleverhans does.
    early_stop: query each new iterate and stop the example once it is adversarial.
    max_queries: optional per-example query budget (scalar or per-example ints).
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"``.

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` counts Adam steps.

  References:
    Uesato, O'Donoghue, van den Oord, Kohli, "Adversarial Risk and the Dangers of Evaluating
    Against Weak Attacks", ICML 2018. https://arxiv.org/abs/1802.05666
  """
  _check_common(x, labels, clip_min, clip_max, norm=norm, loss=loss)
  num_steps = _check_int(num_steps, "num_steps", minimum=0)
  num_samples = _check_int(num_samples, "num_samples", minimum=1)
  spsa_iters = _check_int(spsa_iters, "spsa_iters", minimum=1)
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  eps = base.per_example(eps, batch, "eps")
  learning_rate = base.per_example(learning_rate, batch, "learning_rate")
  delta = base.per_example(delta, batch, "delta", allow_zero=False)
  budget = _budget(max_queries, batch)
  keys = base.example_keys(key, batch)
  cfg = _SPSAConfig(norm, loss, num_samples, spsa_iters, early_stop, float(clip_min),
                    float(clip_max))
  steps = min(num_steps, _max_steps(budget, 0, _spsa_cost(cfg), num_steps))
  state = _spsa_init(cfg, x, labels, targeted, eps, learning_rate, delta, keys, budget,
                     random_start)
  state = loop.run(_spsa_step, logits_fn, cfg, state, steps, loop=loop_mode)
  return base.finalize(logits_fn, x, state.x_adv, labels, targeted=targeted,
                       iterations=state.iteration, queries=state.queries)


@functools.partial(xla.jit, static_argnums=(0, 3, 9))
def _spsa_init(cfg, x, labels, targeted, eps, learning_rate, delta, keys, budget, random_start):
  def one(xi, ki, eps_i, lr_i):
    kstart, kloop = jax.random.split(ki)
    start = xi
    if random_start:
      start = xi + jax.random.uniform(kstart, xi.shape, xi.dtype, -1.0, 1.0) * eps_i
    start = projections.project_and_clip(start, xi, eps_i, cfg.norm, cfg.clip_min, cfg.clip_max)
    return start, optax.adam(lr_i).init(start), kloop

  x_start, opt_state, loop_keys = jax.vmap(one)(x, keys, eps, learning_rate)
  batch = x.shape[0]
  return _SPSAState(
      x_adv=x_start, x=x, label=labels, targeted=jnp.full((batch,), targeted),
      eps=eps, learning_rate=learning_rate, delta=delta, opt_state=opt_state, key=loop_keys,
      queries=jnp.zeros((batch,), jnp.int32), budget=budget,
      active=(eps > 0) & (_spsa_cost(cfg) <= budget), iteration=jnp.zeros((batch,), jnp.int32))


# ---------------------------------------------------------------------------- NES


class _NESConfig(NamedTuple):
  norm: str
  loss: str
  num_samples: int
  momentum: float
  early_stop: bool
  clip_min: float
  clip_max: float


class _NESState(NamedTuple):
  x_adv: jax.Array
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  eps: jax.Array
  step_size: jax.Array
  sigma: jax.Array
  grad: jax.Array  # momentum buffer
  key: jax.Array
  queries: jax.Array
  budget: jax.Array
  active: jax.Array
  iteration: jax.Array


def _nes_cost(cfg: _NESConfig) -> int:
  return 2 * cfg.num_samples + int(cfg.early_stop)


def nes_gradient(loss_fn, x: jax.Array, key: jax.Array, sigma, num_samples: int) -> jax.Array:
  r"""NES estimate of the gradient of ``loss_fn`` at one example, with antithetic sampling.

  .. math::
    \hat g = \frac{1}{2 n \sigma} \sum_{i=1}^{n} \big(L(x + \sigma u_i) - L(x - \sigma u_i)\big)
      u_i, \qquad u_i \sim \mathcal N(0, I)

  This costs ``2 * num_samples`` queries (``num_samples`` antithetic pairs).

  Args:
    loss_fn: maps a batch of probes ``(k, *x.shape)`` to losses ``(k,)``.
    x: one example.
    key: a PRNG key.
    sigma: the search standard deviation.
    num_samples: antithetic pairs.

  Returns:
    The estimate, shaped like ``x``.
  """
  u = jax.random.normal(key, (num_samples,) + x.shape, x.dtype)
  vals = loss_fn(jnp.concatenate([x + sigma * u, x - sigma * u]))
  diff = (vals[:num_samples] - vals[num_samples:]).reshape((-1,) + (1,) * x.ndim)
  return jnp.sum(diff * u, axis=0) / (2.0 * num_samples * sigma)


def _nes_step(logits_fn, cfg: _NESConfig, s: _NESState) -> _NESState:
  key, sub = jax.random.split(s.key)
  loss_fn = functools.partial(_probe_losses, logits_fn, cfg.loss, label=s.label,
                              targeted=s.targeted)
  grad = nes_gradient(loss_fn, s.x_adv, sub, s.sigma, cfg.num_samples)
  if cfg.momentum:
    grad = cfg.momentum * s.grad + (1.0 - cfg.momentum) * grad
  x_adv = projections.project_and_clip(
      s.x_adv - s.step_size * projections.normalize_step(grad, cfg.norm), s.x, s.eps, cfg.norm,
      cfg.clip_min, cfg.clip_max)
  return _end_step(logits_fn, s, _nes_cost(cfg), cfg.early_stop, x_adv=x_adv, grad=grad, key=key)


def nes(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    eps,
    step_size,
    sigma=0.001,
    num_samples: int = 50,
    max_queries=10_000,
    num_steps: int | None = None,
    norm: str = "linf",
    loss: str = "ce",
    momentum: float = 0.0,
    targeted: bool = False,
    early_stop: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""NES: projected gradient descent on a natural-evolution-strategies gradient estimate.

  Each step estimates the loss gradient with :func:`nes_gradient` (Gaussian search,
  ``num_samples`` antithetic pairs, ``2 * num_samples`` queries), optionally averages it with
  momentum (``g = momentum * g_prev + (1 - momentum) * g``, as in Ilyas et al.'s code), and takes
  a PGD step ``x <- Proj(x - step_size * dir(g))`` with ``dir`` the sign (Linf) or the
  L2-normalised estimate (L2). Probes are not clipped to the box. With ``early_stop`` the start
  and every new iterate are queried once and the example stops once it is adversarial.

  The paper's partial-information and label-only variants (target-class schedules, lr plateau
  decay) are not included.

  Settings. Ilyas et al. (query-limited, ImageNet): ``sigma=0.001, num_samples=25`` (50 queries
  per estimate), ``eps=0.05, step_size=0.01``, Linf. ``rmin2000/adv_tracing: attacks/nes.py``:
  L2, ``eps=1.0, step_size=0.01, sigma=0.01, num_samples=15``, CE loss, "10,000 loss queries"
  (30 per step). Its count leaves out the early-stop checks, and it tests ``queries < 10,000``
  before each step, so it runs 334 steps (10,020 loss queries). The same 334 steps here:
  ``max_queries=1 + 334 * 31`` (10,355) with ``early_stop=True``. Its estimate sums over pairs
  and divides by ``4 sigma``; the step direction is the same, because the L2 step normalises it.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example.
    eps: the radius of the ``norm`` ball; scalar or per-example.
    step_size: the PGD step in ``norm`` units; scalar or per-example.
    sigma: the search standard deviation; scalar or per-example.
    num_samples: antithetic pairs per estimate.
    max_queries: the query budget per example (scalar or per-example ints), or None.
    num_steps: optional cap on the number of steps.
    norm: ``"linf"`` or ``"l2"``.
    loss: ``"ce"`` (default, as both codes) or ``"margin"``.
    momentum: momentum on the gradient estimate (0 disables it).
    targeted: whether ``labels`` are targets.
    early_stop: query the start and each iterate; stop once adversarial.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"``.

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` counts PGD steps.

  References:
    Ilyas, Engstrom, Athalye, Lin, "Black-box Adversarial Attacks with Limited Queries and
    Information", ICML 2018. https://arxiv.org/abs/1804.08598
  """
  _check_common(x, labels, clip_min, clip_max, norm=norm, loss=loss)
  num_samples = _check_int(num_samples, "num_samples", minimum=1)
  if num_steps is not None:
    num_steps = _check_int(num_steps, "num_steps", minimum=0)
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  eps = base.per_example(eps, batch, "eps")
  step_size = base.per_example(step_size, batch, "step_size")
  sigma = base.per_example(sigma, batch, "sigma", allow_zero=False)
  budget = _budget(max_queries, batch)
  keys = base.example_keys(key, batch)
  cfg = _NESConfig(norm, loss, num_samples, float(momentum), early_stop, float(clip_min),
                   float(clip_max))
  start = int(early_stop)
  steps = _max_steps(budget, start, _nes_cost(cfg), num_steps)
  logits0 = _batch_logits(logits_fn, x) if early_stop else None
  state = _nes_init(cfg, x, labels, targeted, eps, step_size, sigma, keys, budget, logits0,
                    _steps_cap(num_steps))
  state = loop.run(_nes_step, logits_fn, cfg, state, steps, loop=loop_mode)
  return base.finalize(logits_fn, x, state.x_adv, labels, targeted=targeted,
                       iterations=state.iteration, queries=state.queries)


def _start_state(early_stop, eps, budget, cost, cap, logits0, labels, targeted):
  """Queries spent on the start point and who is active, shared by NES and Bandits.

  The start is queried (with ``early_stop``) only if at least one step can follow it.
  """
  can_move = (eps > 0) & (cap > 0)
  if early_stop:
    start = can_move & (budget >= 1 + cost)
    queries = start.astype(jnp.int32)
    active = start & ~base.is_success(logits0, labels, targeted)
  else:
    queries = jnp.zeros_like(budget)
    active = can_move & (cost <= budget)
  return queries, active


@functools.partial(xla.jit, static_argnums=(0, 3))
def _nes_init(cfg, x, labels, targeted, eps, step_size, sigma, keys, budget, logits0, cap):
  queries, active = _start_state(cfg.early_stop, eps, budget, _nes_cost(cfg), cap, logits0,
                                 labels, targeted)
  batch = x.shape[0]
  return _NESState(
      x_adv=x, x=x, label=labels, targeted=jnp.full((batch,), targeted), eps=eps,
      step_size=step_size, sigma=sigma, grad=jnp.zeros_like(x), key=keys, queries=queries,
      budget=budget, active=active, iteration=jnp.zeros((batch,), jnp.int32))


# ---------------------------------------------------------------------------- Bandits


class _BanditsConfig(NamedTuple):
  norm: str
  loss: str
  prior_size: int | None
  time_prior: bool
  convention: str
  early_stop: bool
  clip_min: float
  clip_max: float


class _BanditsState(NamedTuple):
  x_adv: jax.Array
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  eps: jax.Array
  image_lr: jax.Array
  online_lr: jax.Array
  exploration: jax.Array
  fd_eta: jax.Array
  prior: jax.Array
  key: jax.Array
  queries: jax.Array
  budget: jax.Array
  active: jax.Array
  iteration: jax.Array


def _bandits_cost(cfg: _BanditsConfig) -> int:
  return 2 + int(cfg.early_stop)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """torch ``Upsample(mode='nearest')`` source indices: ``floor(dst * in / out)``, in float32."""
  scale = np.float32(size_in) / np.float32(size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(idx, size_in - 1)


def _upsample(prior: jax.Array, shape) -> jax.Array:
  """Nearest-neighbour upsampling of one HWC prior to ``shape`` (the tiling / data prior)."""
  if prior.shape == tuple(shape):
    return prior
  rows = _nearest_indices(prior.shape[0], shape[0])
  cols = _nearest_indices(prior.shape[1], shape[1])
  return prior[rows][:, cols]


def _l2_unit(v: jax.Array) -> jax.Array:
  return projections.normalize_step(v, "l2")


def _eg_step(prior: jax.Array, grad: jax.Array, lr) -> jax.Array:
  """Exponentiated-gradient ascent on ``[-1, 1]``, in the numerically stable logistic form.

  ``r = (p + 1) / 2``; ``r' = r e^{lr g} / (r e^{lr g} + (1 - r) e^{-lr g})
  = sigmoid(logit(r) + 2 lr g)``; returns ``2 r' - 1``.
  """
  r = (prior + 1.0) / 2.0
  logit = jnp.log(r) - jnp.log1p(-r)
  return 2.0 * jax.nn.sigmoid(logit + 2.0 * lr * grad) - 1.0


def _bandits_step(logits_fn, cfg: _BanditsConfig, s: _BanditsState) -> _BanditsState:
  key, sub = jax.random.split(s.key)
  prior = s.prior if cfg.time_prior else jnp.zeros_like(s.prior)
  noise = jax.random.normal(sub, prior.shape, prior.dtype)
  if cfg.convention == "ilyas":
    u = s.exploration * noise / math.sqrt(prior.size)
    q1, q2 = prior + u, prior - u
  else:
    u = noise
    q1, q2 = prior + s.exploration * noise, prior - s.exploration * noise
  shape = s.x_adv.shape
  probes = jnp.stack([s.x_adv + s.fd_eta * _l2_unit(_upsample(q1, shape)),
                      s.x_adv + s.fd_eta * _l2_unit(_upsample(q2, shape))])
  # Ilyas et al. ascend the attacker's objective; ours is minus the loss we minimise.
  objective = -_probe_losses(logits_fn, cfg.loss, probes, s.label, s.targeted)
  est_grad = (objective[0] - objective[1]) / (s.fd_eta * s.exploration) * u
  if cfg.norm == "l2":
    prior = prior + s.online_lr * est_grad
  else:
    prior = _eg_step(prior, est_grad, s.online_lr)
  step = projections.normalize_step(_upsample(prior, shape), cfg.norm)
  x_adv = projections.project_and_clip(s.x_adv + s.image_lr * step, s.x, s.eps, cfg.norm,
                                       cfg.clip_min, cfg.clip_max)
  return _end_step(logits_fn, s, _bandits_cost(cfg), cfg.early_stop, x_adv=x_adv, prior=prior,
                   key=key)


def bandits(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    eps,
    norm: str = "linf",
    image_lr=None,
    online_lr=None,
    exploration=None,
    fd_eta=None,
    prior_size: int | None = None,
    time_prior: bool = True,
    convention: str = "ilyas",
    max_queries=10_000,
    num_steps: int | None = None,
    loss: str = "ce",
    targeted: bool = False,
    early_stop: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""Bandits_TD: gradient estimation with a time prior and a data (tiling) prior.

  The attacker keeps a prior ``v`` on the gradient at resolution ``prior_size`` (the data prior:
  nearby pixels share gradient; ``None`` keeps full resolution) and carries it over steps (the
  time prior). Each step, per example:

  1. Draw Gaussian exploration noise ``u`` and query the two points
     ``x + fd_eta * up(v +- u) / ||up(v +- u)||_2`` (2 queries; ``up`` is nearest-neighbour
     upsampling, as torch ``Upsample``).
  2. Update the prior with the two-point estimate
     ``g = (l_+ - l_-) / (fd_eta * exploration) * u`` of the objective's gradient: plain gradient
     ascent ``v + online_lr * g`` for L2, exponentiated gradients on ``[-1, 1]`` for Linf.
  3. Step the image: ``x + image_lr * sign(up(v))`` (Linf) or
     ``x + image_lr * up(v) / ||up(v)||_2`` (L2), project onto the ``eps``-ball and clip.
  4. With ``early_stop``, query the new iterate (1 query) and stop if adversarial; the start is
     also queried once.

  ``convention`` sets the noise scale. ``"ilyas"`` (``MadryLab/blackbox-bandits: src/main.py``):
  ``u = exploration * n / sqrt(dim(v))``, ``n ~ N(0, I)``. ``"blackboxbench"`` (the variant in
  ``rmin2000/adv_tracing: attacks/bandit.py``): ``u = n`` and the probes use ``v +- exploration *
  n``; the estimate still divides by ``fd_eta * exploration``.

  Queries. Ilyas et al. count 2 per step and leave out the success check of each iterate; here it
  is counted. The paper's budget of 10,000 (4,999 steps in their code) is ``max_queries=1 + 4999 *
  3`` with ``early_stop=True``. ``rmin2000/adv_tracing`` runs 5,000 steps: ``max_queries=15001``.

  Settings (``None`` picks the Linf or L2 value of the paper's ImageNet configs,
  ``src/configs/{linf,l2}.json``):

  ========  ====  ========  =========  ===========  ======  ==========
  norm      eps   image_lr  online_lr  exploration  fd_eta  prior_size
  ========  ====  ========  =========  ===========  ======  ==========
  linf      0.05  0.01      100        1.0          0.1     50 (299 px)
  l2        5.0   0.5       0.1        0.01         0.01    50
  ========  ====  ========  =========  ===========  ======  ==========

  Tracing (``rmin2000/adv_tracing``): ``norm="l2", eps=1.0, image_lr=0.01, online_lr=0.1,
  exploration=0.1, fd_eta=0.01, prior_size=20`` on 32x32, ``convention="blackboxbench"``, CE.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example.
    eps: the radius of the ``norm`` ball; scalar or per-example.
    norm: ``"linf"`` or ``"l2"``.
    image_lr: the image step size ``h``; scalar or per-example.
    online_lr: the prior learning rate ``eta``; scalar or per-example.
    exploration: the exploration scale ``delta``; scalar or per-example.
    fd_eta: the finite-difference probe size ``epsilon``; scalar or per-example.
    prior_size: prior height and width (the data prior), or None for full resolution.
    time_prior: keep the prior across steps (False resets it every step).
    convention: ``"ilyas"`` or ``"blackboxbench"`` noise scaling (see above).
    max_queries: the query budget per example (scalar or per-example ints), or None.
    num_steps: optional cap on the number of steps.
    loss: ``"ce"`` (default, as both codes) or ``"margin"``.
    targeted: whether ``labels`` are targets.
    early_stop: query the start and each iterate; stop once adversarial.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"``.

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` counts image steps.

  References:
    Ilyas, Engstrom, Madry, "Prior Convictions: Black-Box Adversarial Attacks with Bandits and
    Priors", ICLR 2019. https://arxiv.org/abs/1807.07978
  """
  _check_common(x, labels, clip_min, clip_max, norm=norm, loss=loss)
  checks.check_choice(convention, _CONVENTIONS, "convention")
  if num_steps is not None:
    num_steps = _check_int(num_steps, "num_steps", minimum=0)
  height, width = np.shape(x)[1:3]
  if prior_size is not None:
    prior_size = _check_int(prior_size, "prior_size", minimum=1)
    if prior_size > min(height, width):
      raise ValueError(f"prior_size must be <= the image size {min(height, width)}, got "
                       f"{prior_size}; use None for a full-resolution prior.")
  defaults = {"linf": (0.01, 100.0, 1.0, 0.1), "l2": (0.5, 0.1, 0.01, 0.01)}[norm]
  image_lr, online_lr, exploration, fd_eta = (
      d if v is None else v for v, d in zip((image_lr, online_lr, exploration, fd_eta), defaults,
                                      strict=True))
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  eps = base.per_example(eps, batch, "eps")
  image_lr = base.per_example(image_lr, batch, "image_lr")
  online_lr = base.per_example(online_lr, batch, "online_lr")
  exploration = base.per_example(exploration, batch, "exploration", allow_zero=False)
  fd_eta = base.per_example(fd_eta, batch, "fd_eta", allow_zero=False)
  budget = _budget(max_queries, batch)
  keys = base.example_keys(key, batch)
  cfg = _BanditsConfig(norm, loss, prior_size, time_prior, convention, early_stop,
                       float(clip_min), float(clip_max))
  steps = _max_steps(budget, int(early_stop), _bandits_cost(cfg), num_steps)
  logits0 = _batch_logits(logits_fn, x) if early_stop else None
  state = _bandits_init(cfg, x, labels, targeted, eps, image_lr, online_lr, exploration, fd_eta,
                        keys, budget, logits0, _steps_cap(num_steps))
  state = loop.run(_bandits_step, logits_fn, cfg, state, steps, loop=loop_mode)
  return base.finalize(logits_fn, x, state.x_adv, labels, targeted=targeted,
                       iterations=state.iteration, queries=state.queries)


@functools.partial(xla.jit, static_argnums=(0, 3))
def _bandits_init(cfg, x, labels, targeted, eps, image_lr, online_lr, exploration, fd_eta, keys,
                  budget, logits0, cap):
  queries, active = _start_state(cfg.early_stop, eps, budget, _bandits_cost(cfg), cap, logits0,
                                 labels, targeted)
  batch, height, width, channels = x.shape
  if cfg.prior_size is not None:
    height = width = cfg.prior_size
  return _BanditsState(
      x_adv=x, x=x, label=labels, targeted=jnp.full((batch,), targeted), eps=eps,
      image_lr=image_lr, online_lr=online_lr, exploration=exploration, fd_eta=fd_eta,
      prior=jnp.zeros((batch, height, width, channels), x.dtype), key=keys, queries=queries,
      budget=budget, active=active, iteration=jnp.zeros((batch,), jnp.int32))


# ---------------------------------------------------------------------------- SimBA


def dct_matrix(n: int, dtype=jnp.float32) -> jax.Array:
  r"""The orthonormal DCT-II matrix :math:`D` (rows are frequencies): ``y = D x``, ``x = D^T y``.

  :math:`D_{kj} = \sqrt{2/n}\, c_k \cos(\pi (2j + 1) k / (2n))` with :math:`c_0 = 1/\sqrt 2`,
  :math:`c_k = 1` otherwise; it equals ``scipy.fft.dct(np.eye(n), norm='ortho', axis=0)``.
  """
  k = jnp.arange(n, dtype=jnp.float32)[:, None]
  j = jnp.arange(n, dtype=jnp.float32)[None, :]
  mat = jnp.sqrt(2.0 / n) * jnp.cos(jnp.pi * (2.0 * j + 1.0) * k / (2.0 * n))
  mat = mat.at[0].multiply(1.0 / jnp.sqrt(2.0))
  return mat.astype(dtype)


def simba_order(key: jax.Array, shape, basis: str, freq_dim: int = 1,
                stride: int = 1) -> jax.Array:
  """The order in which SimBA tries basis directions for one example, int32 ``(H*W*C,)``.

  Indices are flat over ``(H, W, C)``: pixel ``(h, w, c)`` for ``"pixel"``, frequency
  ``(u, v, c)`` for ``"dct"``. Pixel order is a uniform random permutation. DCT order is Guo et
  al.'s strided block order: first the ``freq_dim x freq_dim`` lowest frequencies of every
  channel, then L-shaped bands ``stride`` frequencies wide, each band in uniform random order
  across positions and channels.

  Args:
    key: the example's PRNG key.
    shape: ``(H, W, C)``.
    basis: ``"pixel"`` or ``"dct"``.
    freq_dim: the side of the first low-frequency block (DCT).
    stride: the width of each further band (DCT).

  Returns:
    The direction indices, a permutation of ``range(H * W * C)``.
  """
  height, width, channels = shape
  size = height * width * channels
  if basis == "pixel":
    return jax.random.permutation(key, size).astype(jnp.int32)
  u = np.arange(height)[:, None, None]
  v = np.arange(width)[None, :, None]
  level = np.maximum(u, v) + np.zeros((1, 1, channels), np.int64)
  band = np.where(level < freq_dim, 0, 1 + (level - freq_dim) // stride).reshape(-1)
  # Random order within each band: sort by band, then by uniform noise.
  noise = jax.random.uniform(key, (size,))
  return jnp.lexsort((noise, jnp.asarray(band, jnp.int32))).astype(jnp.int32)


def _simba_direction(basis: str, index: jax.Array, shape, dtype) -> jax.Array:
  """The unit-norm basis image for a flat direction index."""
  height, width, channels = shape
  if basis == "pixel":
    return jax.nn.one_hot(index, height * width * channels, dtype=dtype).reshape(shape)
  u = index // (width * channels)
  v = (index // channels) % width
  c = index % channels
  plane = dct_matrix(height, dtype)[u][:, None] * dct_matrix(width, dtype)[v][None, :]
  return plane[:, :, None] * jax.nn.one_hot(c, channels, dtype=dtype)


class _SimBAConfig(NamedTuple):
  basis: str
  early_stop: bool
  clip_min: float
  clip_max: float


class _SimBAState(NamedTuple):
  delta: jax.Array  # accumulated perturbation; the iterate is clip(x + delta)
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  step_size: jax.Array
  order: jax.Array
  prob: jax.Array  # probability of the label at the iterate
  cap: jax.Array  # most tries allowed (num_iters)
  queries: jax.Array
  budget: jax.Array
  active: jax.Array
  iteration: jax.Array


def _label_prob(logits: jax.Array, label: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits, axis=-1)[..., label]


def _simba_step(logits_fn, cfg: _SimBAConfig, s: _SimBAState) -> _SimBAState:
  index = s.order[s.iteration % s.order.shape[0]]
  q = s.step_size * _simba_direction(cfg.basis, index, s.x.shape, s.x.dtype)
  candidates = jnp.stack([s.delta - q, s.delta + q])
  # Both probes are computed (vmapped code cannot branch per example); the second one is a
  # query only when the first did not improve, and only then is its output used.
  logits = logits_fn(jnp.clip(s.x + candidates, cfg.clip_min, cfg.clip_max))
  probs = _label_prob(logits, s.label)

  def improves(p):
    return jnp.where(s.targeted, p > s.prob, p < s.prob)

  left = improves(probs[0])
  try_right = ~left & (s.queries + 2 <= s.budget)
  right = try_right & improves(probs[1])
  accepted = left | right
  pick = jnp.where(left, 0, 1)
  delta = jnp.where(accepted, candidates[pick], s.delta)
  prob = jnp.where(accepted, probs[pick], s.prob)
  queries = s.queries + 1 + try_right.astype(jnp.int32)
  active = s.active & (queries < s.budget) & (s.iteration + 1 < s.cap)
  if cfg.early_stop:
    active = active & ~(accepted & base.is_success(logits[pick], s.label, s.targeted))
  return _same_types(s._replace(delta=delta, prob=prob, queries=queries, active=active), s)


def simba(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    step_size=0.2,
    basis: str = "pixel",
    max_queries=10_000,
    num_iters: int | None = None,
    freq_dim: int | None = None,
    stride: int = 1,
    targeted: bool = False,
    early_stop: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""SimBA: greedy coordinate search over an orthonormal basis, on output probabilities.

  Per example, with the order from :func:`simba_order` (random per example, from its key):
  query the start (1 query); then for each direction ``q`` in turn try ``x - step_size * q``
  (1 query) and keep it if the label's probability drops (rises for a targeted attack);
  otherwise try ``x + step_size * q`` (1 more query) and keep that if it improves. Each try costs
  1 or 2 queries, counted exactly; a try that would need a second query beyond the budget ends
  after the first. The perturbation accumulates in basis space and the iterate is
  ``clip(x + delta)``, as in Guo et al.'s batched code. Every accepted iterate was just queried,
  so early stopping on success costs no extra query. After ``H*W*C`` tries the order repeats.

  ``basis="pixel"`` is SimBA-pixel (standard basis); ``basis="dct"`` is SimBA-DCT (the 2-D
  orthonormal DCT-II basis over the whole image, per channel, tried low frequencies first).
  There is no norm bound: within one pass over the basis,
  ``||x_adv - x||_2 <= step_size * sqrt(accepted tries)``; ``info.l2`` / ``info.linf`` report it.

  Differences from ART 1.10.3 (used by ``rmin2000/adv_tracing``): ART queries both sides every
  iteration (2 queries) and keeps the better one, updates the image in place with clipping at
  every step, and redraws the order after each pass. Here the order of the paper's
  ``simba_single`` is followed (left first, right only if needed).

  Settings. Guo et al. (ImageNet): ``step_size=0.2``, pixel or DCT with ``freq_dim=28`` (1/8 of
  224), ``stride=7``. Tracing (ART defaults): ``step_size=0.1, num_iters=3000,
  max_queries=None``, pixel (or DCT with ``freq_dim=4, stride=1``), labels = the model's
  predictions.

  Args:
    logits_fn: batched model, NHWC images to logits (SimBA uses their softmax).
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example.
    step_size: the step along each basis direction (the paper's epsilon); scalar or per-example.
    basis: ``"pixel"`` or ``"dct"``.
    max_queries: the query budget per example, including the start query (scalar or
      per-example ints), or None.
    num_iters: optional cap on the number of tries.
    freq_dim: the low-frequency block tried first (DCT); None: ``max(1, round(min(H, W) / 8))``.
    stride: the band width after the first block (DCT).
    targeted: whether ``labels`` are targets.
    early_stop: stop an example as soon as an accepted iterate is adversarial.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"``.

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` counts tries (directions).

  References:
    Guo, Gardner, You, Wilson, Weinberger, "Simple Black-box Adversarial Attacks", ICML 2019.
    https://arxiv.org/abs/1905.07121
  """
  _check_common(x, labels, clip_min, clip_max)
  checks.check_choice(basis, _BASES, "basis")
  if num_iters is not None:
    num_iters = _check_int(num_iters, "num_iters", minimum=0)
  stride = _check_int(stride, "stride", minimum=1)
  height, width = np.shape(x)[1:3]
  if freq_dim is None:
    freq_dim = max(1, round(min(height, width) / 8))
  freq_dim = _check_int(freq_dim, "freq_dim", minimum=1)
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  step_size = base.per_example(step_size, batch, "step_size")
  budget = _budget(max_queries, batch)
  keys = base.example_keys(key, batch)
  cfg = _SimBAConfig(basis, early_stop, float(clip_min), float(clip_max))
  steps = _max_steps(budget, 1, 1, num_iters)
  logits0 = _batch_logits(logits_fn, x)
  state = _simba_init(cfg, x, labels, targeted, step_size, keys, budget, logits0,
                      _steps_cap(num_iters), freq_dim, stride)
  state = loop.run(_simba_step, logits_fn, cfg, state, steps, loop=loop_mode)
  x_adv = jnp.clip(x + state.delta, clip_min, clip_max)
  return base.finalize(logits_fn, x, x_adv, labels, targeted=targeted,
                       iterations=state.iteration, queries=state.queries)


@functools.partial(xla.jit, static_argnums=(0, 3, 9, 10))
def _simba_init(cfg, x, labels, targeted, step_size, keys, budget, logits0, cap, freq_dim,
                stride):
  batch = x.shape[0]
  order = jax.vmap(lambda k: simba_order(k, x.shape[1:], cfg.basis, freq_dim, stride))(keys)
  # The start query is made only if at least one try can follow it.
  start = (step_size > 0) & (cap > 0) & (budget >= 2)
  queries = start.astype(jnp.int32)
  active = start
  if cfg.early_stop:
    active = active & ~base.is_success(logits0, labels, targeted)
  return _SimBAState(
      delta=jnp.zeros_like(x), x=x, label=labels, targeted=jnp.full((batch,), targeted),
      step_size=step_size, order=order, prob=jax.vmap(_label_prob)(logits0, labels),
      cap=jnp.full((batch,), cap, jnp.int32),
      queries=queries, budget=budget, active=active, iteration=jnp.zeros((batch,), jnp.int32))
