"""First-order, norm-bounded attacks: FGSM, R+FGSM, BIM, PGD, MI-FGSM (and their targeted forms).

All of them are one loop: take the gradient of a loss the attacker minimises, turn it into an
update with an optax transformation (sign-SGD, L2-normalised SGD, or momentum then sign),
project onto the epsilon-ball and clip to the box. They differ in the start point, the number of
steps and the update. The least-likely-class attacks (LLC, R+LLC, ILLC) are the targeted forms
with ``labels = advtrace.attacks.least_likely_target(logits_fn, x)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import loop
from advtrace._src.attacks import losses
from advtrace._src.attacks import projections

LOSSES = {"ce": losses.cross_entropy, "margin": losses.margin}


class _Config(NamedTuple):
  norm: str
  loss: str
  momentum: float | None  # MI-FGSM decay; None for plain steps
  normalize_momentum_grad: bool  # Dong et al. L1-normalise the gradient before accumulating
  early_stop: bool
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x_adv: jax.Array
  x: jax.Array
  label: jax.Array
  targeted: jax.Array
  eps: jax.Array
  step_size: jax.Array
  opt_state: optax.OptState
  active: jax.Array
  iteration: jax.Array


def _update_rule(cfg: _Config, step_size: jax.Array) -> optax.GradientTransformation:
  """The optax transformation turning a loss gradient into a (descent) step."""
  parts = []
  if cfg.momentum is not None:
    if cfg.normalize_momentum_grad:
      parts.append(optax.stateless(lambda g, _: g / jnp.maximum(jnp.mean(jnp.abs(g)), 1e-12)))
    parts.append(optax.trace(decay=cfg.momentum))
  parts.append(optax.stateless(lambda g, _: projections.normalize_step(g, cfg.norm)))
  parts.append(optax.sgd(step_size))
  return optax.chain(*parts)


def _loss(cfg: _Config, logits_fn, x_adv, label, targeted):
  logits = base.single_logits(logits_fn, x_adv)
  return LOSSES[cfg.loss](logits, label, targeted), logits


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  (_, logits), grad = jax.value_and_grad(_loss, argnums=2, has_aux=True)(
      cfg, logits_fn, s.x_adv, s.label, s.targeted)
  updates, opt_state = _update_rule(cfg, s.step_size).update(grad, s.opt_state)
  x_adv = projections.project_and_clip(
      s.x_adv + updates, s.x, s.eps, cfg.norm, cfg.clip_min, cfg.clip_max)
  active = s.active
  if cfg.early_stop:
    # The gradient was taken at the old point: stop once that point already succeeds.
    done = base.is_success(logits, s.label, s.targeted)
    x_adv = jnp.where(done, s.x_adv, x_adv)
    active = active & ~done
  return s._replace(x_adv=x_adv, opt_state=opt_state, active=active)


def _check_common(x, labels, norm, clip_min, clip_max, loss):
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  if norm not in projections.NORMS:
    raise ValueError(f"Unknown norm {norm!r}. Valid choices: {', '.join(projections.NORMS)}.")
  if loss not in LOSSES:
    raise ValueError(f"Unknown loss {loss!r}. Valid choices: {', '.join(LOSSES)}.")


def iterative_attack(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    eps,
    step_size,
    num_steps: int,
    norm: str = "linf",
    targeted: bool = False,
    random_start: bool = False,
    random_step=0.0,
    num_restarts: int = 1,
    momentum: float | None = None,
    normalize_momentum_grad: bool = False,
    loss: str = "ce",
    early_stop: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""The generic projected first-order attack that every attack in this module specialises.

  .. math::
    x^{t+1} = \Pi_{B_p(x, \epsilon) \cap [c_{min}, c_{max}]}\big(x^t - \alpha \cdot
      \mathrm{dir}_p(\nabla_x L(x^t))\big)

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example.
    eps: the radius of the ``norm`` ball; scalar or per-example.
    step_size: the step per iteration in ``norm`` units; scalar or per-example.
    num_steps: iterations (0 returns ``x``, or the random start if one is used).
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    targeted: whether ``labels`` are targets.
    random_start: start uniformly inside the ball (Madry et al.).
    random_step: start with a step of this size along the sign of a Gaussian (Tramer et al.'s
      R+FGSM); scalar or per-example. Ignored if ``random_start``.
    num_restarts: independent random restarts; a successful restart wins, otherwise the one
      with the lowest final loss.
    momentum: MI-FGSM decay factor, or None.
    normalize_momentum_grad: L1-normalise gradients before accumulating them (Dong et al.);
      DEEPSEC's UMIFGSM/TMIFGSM accumulate the raw gradient.
    loss: ``"ce"`` or ``"margin"`` (Carlini-Wagner f with kappa 0).
    early_stop: freeze an example as soon as it is adversarial.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``.
  """
  _check_common(x, labels, norm, clip_min, clip_max, loss)
  if num_restarts < 1:
    raise ValueError(f"num_restarts must be >= 1, got {num_restarts}.")
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  batch = x.shape[0]
  eps = base.per_example(eps, batch, "eps")
  step_size = base.per_example(step_size, batch, "step_size")
  random_step = base.per_example(random_step, batch, "random_step")
  keys = base.example_keys(key, batch)
  cfg = _Config(norm, loss, momentum, normalize_momentum_grad, early_stop,
                float(clip_min), float(clip_max))
  best = best_loss = None
  for restart in range(num_restarts):
    state = _init(cfg, x, labels, targeted, eps, step_size, random_start, random_step,
                  jax.vmap(jax.random.fold_in, (0, None))(keys, restart))
    state = loop.run(_step, logits_fn, cfg, state, num_steps, loop=loop_mode)
    out = base.finalize(logits_fn, x, state.x_adv, labels, targeted=targeted,
                        iterations=state.iteration, queries=state.iteration + 1)
    if num_restarts == 1:
      return out
    final_loss = _final_loss(logits_fn, cfg, out.x_adv, labels, targeted)
    if best is None:
      best, best_loss = out, final_loss
      continue
    better = (out.info.success & ~best.info.success) | (
        (out.info.success == best.info.success) & (final_loss < best_loss))
    best = _select_rows(better, out, best)
    best_loss = jnp.where(better, final_loss, best_loss)
  # Report the total work over all restarts, not only the winning restart's.
  return best._replace(info=best.info._replace(queries=best.info.queries * num_restarts))


