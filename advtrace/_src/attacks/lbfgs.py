r"""Box-constrained L-BFGS (Szegedy et al.; DEEPSEC's BLB), binary search over ``c``.

.. math::
  \min_{x' \in [c_{min}, c_{max}]^d} \; \|x' - x\|_2^2 + c \cdot \mathrm{CE}(x', t)

This is the objective of DEEPSEC's ``BLB.py`` (``loss = l2dist + c * CE``; its comment's
``c|r| + loss_f`` is Szegedy's notation, where the constant weights the distance). Here ``c``
weights the attack loss, as in CW-L2, EAD and OM, so success lowers ``c`` with the shared rule
of ``binary_search.py``; in Szegedy's notation (:math:`c_S = 1/c`) success raises :math:`c_S`.

The optimiser is a projected L-BFGS, per example (vmapped). Each ``loop.run`` step evaluates
the objective once (one line-search trial), so no network pass runs inside a nested ``while``:

1. variables at a bound whose gradient points out of the box are fixed (the active set);
2. the L-BFGS two-loop recursion (``memory_size`` pairs, initial scaling
   :math:`s^\top y / y^\top y`) on the free variables gives the direction;
3. a backtracking (halving) Armijo search along the *projected* path
   :math:`x(\alpha) = \Pi_{box}(x + \alpha d)`, sufficient decrease measured with
   :math:`g^\top (x(\alpha) - x)`; the first iteration starts at
   :math:`\alpha = \min(1, 1/\|g\|)`;
4. a pair is stored only if :math:`s^\top y > 0` (the network makes the problem non-convex).

An example stops when its projected gradient :math:`\|\Pi(x - g) - x\|_\infty` falls below
``pgtol``, its objective stops decreasing (relative ``ftol``), or a line search fails twice in a
row (the memory is reset after the first failure).

Why this and how it differs from L-BFGS-B (Byrd, Lu, Nocedal, Zhu 1995): iterates stay feasible
and the box is exact, with no reparametrisation: a tanh change of variables (as in CW) makes
pixels at 0 or 1, most of an MNIST image, nearly immovable for a quasi-Newton method, since
their gradients shrink by ~1e-6. L-BFGS-B computes a generalised Cauchy point along the
projected steepest-descent path and then minimises the quadratic model over the free
variables, with a More-Thuente line search satisfying the Wolfe conditions; this code instead
fixes the active set up front, applies the L-BFGS matrix to the masked gradient, and uses a
projected Armijo backtracking. Both respect the box exactly; L-BFGS-B may change the active set
faster. DEEPSEC itself uses neither: it runs ``torch.optim.LBFGS`` (unit step, no line search,
history 100) on ``clamp(x + r)``, one optimiser for the *summed* loss of the whole batch, so
its examples interact; here every example has its own optimiser.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from advtrace._src import checks
from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import binary_search
from advtrace._src.attacks import loop


class Config(NamedTuple):
  """Static settings of the projected L-BFGS (see ``box_lbfgs``)."""
  memory_size: int
  max_linesearch: int
  pgtol: float
  ftol: float
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x_k: jax.Array
  f: jax.Array
  g: jax.Array
  s_mem: jax.Array  # (memory_size, ...)
  y_mem: jax.Array
  rho: jax.Array  # (memory_size,)
  count: jax.Array  # valid pairs in memory
  head: jax.Array  # next slot to write
  d: jax.Array  # the current line search's direction
  alpha: jax.Array  # its next trial step
  trials: jax.Array  # trials done in the current line search (0: a new search starts)
  lbfgs_iterations: jax.Array  # finished line searches (``iteration`` counts evaluations)
  max_iterations: jax.Array
  x: jax.Array
  label: jax.Array
  const: jax.Array
  queries: jax.Array
  best_x: jax.Array
  best_dist: jax.Array
  round_success: jax.Array
  active: jax.Array
  iteration: jax.Array


def _objective(logits_fn, x, label, const, x_adv):
  logits = base.single_logits(logits_fn, x_adv)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  return jnp.sum(jnp.square(x_adv - x)) + const * ce, logits


def _value_and_grad(logits_fn, x, label, const, x_adv):
  """Objective, gradient, and whether ``x_adv`` is classified as the target."""
  (f, logits), g = jax.value_and_grad(
      functools.partial(_objective, logits_fn, x, label, const), has_aux=True)(x_adv)
  return f, g, binary_search.confident_success(logits, label, True, 0.0)


def _vdot(a, b):
  return jnp.sum(a * b)


def _two_loop(grad, s_mem, y_mem, rho, count, head):
  """The L-BFGS two-loop recursion: ``H grad`` for the inverse-Hessian approximation ``H``."""
  m = s_mem.shape[0]

  def newest_first(i, carry):
    q, alpha = carry
    j = (head - 1 - i) % m
    a = jnp.where(i < count, rho[j] * _vdot(s_mem[j], q), 0.0)
    return q - a * y_mem[j], alpha.at[j].set(a)

  q, alpha = jax.lax.fori_loop(0, m, newest_first, (grad, jnp.zeros((m,), grad.dtype)))
  last = (head - 1) % m
  gamma = jnp.where(count > 0, 1.0 / (rho[last] * _vdot(y_mem[last], y_mem[last])), 1.0)

  def oldest_first(i, r):
    j = (head - m + i) % m
    b = rho[j] * _vdot(y_mem[j], r)
    return jnp.where(m - 1 - i < count, r + s_mem[j] * (alpha[j] - b), r)

  return jax.lax.fori_loop(0, m, oldest_first, gamma * q)


def _step(logits_fn, cfg: Config, s: _State) -> _State:
  """One objective evaluation: a line-search trial, ending the L-BFGS iteration if it is the
  search's last (accepted, or ``max_linesearch`` trials)."""
  lo, hi = cfg.clip_min, cfg.clip_max
  # A new search starts from the L-BFGS direction; later trials halve the step along it.
  fixed = ((s.x_k <= lo) & (s.g > 0)) | ((s.x_k >= hi) & (s.g < 0))
  g_free = jnp.where(fixed, 0.0, s.g)
  d_qn = jnp.where(fixed, 0.0, -_two_loop(g_free, s.s_mem, s.y_mem, s.rho, s.count, s.head))
  quasi_newton = (s.count > 0) & (_vdot(s.g, d_qn) < 0)
  alpha0 = jnp.where(quasi_newton, 1.0,
                     jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.sqrt(_vdot(g_free, g_free)), 1e-12)))
  starting = s.trials == 0
  d = jnp.where(starting, jnp.where(quasi_newton, d_qn, -g_free), s.d)
  alpha = jnp.where(starting, alpha0, s.alpha)

  x_t = jnp.clip(s.x_k + alpha * d, lo, hi)
  f_t, g_t, ok_t = _value_and_grad(logits_fn, s.x, s.label, s.const, x_t)
  accepted = jnp.isfinite(f_t) & (f_t <= s.f + 1e-4 * _vdot(s.g, x_t - s.x_k))
  trials = s.trials + 1
  ends = accepted | (trials >= cfg.max_linesearch)

  x_new = jnp.where(accepted, x_t, s.x_k)
  f_new = jnp.where(accepted, f_t, s.f)
  g_new = jnp.where(accepted, g_t, s.g)
  best_x, best_dist, round_success = binary_search.record(
      s.best_x, s.best_dist, s.round_success, x_new, jnp.sum(jnp.square(x_new - s.x)),
      accepted & ok_t)

  sv, yv = x_new - s.x_k, g_new - s.g
  sy = _vdot(sv, yv)
  store = accepted & (sy > 1e-10)
  m = cfg.memory_size
  s_mem = jnp.where(store, s.s_mem.at[s.head].set(sv), s.s_mem)
  y_mem = jnp.where(store, s.y_mem.at[s.head].set(yv), s.y_mem)
  rho = jnp.where(store, s.rho.at[s.head].set(1.0 / jnp.where(store, sy, 1.0)), s.rho)
  head = jnp.where(store, (s.head + 1) % m, s.head)
  count = jnp.where(store, jnp.minimum(s.count + 1, m), s.count)
  count = jnp.where(accepted, count, 0)  # a failed search resets the memory

  pg = jnp.max(jnp.abs(jnp.clip(x_new - g_new, lo, hi) - x_new))
  stalled = (s.f - f_new) <= cfg.ftol * jnp.maximum(jnp.maximum(jnp.abs(s.f), jnp.abs(f_new)),
                                                    1.0)
  converged = (pg <= cfg.pgtol) | (accepted & stalled) | (~accepted & (s.count == 0))
  lbfgs_iterations = s.lbfgs_iterations + ends.astype(jnp.int32)
  done = ends & (converged | (lbfgs_iterations >= s.max_iterations))
  finished = s._replace(
      x_k=x_new, f=f_new, g=g_new, s_mem=s_mem, y_mem=y_mem, rho=rho, count=count, head=head,
      best_x=best_x, best_dist=best_dist, round_success=round_success,
      trials=jnp.zeros_like(trials))
  searching = s._replace(d=d, alpha=alpha * 0.5, trials=trials)
  new = jax.tree.map(lambda a, b: jnp.where(ends, a, b), finished, searching)
  return new._replace(queries=s.queries + 1, lbfgs_iterations=lbfgs_iterations,
                      active=s.active & ~done)


