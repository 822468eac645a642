"""The outer binary search over the trade-off constant ``c`` shared by CW-L2, EAD, BLB and OM.

These attacks minimise ``dist(x', x) + c * loss(x')`` for a per-example constant ``c`` and keep,
per example, the closest successful ``x'`` seen in any round. Between rounds ``c`` moves per
example with Carlini & Wagner's rule:

- success in the round: ``upper = min(upper, c)``, ``c = (lower + upper) / 2``;
- failure: ``lower = max(lower, c)``, then ``c = (lower + upper) / 2`` if an upper bound is known,
  else ``c = 10 c``.

``c`` weights the attack loss in all four objectives, so success always lowers ``c``.

Each round is a batched, jitted inner optimisation (``loop.run``) whose per-example state carries
the best point so far; the rounds are a Python loop, so a round never retraces. The per-step
helpers here (:func:`confident_success`, :func:`record`) are written for one example.

DEEPSEC's search (``Attacks/AttackMethods/{CW2,EAD,OptMargin,BLB}.py``) has a bug in the failure
branch: ``const_origin = (c_lower_bound[i] + c_upper_bound[i]) / 2.0`` assigns a *scalar* to the
whole constant array, so one failing example with a known upper bound resets ``c`` for every
example in the batch. It is not reproduced here: every example's ``c`` moves on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import losses

UPPER_INIT = 1e10  # "no upper bound known yet"


class Best(NamedTuple):
  """The best successful point per example over all rounds so far.

  Attributes:
    x_adv: the point (``x`` itself while none was found), shape ``(B, ...)``.
    dist: its decision distance (``inf`` while none was found), float32[B].
    found: whether any successful point was found, bool[B].
  """
  x_adv: jax.Array
  dist: jax.Array
  found: jax.Array


class RoundResult(NamedTuple):
  """What one inner optimisation reports back to :func:`search`."""
  best: Best
  success: jax.Array  # bool[B]: some point of this round succeeded (drives the c update)
  iterations: jax.Array  # int32[B]
  queries: jax.Array  # int32[B]


RoundFn = Callable[[jax.Array, Best], RoundResult]


def confident_success(logits: jax.Array, label: jax.Array, targeted, kappa) -> jax.Array:
  """One example's success with confidence ``kappa``, as in CW's ``compare`` (strict).

  Untargeted: ``z_y + kappa < max_{i != y} z_i``; targeted: ``z_t - kappa > max_{i != t} z_i``.
  With ``kappa = 0`` this implies plain (argmax) success.
  """
  return losses.margin(logits, label, targeted, jnp.inf) < -kappa


def record(best_x: jax.Array, best_dist: jax.Array, round_success: jax.Array,
           candidate: jax.Array, dist: jax.Array, success: jax.Array):
  """One example: keep ``candidate`` if it succeeds and is closer; note any success this round."""
  better = success & (dist < best_dist)
  return (jnp.where(better, candidate, best_x), jnp.where(better, dist, best_dist),
          round_success | success)


@xla.jit
def update_const(const: jax.Array, lower: jax.Array, upper: jax.Array, success: jax.Array):
  """Carlini & Wagner's per-example update of ``c`` after a round (see the module docstring).

  Args:
    const: the constants used in the round, float32[B].
    lower: the largest constants known to fail, float32[B].
    upper: the smallest constants known to succeed (``UPPER_INIT`` if none), float32[B].
    success: whether the round found a successful point, bool[B].

  Returns:
    ``(const, lower, upper)`` for the next round.
  """
  upper = jnp.where(success, jnp.minimum(upper, const), upper)
  lower = jnp.where(success, lower, jnp.maximum(lower, const))
  bisect = (lower + upper) / 2
  const = jnp.where(success | (upper < UPPER_INIT), bisect, const * 10)
  return const, lower, upper


def search(run_round: RoundFn, x: jax.Array, initial_const: jax.Array,
           binary_search_steps: int) -> tuple[Best, jax.Array, jax.Array]:
  """Runs ``binary_search_steps`` rounds of ``run_round`` and the per-example search over ``c``.

  Args:
    run_round: ``run_round(const, best) -> RoundResult``, one batched inner optimisation that
      starts from ``best`` and returns it updated.
    x: the clean batch (the starting ``best.x_adv``).
    initial_const: ``c`` for the first round, float32[B].
    binary_search_steps: the number of rounds (0 returns ``x`` as not found).

  Returns:
    ``(best, iterations, queries)``, the work summed over the rounds.
  """
  batch = x.shape[0]
  const = initial_const
  lower = jnp.zeros((batch,), jnp.float32)
  upper = jnp.full((batch,), UPPER_INIT, jnp.float32)
  best = Best(x, jnp.full((batch,), jnp.inf, jnp.float32), jnp.zeros((batch,), bool))
  iterations = jnp.zeros((batch,), jnp.int32)
  queries = jnp.zeros((batch,), jnp.int32)
  for step in range(binary_search_steps):
    result = run_round(const, best)
    best = result.best
    iterations = iterations + result.iterations
    queries = queries + result.queries
    const, lower, upper = update_const(const, lower, upper, result.success)
    if not isinstance(best.found, jax.core.Tracer):  # progress of long eager runs
      logging.info("binary search round %d/%d: %d/%d examples found, %.0f iterations on "
                   "average this round.", step + 1, binary_search_steps,
                   int(jnp.sum(best.found)), batch, float(jnp.mean(result.iterations)))
  return best, iterations, queries


@xla.jit
def _select(x, x_adv, keep):
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x_adv, x)


def finish(logits_fn: base.LogitsFn, x: jax.Array, best: Best, labels: jax.Array, *,
           targeted: bool, iterations, queries) -> base.AttackOutput:
  """Returns the best points, and ``x`` where none was found.

  The points were judged per example inside the optimisation; the batched model can differ in
  the last bits, so a point found exactly on the decision boundary may not be adversarial to the
  batched call. Such an example counts as a failure and returns ``x``, so that a failed example
  is always ``x`` with ``success=False`` (this extra forward pass is not counted as a query).
  """
  confirmed = best.found & base.finalize(
      logits_fn, x, best.x_adv, labels, targeted=targeted, iterations=iterations,
      queries=queries).info.success
  x_adv = _select(x, best.x_adv, confirmed)
  return base.finalize(logits_fn, x, x_adv, labels, targeted=targeted,
                       iterations=iterations, queries=queries)


def check_search_args(binary_search_steps: int, max_iterations: int) -> None:
  """Validates the two integer budgets shared by these attacks."""
  for name, value in (("binary_search_steps", binary_search_steps),
                      ("max_iterations", max_iterations)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