def _select_rows(mask, new, old):
  """Per example (leading axis), takes ``new`` where ``mask`` is True, else ``old``."""
  return jax.tree.map(
      lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old)


def _init(cfg, x, labels, targeted, eps, step_size, random_start, random_step, keys):
  def one(xi, ki, eps_i, rs_i):
    if random_start:
      start = xi + projections.random_in_ball(ki, xi.shape, eps_i, cfg.norm)
    else:
      start = xi + rs_i * jnp.sign(jax.random.normal(ki, xi.shape))
    return projections.project_and_clip(start, xi, eps_i, cfg.norm, cfg.clip_min, cfg.clip_max)

  x_start = jax.vmap(one)(x, keys, eps, random_step)
  opt_state = jax.vmap(lambda xa, a: _update_rule(cfg, a).init(xa))(x_start, step_size)
  batch = x.shape[0]
  return _State(
      x_adv=x_start, x=x, label=labels, targeted=jnp.full((batch,), targeted),
      eps=eps, step_size=step_size, opt_state=opt_state,
      active=jnp.ones((batch,), bool), iteration=jnp.zeros((batch,), jnp.int32))


@functools.partial(xla.jit, static_argnums=(0, 1, 4))
def _final_loss(logits_fn, cfg, x_adv, labels, targeted):
  logits = logits_fn(x_adv)
  return jax.vmap(lambda z, y: LOSSES[cfg.loss](z, y, targeted))(logits, labels)


