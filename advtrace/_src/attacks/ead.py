r"""EAD: elastic-net attack by FISTA (ISTA with momentum), binary search over ``c``.

.. math::
  \min_{x' \in [c_{min}, c_{max}]^d} \; c \cdot f(x') + \|x' - x\|_2^2 + \beta \|x' - x\|_1

The smooth part :math:`g(x') = c f(x') + \|x' - x\|_2^2` takes gradient steps on a slack
variable :math:`y`; the L1 term and the box are handled by the projected shrinkage
:math:`S_\beta` (soft thresholding of :math:`x' - x` by :math:`\beta`, then clipping):

.. math::
  x^{k+1} = S_\beta\big(y^k - \alpha_k \nabla g(y^k)\big), \quad
  y^{k+1} = x^{k+1} + \tfrac{k}{k+3} (x^{k+1} - x^k), \quad
  \alpha_k = \alpha_0 (1 - k/K)^{1/2}.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import binary_search
from advtrace._src.attacks import loop
from advtrace._src.attacks import losses

DECISION_RULES = ("en", "l1")


class _Config(NamedTuple):
  rule: str
  abort_tol: float
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x_k: jax.Array  # the last ISTA iterate (what gets judged and returned)
  y: jax.Array  # the slack variable the gradient is taken at
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  const: jax.Array
  kappa: jax.Array
  beta: jax.Array
  lr: jax.Array
  max_iterations: jax.Array  # K of the step-size decay
  abort_every: jax.Array  # check for early abort every this many steps; 0 disables it
  prev_loss: jax.Array
  best_x: jax.Array
  best_dist: jax.Array
  round_success: jax.Array
  active: jax.Array
  iteration: jax.Array


def shrink(z: jax.Array, x: jax.Array, beta: jax.Array, clip_min: float,
           clip_max: float) -> jax.Array:
  """EAD's projected shrinkage-thresholding :math:`S_\\beta` of ``z`` around ``x``, in the box."""
  d = z - x
  return jnp.clip(x + jnp.sign(d) * jnp.maximum(jnp.abs(d) - beta, 0.0), clip_min, clip_max)


def _smooth_loss(logits_fn, s: _State, y):
  logits = base.single_logits(logits_fn, y)
  return jnp.sum(jnp.square(y - s.x)) + s.const * losses.margin(
      logits, s.label, s.targeted, s.kappa)


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  grad = jax.grad(lambda y: _smooth_loss(logits_fn, s, y))(s.y)
  k = s.iteration.astype(jnp.float32)
  lr = s.lr * jnp.sqrt(jnp.maximum(1.0 - k / s.max_iterations, 0.0))
  x_new = shrink(s.y - lr * grad, s.x, s.beta, cfg.clip_min, cfg.clip_max)
  y_new = x_new + k / (k + 3.0) * (x_new - s.x_k)

  logits = base.single_logits(logits_fn, x_new)
  delta = x_new - s.x
  l1, l2sq = jnp.sum(jnp.abs(delta)), jnp.sum(jnp.square(delta))
  f = losses.margin(logits, s.label, s.targeted, s.kappa)
  success = binary_search.confident_success(logits, s.label, s.targeted, s.kappa)
  dist = s.beta * l1 + l2sq if cfg.rule == "en" else l1
  best_x, best_dist, round_success = binary_search.record(
      s.best_x, s.best_dist, s.round_success, x_new, dist, success)

  active, prev_loss = s.active, s.prev_loss
  loss = s.const * f + l2sq + s.beta * l1
  check = (s.abort_every > 0) & (s.iteration % jnp.maximum(s.abort_every, 1) == 0)
  active = active & ~(check & (loss > prev_loss * (1.0 - cfg.abort_tol)))
  prev_loss = jnp.where(check, loss, prev_loss)
  return s._replace(x_k=x_new, y=y_new, prev_loss=prev_loss, best_x=best_x, best_dist=best_dist,
                    round_success=round_success, active=active)


@xla.jit
def _init_state(x, labels, targeted, const, kappa, beta, lr, max_iterations, abort_every, best_x,
                best_dist) -> _State:
  batch = x.shape[0]
  return _State(
      x_k=x, y=x, x=x, label=labels, targeted=targeted, const=const, kappa=kappa, beta=beta,
      lr=lr, max_iterations=jnp.broadcast_to(max_iterations, (batch,)),
      abort_every=jnp.broadcast_to(abort_every, (batch,)),
      prev_loss=jnp.full((batch,), jnp.inf, jnp.float32), best_x=best_x, best_dist=best_dist,
      round_success=jnp.zeros((batch,), bool), active=jnp.ones((batch,), bool),
      iteration=jnp.zeros((batch,), jnp.int32))