@functools.partial(xla.jit, static_argnums=(0, 1))
def _init_state(logits_fn, cfg: Config, x, labels, const, best_x, best_dist,
                max_iterations) -> _State:
  batch = x.shape[0]
  f0, g0, ok0 = jax.vmap(functools.partial(_value_and_grad, logits_fn))(x, labels, const, x)
  # The clean point is a candidate too (distance 0 if it already has the target label).
  best_x, best_dist, round_success = jax.vmap(binary_search.record)(
      best_x, best_dist, jnp.zeros((batch,), bool), x, jnp.zeros((batch,), jnp.float32), ok0)
  mem = jnp.zeros((batch, cfg.memory_size) + x.shape[1:], x.dtype)
  zeros_i = jnp.zeros((batch,), jnp.int32)
  return _State(
      x_k=x, f=f0, g=g0, s_mem=mem, y_mem=mem,
      rho=jnp.zeros((batch, cfg.memory_size), jnp.float32), count=zeros_i, head=zeros_i,
      d=jnp.zeros_like(x), alpha=jnp.zeros((batch,), jnp.float32), trials=zeros_i,
      lbfgs_iterations=zeros_i, max_iterations=zeros_i + max_iterations, x=x,
      label=labels, const=const, queries=jnp.ones((batch,), jnp.int32), best_x=best_x,
      best_dist=best_dist, round_success=round_success, active=jnp.ones((batch,), bool),
      iteration=zeros_i)