def fgsm(logits_fn, x, labels, key=None, *, eps, norm: str = "linf", targeted: bool = False,
         clip_min: float = 0.0, clip_max: float = 1.0, **kw) -> base.AttackOutput:
  """Fast Gradient (Sign) Method: one step of size ``eps`` in the ``norm`` steepest direction.

  The L-inf form is FGSM; L2 and L1 are the fast gradient methods of the same family. Targeted
  with the least-likely class it is DEEPSEC's LLC.

  References:
    Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
    https://arxiv.org/abs/1412.6572
  """
  key = jax.random.key(0) if key is None else key  # deterministic: no randomness is used
  return iterative_attack(logits_fn, x, labels, key, eps=eps, step_size=eps, num_steps=1,
                          norm=norm, targeted=targeted, clip_min=clip_min, clip_max=clip_max,
                          **kw)


def rfgsm(logits_fn, x, labels, key, *, eps, alpha, targeted: bool = False,
          clip_min: float = 0.0, clip_max: float = 1.0, **kw) -> base.AttackOutput:
  """R+FGSM: a random sign step of size ``alpha``, then an FGSM step of size ``eps - alpha``.

  Targeted with the least-likely class it is DEEPSEC's R+LLC.

  References:
    Tramer et al., "Ensemble Adversarial Training: Attacks and Defenses", ICLR 2018.
    https://arxiv.org/abs/1705.07204
  """
  batch = jnp.shape(x)[0]
  eps_a = base.per_example(eps, batch, "eps")
  alpha_a = base.per_example(alpha, batch, "alpha")
  if base.checks._is_concrete(alpha_a) and bool(jnp.any(alpha_a > eps_a)):
    raise ValueError(f"alpha must be <= eps, got alpha={alpha}, eps={eps}.")
  return iterative_attack(logits_fn, x, labels, key, eps=eps_a, step_size=eps_a - alpha_a,
                          num_steps=1, random_step=alpha_a, targeted=targeted,
                          clip_min=clip_min, clip_max=clip_max, **kw)


def bim(logits_fn, x, labels, key=None, *, eps, step_size, num_steps: int,
        targeted: bool = False, **kw) -> base.AttackOutput:
  """Basic Iterative Method (I-FGSM): iterated FGSM steps, projected onto the eps-ball.

  Targeted with the least-likely class it is ILLC.

  References:
    Kurakin, Goodfellow, Bengio, "Adversarial Examples in the Physical World", ICLR-W 2017.
    https://arxiv.org/abs/1607.02533
  """
  key = jax.random.key(0) if key is None else key
  return iterative_attack(logits_fn, x, labels, key, eps=eps, step_size=step_size,
                          num_steps=num_steps, targeted=targeted, **kw)


def pgd(logits_fn, x, labels, key, *, eps, step_size, num_steps: int, norm: str = "linf",
        random_start: bool = True, num_restarts: int = 1, targeted: bool = False,
        **kw) -> base.AttackOutput:
  """Projected Gradient Descent with a uniform random start and optional restarts.

  References:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
    https://arxiv.org/abs/1706.06083
  """
  return iterative_attack(logits_fn, x, labels, key, eps=eps, step_size=step_size,
                          num_steps=num_steps, norm=norm, random_start=random_start,
                          num_restarts=num_restarts, targeted=targeted, **kw)


def mi_fgsm(logits_fn, x, labels, key=None, *, eps, step_size, num_steps: int,
            decay: float = 1.0, normalize_grad: bool = False, targeted: bool = False,
            **kw) -> base.AttackOutput:
  """Momentum Iterative FGSM (UMIFGSM; TMIFGSM when targeted).

  ``normalize_grad=True`` is Dong et al.'s L1-normalised accumulation; the default follows
  DEEPSEC, which accumulates the raw gradient.

  References:
    Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.
    https://arxiv.org/abs/1710.06081
  """
  key = jax.random.key(0) if key is None else key
  return iterative_attack(logits_fn, x, labels, key, eps=eps, step_size=step_size,
                          num_steps=num_steps, momentum=decay,
                          normalize_momentum_grad=normalize_grad, targeted=targeted, **kw)


def least_likely_target(logits_fn, x) -> jax.Array:
  """DEEPSEC's LLC target: the class with the lowest logit on the clean input."""
  return jnp.argmin(logits_fn(jnp.asarray(x)), axis=-1).astype(jnp.int32)
