r"""The Jacobian-based Saliency Map Attack (JSMA): a targeted L0 attack on pairs of features.

Each iteration takes the Jacobian ``J`` of the model output (for DEEPSEC models, logits minus
their maximum, which is what their ``logits_fn`` returns), and over every pair ``(p, q)`` of
distinct features in the search domain evaluates the paper's pair saliency (Algorithm 3):

.. math::
  \alpha = \sum_{i \in \{p, q\}} J_{t, i}, \qquad
  \beta = \sum_{i \in \{p, q\}} \sum_{j \ne t} J_{j, i}, \qquad
  S(p, q) = -\alpha \beta \ \text{ if } \alpha > 0 \text{ and } \beta < 0,

then increases both features of the best pair by ``theta`` (clipped to the box) and removes them
from the search domain. The search domain starts as the features below 99% of the box.

Parity (``Attacks/AttackMethods/JSMA.py`` of DEEPSEC, unchanged since its first commit): its
masked map (features outside the domain shifted out of the admissible set, score
``alpha * |beta|``) selects the same pair; the update, domain, budget ``ceil(gamma * d / 2)`` and
stop rule are the same. What the Jacobian is taken of matters: the Jacobian of a single logit is
not invariant to shifting all logits. DEEPSEC's MNIST model returns logits minus their maximum
since its commit ``d4e1181`` (not before), which zeroes the current top class's row and
subtracts its gradient from every other row. On the first 200 DEEPSEC MNIST candidates (Table
VII, random targets) the shifted logits give 50.5% success, the raw logits 74.5% (seed-003:
74.1%), the softmax (``jacobian="probs"``) 93.5%. cleverhans' ``jsma_symbolic`` differs in
using the softmax (its rows sum to zero, so ``beta = -alpha`` and the score is ``alpha^2``), a
budget of ``floor(gamma * d / 2)``, and a domain of the features below ``clip_max``.

Memory: the pair map has ``d^2`` entries per example (9.4M for 32x32x3). It is never built: a
``lax.scan`` over blocks of ``chunk_size`` rows keeps the running best pair, so the largest
temporaries hold ``batch * chunk_size * d`` values, independent of ``batch * d^2``. The result is
identical to the full map's argmax (first maximum in row-major order) for any chunk size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import checks
from advtrace._src.attacks import base
from advtrace._src.attacks import loop

# Default budget for the pair-map block of a whole batch, in float32 values (64 MiB).
_BLOCK_BUDGET = 1 << 24
_JACOBIANS = ("logits", "probs")


class _Config(NamedTuple):
  jacobian: str
  chunk_size: int
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x_adv: jax.Array
  domain: jax.Array  # bool[d]: features that may still be changed
  target: jax.Array
  theta: jax.Array
  budget: jax.Array  # int32: the maximum number of pair updates, ceil(gamma * d / 2)
  updates: jax.Array
  active: jax.Array
  iteration: jax.Array


def best_pair(alpha: jax.Array, beta: jax.Array, domain: jax.Array, chunk_size: int):
  """The paper's best pair ``argmax_{p != q} -alpha_pq * beta_pq`` over admissible pairs.

  A pair is admissible when both features are in ``domain``, ``alpha_p + alpha_q > 0`` and
  ``beta_p + beta_q < 0``. The ``d x d`` map is scanned in blocks of ``chunk_size`` rows.

  Args:
    alpha: float[d], the target class's derivative per feature.
    beta: float[d], the summed derivative of the other classes per feature.
    domain: bool[d], the search domain.
    chunk_size: rows of the pair map per block.

  Returns:
    ``(p, q, found)``: the first best pair in row-major order, and whether any pair is
    admissible.
  """
  d = alpha.shape[0]
  rows = min(chunk_size, d)
  blocks = -(-d // rows)
  pad = blocks * rows - d
  idx = jnp.arange(blocks * rows, dtype=jnp.int32)

  def blocked(a, fill):
    return jnp.pad(a, (0, pad), constant_values=fill).reshape(blocks, rows)

  cols = jnp.arange(d, dtype=jnp.int32)

  def scan_block(carry, block):
    best_s, best_p, best_q = carry
    a_r, b_r, dom_r, idx_r = block
    a = a_r[:, None] + alpha[None, :]
    b = b_r[:, None] + beta[None, :]
    ok = (dom_r[:, None] & domain[None, :] & (idx_r[:, None] != cols[None, :])
          & (a > 0) & (b < 0))
    score = jnp.where(ok, -a * b, -jnp.inf).reshape(-1)
    k = jnp.argmax(score)
    better = score[k] > best_s
    return (jnp.where(better, score[k], best_s),
            jnp.where(better, idx_r[k // d], best_p),
            jnp.where(better, (k % d).astype(jnp.int32), best_q)), None

  init = (jnp.array(-jnp.inf, alpha.dtype), jnp.int32(0), jnp.int32(0))
  (best_s, p, q), _ = jax.lax.scan(
      scan_block, init,
      (blocked(alpha, 0.0), blocked(beta, 0.0), blocked(domain, False), idx.reshape(blocks, rows)))
  return p, q, best_s > -jnp.inf


def _output(logits_fn, jacobian: str, z: jax.Array) -> jax.Array:
  """The model output whose Jacobian drives the attack, for one example."""
  logits = base.single_logits(logits_fn, z)
  return jax.nn.softmax(logits) if jacobian == "probs" else logits


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  shape = s.x_adv.shape
  flat = s.x_adv.reshape(-1)
  logits, vjp = jax.vjp(lambda z: _output(logits_fn, cfg.jacobian, z.reshape(shape)), flat)
  num_classes = logits.shape[-1]
  (jac,) = jax.vmap(vjp)(jnp.eye(num_classes, dtype=logits.dtype))  # [classes, d]
  alpha = jac[s.target]
  beta = jnp.sum(jac, axis=0) - alpha
  p, q, found = best_pair(alpha, beta, s.domain, cfg.chunk_size)
  reached = jnp.argmax(logits) == s.target
  take = ~reached & found & (s.updates < s.budget)
  new = jnp.clip(flat.at[p].add(s.theta).at[q].add(s.theta), cfg.clip_min, cfg.clip_max)
  flat = jnp.where(take, new, flat)
  domain = jnp.where(take, s.domain.at[p].set(False).at[q].set(False), s.domain)
  updates = s.updates + take.astype(jnp.int32)
  return s._replace(x_adv=flat.reshape(shape), domain=domain, updates=updates,
                    active=take & (updates < s.budget))


def jsma(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    targeted: bool = True,
    theta=1.0,
    gamma=0.1,
    jacobian: str = "logits",
    chunk_size: int | None = None,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""JSMA (targeted, increasing features), with DEEPSEC's settings as defaults.

  Every iteration changes the best pair of features by ``+theta`` (see the module docstring for
  the saliency). An example stops when it is classified as the target, after
  ``ceil(gamma * d / 2)`` iterations (``d`` = values per image, so at most about ``gamma * d``
  values change), or when no admissible pair is left. The last iterate is returned whether or
  not it reached the target (as DEEPSEC).

  Deviations from DEEPSEC: the pair saliency is the paper's (the same admissible pairs and
  score as DEEPSEC's masked map); when no admissible pair is left the example stops, where
  DEEPSEC's all-zero map makes it pick feature 0 twice and stall until the budget is spent.

  ``info.iterations`` counts pair updates; ``info.queries`` Jacobian evaluations (one forward
  pass and one backward pass per class each).

  Args:
    logits_fn: batched model, NHWC images to logits (its Jacobian drives the attack).
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: target labels.
    key: unused (JSMA is deterministic); accepted for the common signature.
    targeted: must be True; JSMA is a targeted attack.
    theta: the increase per changed feature, > 0; scalar or per-example. DEEPSEC: 1.
    gamma: the maximum fraction of features changed, in [0, 1]; scalar or per-example.
      DEEPSEC: 0.1. 0 returns ``x``.
    jacobian: ``"logits"`` (default, DEEPSEC): the Jacobian of what ``logits_fn`` returns
      (DEEPSEC's model output, logits minus their maximum); ``"probs"`` (cleverhans'
      ``jsma_symbolic``): the Jacobian of its softmax.
    chunk_size: rows of the ``d x d`` pair map evaluated at once. None: as many as keep the
      block of the whole batch under 2^24 values (all rows when that fits). The result does
      not depend on it.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``.

  References:
    Papernot, McDaniel, Jha, Fredrikson, Celik, Swami, "The Limitations of Deep Learning in
    Adversarial Settings", IEEE EuroS&P 2016. https://arxiv.org/abs/1511.07528
  """
  del key
  if not targeted:
    raise ValueError("jsma is a targeted attack; pass targeted=True with target labels (for "
                     "DEEPSEC, a random class different from the true label).")
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  checks.check_choice(jacobian, _JACOBIANS, "jacobian")
  x = jnp.asarray(x)
  batch = x.shape[0]
  d = int(np.prod(x.shape[1:]))
  theta = base.per_example(theta, batch, "theta", allow_zero=False)
  gamma_host = np.asarray(gamma, np.float64) if base.checks._is_concrete(gamma) else None  # pylint: disable=protected-access
  gamma = base.per_example(gamma, batch, "gamma")
  if gamma_host is None:
    raise ValueError("gamma must be concrete (it sets the number of iterations), not traced.")
  if np.any(gamma_host > 1):
    raise ValueError(f"gamma is a fraction of the features and must be in [0, 1], got {gamma}.")
  if chunk_size is None:
    chunk_size = max(1, min(d, _BLOCK_BUDGET // (batch * d)))
  elif not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
  # DEEPSEC: max_iters = ceil(num_features * gamma / 2), in float64.
  budget = np.broadcast_to(np.ceil(d * gamma_host / 2.0), (batch,)).astype(np.int32)
  labels = jnp.asarray(labels, jnp.int32)
  domain = (x < clip_min + 0.99 * (clip_max - clip_min)).reshape(batch, d)
  state = _State(x_adv=x, domain=domain, target=labels, theta=theta,
                 budget=jnp.asarray(budget), updates=jnp.zeros((batch,), jnp.int32),
                 active=jnp.asarray(budget > 0), iteration=jnp.zeros((batch,), jnp.int32))
  cfg = _Config(jacobian, int(chunk_size), float(clip_min), float(clip_max))
  state = loop.run(_step, logits_fn, cfg, state, int(budget.max(initial=0)), loop=loop_mode)
  return base.finalize(logits_fn, x, state.x_adv, labels, targeted=True,
                       iterations=state.updates, queries=state.iteration)