def ead(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    targeted: bool = False,
    beta=1e-3,
    decision_rule: str = "en",
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
  r"""Elastic-net attack (EAD), a minimal-perturbation attack with L1 + L2 distortion.

  FISTA as in the paper (module docstring): a gradient step on the smooth part at the slack
  ``y``, the projected shrinkage :math:`S_\beta` (threshold :math:`\beta`, as in the paper and
  the authors' code, not :math:`\alpha_k \beta`), momentum :math:`k/(k+3)`, and the
  square-root decay of the step size. Each iterate :math:`x^{k+1}` that is adversarial with
  confidence ``kappa`` is kept if it has the smallest decision distance so far: elastic net
  :math:`\beta \|\delta\|_1 + \|\delta\|_2^2` (``"en"``) or :math:`\|\delta\|_1` (``"l1"``).
  ``c`` follows CW's binary search per example (``binary_search.py``). An example never found
  adversarial returns ``x`` with ``success=False``.

  Early abort (authors' code): every ``max_iterations // 10`` steps an example stops its round
  when its objective at :math:`x^{k+1}` has not fallen below 0.9999 times its value at the
  previous check.

  Settings: the defaults are the authors' code. DEEPSEC: ``beta=1e-3, decision_rule="en",
  learning_rate=0.02, max_iterations=10000, initial_const=1e-3, kappa=0`` and 5 binary steps
  (code default; Table VII says 10), no early abort; Table VIII: 20 binary steps, lr 0.5,
  500 iterations. DEEPSEC's EAD keeps the step size constant (no decay), returns zeros for a
  failure and has the bisection bug of ``binary_search.py``; none of that is reproduced. The
  authors' code uses momentum :math:`(k+1)/(k+4)` (its step counter is incremented before the
  momentum is read); this follows the paper's :math:`k/(k+3)`.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: unused (the attack is deterministic); accepted for the common signature.
    targeted: whether ``labels`` are targets.
    beta: the L1 weight and shrinkage threshold (>= 0); scalar or per-example.
    decision_rule: ``"en"`` or ``"l1"``, the distance that picks the best example.
    initial_const: ``c`` of the first round (> 0); scalar or per-example.
    kappa: confidence margin (>= 0); scalar or per-example.
    learning_rate: the initial step size :math:`\alpha_0`; scalar or per-example.
    binary_search_steps: rounds of the search over ``c`` (0 returns ``x``).
    max_iterations: FISTA steps per round, also the ``K`` of the step-size decay (0 returns
      ``x``).
    abort_early: stop an example's round when its objective stalls.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.queries`` counts two model evaluations per step (a
    forward and backward pass at ``y``, a forward pass at the new iterate).

  References:
    Chen, Sharma, Zhang, Yi, Hsieh, "EAD: Elastic-Net Attacks to Deep Neural Networks via
    Adversarial Examples", AAAI 2018. https://arxiv.org/abs/1709.04114
  """
  del key
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  binary_search.check_search_args(binary_search_steps, max_iterations)
  if decision_rule not in DECISION_RULES:
    raise ValueError(f"Unknown decision_rule {decision_rule!r}. Valid choices: "
                     f"{', '.join(DECISION_RULES)}.")
  loop.resolve_loop(loop_mode)
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  beta = base.per_example(beta, batch, "beta")
  kappa = base.per_example(kappa, batch, "kappa")
  lr = base.per_example(learning_rate, batch, "learning_rate", allow_zero=False)
  initial_const = base.per_example(initial_const, batch, "initial_const", allow_zero=False)
  cfg = _Config(decision_rule, 1e-4, float(clip_min), float(clip_max))
  # Budgets live in the state rather than the config, so that they share one compiled step.
  budget = jnp.float32(max(max_iterations, 1))
  abort_every = jnp.int32(max_iterations // 10 if abort_early else 0)

  targeted_arr = jnp.full((batch,), bool(targeted))

  def run_round(const, best: binary_search.Best) -> binary_search.RoundResult:
    state = _init_state(x, labels, targeted_arr, const, kappa, beta, lr, budget, abort_every,
                        best.x_adv, best.dist)
    state = loop.run(_step, logits_fn, cfg, state, max_iterations, loop=loop_mode)
    return binary_search.RoundResult(
        binary_search.Best(state.best_x, state.best_dist, best.found | state.round_success),
        state.round_success, state.iteration, 2 * state.iteration)

  best, iterations, queries = binary_search.search(
      run_round, x, initial_const, binary_search_steps)
  return binary_search.finish(logits_fn, x, best, labels, targeted=bool(targeted),
                              iterations=iterations, queries=queries)
