r"""Carlini-Wagner L2: Adam on a tanh-reparametrised image, binary search over ``c``.

.. math::
  \min_w \; \|x'(w) - x\|_2^2 + c \cdot f(x'(w)), \qquad
  x'(w) = m + h \tanh(w), \; m = \tfrac{c_{max} + c_{min}}{2}, \; h = \tfrac{c_{max} - c_{min}}{2}

with :math:`f` the margin loss of ``losses.margin`` (confidence :math:`\kappa`). The change of
variables keeps every iterate inside the box without projection.

The inner optimisation here also serves OptMargin (``optmargin.py``): there the loss sums
:math:`f` over fixed noisy copies of :math:`x'`. For CW the state's ``noise`` is None and each
step is exactly one forward and one backward pass per example.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import binary_search
from advtrace._src.attacks import loop
from advtrace._src.attacks import losses

_TANH_SCALE = 1.0 - 1e-6  # keeps arctanh finite at the box edges (CW use 0.999999)


class _Config(NamedTuple):
  abort_tol: float
  all_copies: bool  # OptMargin: judge an iterate by all its copies, not only the point
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  w: jax.Array
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  const: jax.Array
  kappa: jax.Array
  lr: jax.Array
  abort_every: jax.Array  # check for early abort every this many steps; 0 disables it
  noise: jax.Array | None  # OptMargin's (copies, ...) offsets, the last one zero; None for CW
  opt_state: optax.OptState
  prev_loss: jax.Array
  best_x: jax.Array
  best_dist: jax.Array
  round_success: jax.Array
  active: jax.Array
  iteration: jax.Array


def to_tanh_space(x: jax.Array, clip_min: float, clip_max: float) -> jax.Array:
  """``w`` with ``from_tanh_space(w) ~= x`` (up to the factor 1 - 1e-6 that keeps it finite)."""
  mid, half = (clip_max + clip_min) / 2, (clip_max - clip_min) / 2
  return jnp.arctanh(jnp.clip((x - mid) / half, -1.0, 1.0) * _TANH_SCALE)


def from_tanh_space(w: jax.Array, clip_min: float, clip_max: float) -> jax.Array:
  """The image ``m + h tanh(w)``, clipped against rounding at the box edges."""
  mid, half = (clip_max + clip_min) / 2, (clip_max - clip_min) / 2
  return jnp.clip(mid + half * jnp.tanh(w), clip_min, clip_max)


def _objective(logits_fn, cfg: _Config, s: _State, w):
  x_adv = from_tanh_space(w, cfg.clip_min, cfg.clip_max)
  if s.noise is None:
    logits = base.single_logits(logits_fn, x_adv)[None]
  else:
    logits = logits_fn(jnp.clip(x_adv[None] + s.noise, cfg.clip_min, cfg.clip_max))
  f = jax.vmap(losses.margin, (0, None, None, None))(logits, s.label, s.targeted, s.kappa)
  dist = jnp.sum(jnp.square(x_adv - s.x))
  return dist + s.const * jnp.sum(f), (x_adv, logits, dist)


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  (loss, (x_adv, logits, dist)), grad = jax.value_and_grad(
      lambda w: _objective(logits_fn, cfg, s, w), has_aux=True)(s.w)
  # Judge the point the gradient was taken at (the pre-update iterate), as the reference does.
  success = jax.vmap(binary_search.confident_success, (0, None, None, None))(
      logits, s.label, s.targeted, s.kappa)
  success = jnp.all(success) if cfg.all_copies else success[-1]
  best_x, best_dist, round_success = binary_search.record(
      s.best_x, s.best_dist, s.round_success, x_adv, dist, success)
  updates, opt_state = optax.adam(s.lr).update(grad, s.opt_state)
  active, prev_loss = s.active, s.prev_loss
  check = (s.abort_every > 0) & (s.iteration % jnp.maximum(s.abort_every, 1) == 0)
  active = active & ~(check & (loss > prev_loss * (1.0 - cfg.abort_tol)))
  prev_loss = jnp.where(check, loss, prev_loss)
  return s._replace(w=s.w + updates, opt_state=opt_state, prev_loss=prev_loss, best_x=best_x,
                    best_dist=best_dist, round_success=round_success, active=active)


@functools.partial(xla.jit, static_argnums=0)
def _init_state(cfg: _Config, x, labels, targeted, const, kappa, lr, abort_every, noise, best_x,
                best_dist) -> _State:
  batch = x.shape[0]
  w0 = to_tanh_space(x, cfg.clip_min, cfg.clip_max)
  return _State(
      w=w0, x=x, label=labels, targeted=targeted, const=const, kappa=kappa, lr=lr,
      abort_every=jnp.broadcast_to(abort_every, (batch,)), noise=noise,
      opt_state=jax.vmap(optax.adam(1.0).init)(w0),
      prev_loss=jnp.full((batch,), jnp.inf, jnp.float32), best_x=best_x, best_dist=best_dist,
      round_success=jnp.zeros((batch,), bool), active=jnp.ones((batch,), bool),
      iteration=jnp.zeros((batch,), jnp.int32))


def tanh_attack(logits_fn: base.LogitsFn, x: jax.Array, labels: jax.Array, *, targeted: bool,
                initial_const: jax.Array, kappa: jax.Array, learning_rate: jax.Array,
                binary_search_steps: int, max_iterations: int, abort_early: bool,
                noise: jax.Array | None, clip_min: float, clip_max: float,
                loop_mode: str, all_copies: bool = False,
                abort_tol: float = 1e-4) -> base.AttackOutput:
  """The shared CW-L2 / OptMargin driver on validated inputs (per-example arrays of shape (B,)).

  ``noise`` is None for CW-L2, or OptMargin's per-example offsets of shape ``(B, copies, ...)``
  whose last copy is zero (the point itself). An iterate is judged by that last copy, or by all
  copies if ``all_copies``.
  """
  batch = x.shape[0]
  copies = 1 if noise is None else noise.shape[1]
  cfg = _Config(float(abort_tol), bool(all_copies), float(clip_min), float(clip_max))
  # In the state rather than the config, so that budgets share one compiled step.
  abort_every = jnp.int32(max_iterations // 10 if abort_early else 0)
  targeted_arr = jnp.full((batch,), targeted)

  def run_round(const, best: binary_search.Best) -> binary_search.RoundResult:
    state = _init_state(cfg, x, labels, targeted_arr, const, kappa, learning_rate, abort_every,
                        noise, best.x_adv, best.dist)
    state = loop.run(_step, logits_fn, cfg, state, max_iterations, loop=loop_mode,
                     rows_per_example=copies)
    return binary_search.RoundResult(
        binary_search.Best(state.best_x, state.best_dist, best.found | state.round_success),
        state.round_success, state.iteration, state.iteration * copies)

  best, iterations, queries = binary_search.search(
      run_round, x, initial_const, binary_search_steps)
  return binary_search.finish(logits_fn, x, best, labels, targeted=targeted,
                              iterations=iterations, queries=queries)


def cw_l2(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    targeted: bool = False,
    initial_const=1e-3,
    kappa=0.0,
    learning_rate=1e-2,
    binary_search_steps: int = 9,
    max_iterations: int = 10000,
    abort_early: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""Carlini & Wagner's L2 attack (DEEPSEC's CW2), a minimal-perturbation attack.

  For each of ``binary_search_steps`` rounds, Adam runs ``max_iterations`` steps on ``w`` from
  ``w = arctanh(x)`` (see the module docstring); every iterate that is adversarial with
  confidence ``kappa`` and closer than the best so far becomes the example's answer. Between
  rounds ``c`` moves per example by CW's rule (``binary_search.py``). An example never found
  adversarial returns ``x`` with ``success=False``.

  Early abort (CW): every ``max_iterations // 10`` steps an example stops its round when its
  loss has not fallen below 0.9999 times the value at the previous check.

  Settings: the defaults are CW's reference code. DEEPSEC (Table VII): ``binary_search_steps=10,
  learning_rate=0.02, max_iterations=10000, initial_const=1e-3, kappa=0`` with no early abort
  (``abort_early=False``); Table VIII: 20 binary steps, lr 0.1, 500 iterations, c0 1e-3.
  Differences from DEEPSEC: a failure returns ``x`` (DEEPSEC returns zeros), the distance is
  measured to ``x`` rather than to ``tanh(arctanh(x))``, and ``c`` is updated per example
  without DEEPSEC's bisection bug (``binary_search.py``). Unlike CW's reference code, the last
  of 10 or more rounds is not rerun at the smallest successful ``c`` (DEEPSEC does not either).

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: unused (the attack is deterministic); accepted for the common signature.
    targeted: whether ``labels`` are targets.
    initial_const: ``c`` of the first round (> 0); scalar or per-example.
    kappa: confidence margin (>= 0); scalar or per-example.
    learning_rate: Adam's step size; scalar or per-example.
    binary_search_steps: rounds of the search over ``c`` (0 returns ``x``).
    max_iterations: Adam steps per round (0 returns ``x``).
    abort_early: stop an example's round when its loss stalls.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` and ``info.queries`` are the Adam steps
    over all rounds (one forward and backward pass each).

  References:
    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.
    https://arxiv.org/abs/1608.04644
  """
  del key
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  binary_search.check_search_args(binary_search_steps, max_iterations)
  loop.resolve_loop(loop_mode)
  x = jnp.asarray(x)
  batch = x.shape[0]
  return tanh_attack(
      logits_fn, x, jnp.asarray(labels, jnp.int32), targeted=bool(targeted),
      initial_const=base.per_example(initial_const, batch, "initial_const", allow_zero=False),
      kappa=base.per_example(kappa, batch, "kappa"),
      learning_rate=base.per_example(learning_rate, batch, "learning_rate", allow_zero=False),
      binary_search_steps=binary_search_steps, max_iterations=max_iterations,
      abort_early=bool(abort_early), noise=None, clip_min=clip_min, clip_max=clip_max,
      loop_mode=loop_mode)