def minimise(logits_fn: base.LogitsFn, x: jax.Array, labels: jax.Array, const: jax.Array,
             best: binary_search.Best, cfg: Config, max_iterations: int,
             loop_mode: str = "auto") -> _State:
  """One round: projected L-BFGS from ``x`` on every example, tracking the best target hit.

  Each loop step is one objective evaluation (a line-search trial), so that no network pass
  sits inside a nested ``while`` (XLA:CPU runs those convolutions several times slower).
  """
  state = _init_state(logits_fn, cfg, x, labels, const, best.x_adv, best.dist,
                      jnp.int32(max_iterations))
  return loop.run(_step, logits_fn, cfg, state, max_iterations * cfg.max_linesearch,
                  loop=loop_mode)


def box_lbfgs(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    targeted: bool = True,
    initial_const=1e-2,
    binary_search_steps: int = 5,
    max_iterations: int = 1000,
    memory_size: int = 10,
    max_linesearch: int = 20,
    pgtol: float = 1e-7,
    ftol: float = 1e-9,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""Box-constrained L-BFGS attack (DEEPSEC's BLB), targeted, minimal perturbation.

  For each of ``binary_search_steps`` rounds, a projected L-BFGS (module docstring) minimises
  :math:`\|x' - x\|_2^2 + c\,\mathrm{CE}(x', t)` over the box from :math:`x' = x`; every
  accepted iterate classified as the target and closer than the best so far becomes the
  example's answer. ``c`` follows the shared per-example binary search (success lowers ``c``,
  since it weights the loss; ``binary_search.py``). An example never classified as the target
  returns ``x`` with ``success=False``.

  Settings: the defaults are DEEPSEC's (Table VII: 5 binary steps, 1000 iterations, c0 0.01).
  Differences from DEEPSEC: the optimiser (module docstring), a failure returns ``x`` (DEEPSEC
  returns zeros), DEEPSEC judges only the last iterate of each round, and DEEPSEC's bisection
  bug is not reproduced.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: target labels.
    key: unused (the attack is deterministic); accepted for the common signature.
    targeted: must be True (the attack is targeted only).
    initial_const: ``c`` of the first round (> 0); scalar or per-example.
    binary_search_steps: rounds of the search over ``c`` (0 returns ``x``).
    max_iterations: L-BFGS iterations per round (0 returns ``x``).
    memory_size: the number of stored curvature pairs.
    max_linesearch: the most objective evaluations per line search.
    pgtol: stop when the projected gradient's largest entry is at most this.
    ftol: stop when the objective's relative decrease is at most this.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` counts L-BFGS iterations and
    ``info.queries`` objective evaluations (forward and backward passes, line-search trials
    and one initial evaluation per round included).

  References:
    Szegedy et al., "Intriguing Properties of Neural Networks", ICLR 2014.
    https://arxiv.org/abs/1312.6199
  """
  del key
  if not targeted:
    raise ValueError("box_lbfgs is a targeted attack: pass target labels with targeted=True "
                     "(e.g. advtrace.attacks.least_likely_target(logits_fn, x)).")
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  binary_search.check_search_args(binary_search_steps, max_iterations)
  for name, value in (("memory_size", memory_size), ("max_linesearch", max_linesearch)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  checks.check_positive(pgtol, "pgtol")
  checks.check_positive(ftol, "ftol")
  loop.resolve_loop(loop_mode)
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  initial_const = base.per_example(initial_const, batch, "initial_const", allow_zero=False)
  cfg = Config(memory_size, max_linesearch, float(pgtol), float(ftol),
               float(clip_min), float(clip_max))

  def run_round(const, best: binary_search.Best) -> binary_search.RoundResult:
    if max_iterations == 0:
      zeros_i = jnp.zeros((batch,), jnp.int32)
      return binary_search.RoundResult(best, jnp.zeros((batch,), bool), zeros_i, zeros_i)
    state = minimise(logits_fn, x, labels, const, best, cfg, max_iterations, loop_mode)
    return binary_search.RoundResult(
        binary_search.Best(state.best_x, state.best_dist, best.found | state.round_success),
        state.round_success, state.lbfgs_iterations, state.queries)

  best, iterations, queries = binary_search.search(
      run_round, x, initial_const, binary_search_steps)
  return binary_search.finish(logits_fn, x, best, labels, targeted=True,
                              iterations=iterations, queries=queries)
