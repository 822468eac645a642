r"""DeepFool: the minimal L2 or Linf step to the nearest linearised decision boundary, iterated.

At each iteration DeepFool linearises the logit differences ``f_k(x) = z_k(x) - z_y(x)`` around
the current point and steps onto the nearest boundary of that linearisation:

.. math::
  \hat l = \arg\min_{k \ne y} \frac{|f_k|}{\|w_k\|_q}, \quad
  r_i = \Big(\frac{|f_{\hat l}|}{\|w_{\hat l}\|_q} + 10^{-4}\Big)\,
    \mathrm{dir}_p(w_{\hat l}), \quad w_k = \nabla_x f_k,

with ``q = 2`` and ``dir = w / ||w||_2`` for L2, ``q = 1`` and ``dir = sign(w)`` for Linf. The
steps accumulate in ``r_tot`` and the iterate is ``clip(x + (1 + overshoot) r_tot)``; an example
stops as soon as its iterate is misclassified. The ``1e-4`` term is the reference
implementation's (LTS4/DeepFool, also in DEEPSEC): it pushes the linearised step just past the
boundary.

Per example, the gradients of all candidate logit differences come from one forward pass and one
``vmap``-ed VJP over the candidates; examples are batched with ``vmap`` by the shared driver.
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

DEEPFOOL_NORMS = ("l2", "linf")
_MIN_STEP = 1e-4  # the reference implementation's extra distance per step
_TINY = 1e-12


class _Config(NamedTuple):
  norm: str
  deepsec_extra_step: bool
  clip_min: float
  clip_max: float


class _State(NamedTuple):
  x: jax.Array  # the point DeepFool starts from
  x_adv: jax.Array  # clip(x + (1 + overshoot) * r_tot)
  r_tot: jax.Array  # the accumulated, un-overshot perturbation
  label: jax.Array
  candidates: jax.Array  # int32[K-1]: the classes whose boundaries are considered
  overshoot: jax.Array
  updates: jax.Array  # DeepFool iterations (steps actually added to r_tot)
  active: jax.Array
  iteration: jax.Array  # Jacobian evaluations (driver-counted)


def candidate_classes(logits: jax.Array, label: jax.Array, num_candidates: int | None):
  """The ``num_candidates - 1`` classes other than ``label`` with the largest logits, in order.

  ``num_candidates`` counts the label, as the reference ``num_classes`` does; None (or more than
  the number of classes) means every class.
  """
  num_classes = logits.shape[-1]
  k = num_classes if num_candidates is None else min(num_candidates, num_classes)
  masked = jnp.where(jax.nn.one_hot(label, num_classes, dtype=bool), -jnp.inf, logits)
  return jnp.argsort(-masked, stable=True)[:k - 1].astype(jnp.int32)


def _boundary_gradients(logits_fn, x, label, candidates):
  """Logits, ``f_k = z_k - z_label`` and ``w_k = grad f_k`` for every candidate ``k``."""
  logits, vjp = jax.vjp(lambda z: base.single_logits(logits_fn, z), x)
  num_classes = logits.shape[-1]
  cot = (jax.nn.one_hot(candidates, num_classes, dtype=logits.dtype)
         - jax.nn.one_hot(label, num_classes, dtype=logits.dtype))
  (w,) = jax.vmap(vjp)(cot)
  return logits, logits[candidates] - logits[label], w


def deepfool_direction(f: jax.Array, w: jax.Array, norm: str) -> jax.Array:
  """One DeepFool step from the logit differences ``f[K]`` and their gradients ``w[K, ...]``."""
  wf = w.reshape(w.shape[0], -1)
  if norm == "l2":
    wnorm = jnp.sqrt(jnp.sum(wf * wf, axis=1))
  else:
    wnorm = jnp.sum(jnp.abs(wf), axis=1)
  dist = jnp.abs(f) / (wnorm + 1e-15)
  best = jnp.argmin(dist)
  w_best = w[best]
  if norm == "l2":
    direction = w_best / jnp.maximum(wnorm[best], _TINY)
  else:
    direction = jnp.sign(w_best)
  return (dist[best] + _MIN_STEP) * direction


def _step(logits_fn, cfg: _Config, s: _State) -> _State:
  logits, f, w = _boundary_gradients(logits_fn, s.x_adv, s.label, s.candidates)
  done = jnp.argmax(logits) != s.label
  # DEEPSEC tests the prediction before each update but updates unconditionally, so it takes
  # one more step once the iterate is already adversarial.
  take = (~done | (s.updates > 0)) if cfg.deepsec_extra_step else ~done
  r_tot = jnp.where(take, s.r_tot + deepfool_direction(f, w, cfg.norm), s.r_tot)
  x_adv = jnp.clip(s.x + (1.0 + s.overshoot) * r_tot, cfg.clip_min, cfg.clip_max)
  return s._replace(x_adv=jnp.where(take, x_adv, s.x_adv), r_tot=r_tot,
                    updates=s.updates + take.astype(jnp.int32), active=s.active & ~done)


def init_state(logits, x, labels, overshoot, num_candidates) -> _State:
  """The DeepFool state for a batch, given the logits of ``x`` (used to order the classes)."""
  batch = x.shape[0]
  candidates = jax.vmap(candidate_classes, (0, 0, None))(logits, labels, num_candidates)
  return _State(
      x=x, x_adv=x, r_tot=jnp.zeros_like(x), label=labels, candidates=candidates,
      overshoot=overshoot, updates=jnp.zeros((batch,), jnp.int32),
      active=jnp.ones((batch,), bool), iteration=jnp.zeros((batch,), jnp.int32))


@functools.partial(xla.jit, static_argnums=(0, 4))
def _init(logits_fn, x, labels, overshoot, num_candidates):
  return init_state(logits_fn(x), x, labels, overshoot, num_candidates)


@functools.partial(xla.jit, static_argnums=(0,))
def _keep_successful(logits_fn, x, x_adv, labels):
  """Returns ``x`` (unchanged) for every example whose ``x_adv`` is not misclassified."""
  ok = jnp.argmax(logits_fn(x_adv), axis=-1) != labels
  return jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, x)


def run_deepfool(logits_fn: base.LogitsFn, x: jax.Array, labels: jax.Array, *, norm: str,
                 overshoot: jax.Array, max_iter: int, num_candidates: int | None,
                 deepsec_extra_step: bool, clip_min: float, clip_max: float,
                 loop_mode: str = "auto") -> _State:
  """Runs DeepFool on a validated batch and returns the final state (``r_tot``, ``updates``)."""
  cfg = _Config(norm, bool(deepsec_extra_step), float(clip_min), float(clip_max))
  state = _init(logits_fn, x, labels, overshoot, num_candidates)
  return loop.run(_step, logits_fn, cfg, state, max_iter, loop=loop_mode)


def run_deepfool_single(logits_fn: base.LogitsFn, x: jax.Array, label: jax.Array, *,
                        overshoot, max_iter: int, num_candidates: int | None, norm: str = "l2",
                        deepsec_extra_step: bool = False, clip_min: float = 0.0,
                        clip_max: float = 1.0) -> _State:
  """DeepFool on ONE example inside traced code (a ``lax.while_loop``), e.g. within a scan.

  Args:
    logits_fn: batched model.
    x: one image, HWC.
    label: the class to move away from (scalar int32).
    overshoot: scalar.
    max_iter: the maximum number of DeepFool iterations.
    num_candidates: classes considered, counting ``label``; None for all.
    norm: ``"l2"`` or ``"linf"``.
    deepsec_extra_step: see :func:`deepfool`.
    clip_min: lower end of the box.
    clip_max: upper end of the box.

  Returns:
    The final (unbatched) state; ``r_tot`` and ``updates`` are the reference's ``r`` and ``iter``.
  """
  cfg = _Config(norm, bool(deepsec_extra_step), float(clip_min), float(clip_max))
  logits = base.single_logits(logits_fn, x)
  state = jax.tree.map(lambda a: a[0], init_state(
      logits[None], x[None], jnp.asarray(label, jnp.int32)[None],
      jnp.asarray(overshoot, jnp.float32)[None], num_candidates))

  def cond(s):
    return s.active & (s.iteration < max_iter)

  def body(s):
    s = _step(logits_fn, cfg, s)
    return s._replace(iteration=s.iteration + 1)

  return jax.lax.while_loop(cond, body, state)


def check_num_candidates(num_candidates) -> None:
  if num_candidates is not None and (
      not isinstance(num_candidates, (int, np.integer)) or num_candidates < 2):
    raise ValueError("num_candidates must be None (all classes) or an integer >= 2 (the label "
                     f"and at least one other class), got {num_candidates!r}.")


def deepfool(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    norm: str = "l2",
    overshoot=0.02,
    max_iter: int = 50,
    num_candidates: int | None = None,
    deepsec_extra_step: bool = False,
    targeted: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""DeepFool, untargeted, in L2 (the original) or Linf.

  Every example iterates independently and stops once its iterate
  ``clip(x + (1 + overshoot) * r_tot)`` is misclassified. The candidate classes are fixed at the
  start, ordered by the clean logits, as in the reference implementation. An example that is
  still correctly classified after ``max_iter`` iterations is returned unchanged, with
  ``success=False`` (DEEPSEC returns its last iterate).

  ``info.iterations`` counts DeepFool iterations (steps added to ``r_tot``); ``info.queries``
  counts Jacobian evaluations (one forward pass and one backward pass per candidate class each),
  including the one that detects success.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: the true labels (the classes to move away from). An example the model already
      misclassifies is returned unchanged (``success=True``, 0 iterations).
    key: unused (DeepFool is deterministic); accepted for the common attack signature.
    norm: ``"l2"`` (the paper's main attack, DEEPSEC's) or ``"linf"``.
    overshoot: the final perturbation is ``(1 + overshoot) * r_tot``; scalar or per-example.
      DEEPSEC: 0.02.
    max_iter: the maximum number of iterations (0 returns ``x``). DEEPSEC: 50.
    num_candidates: how many classes to consider, counting the label: the label and the
      ``num_candidates - 1`` other classes with the highest clean logits. None: all classes
      (DEEPSEC).
    deepsec_extra_step: reproduce DEEPSEC's loop, which checks the prediction *before* each
      update but always applies the update, so it takes one extra step after the iterate has
      become adversarial (a larger perturbation than the paper's algorithm). Default False: stop
      at the first adversarial iterate, as in the paper and the reference implementation.
    targeted: must be False; DeepFool is untargeted.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``.

  References:
    Moosavi-Dezfooli, Fawzi, Frossard, "DeepFool: a simple and accurate method to fool deep
    neural networks", CVPR 2016. https://arxiv.org/abs/1511.04599
  """
  del key
  if targeted:
    raise ValueError("deepfool is an untargeted attack; call it with targeted=False and the true "
                     "labels. For a targeted minimal attack use a targeted CW/EAD attack.")
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  if norm not in DEEPFOOL_NORMS:
    raise ValueError(f"Unknown norm {norm!r}. Valid choices: {', '.join(DEEPFOOL_NORMS)}.")
  if max_iter < 0:
    raise ValueError(f"max_iter must be >= 0, got {max_iter}.")
  check_num_candidates(num_candidates)
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  overshoot = base.per_example(overshoot, x.shape[0], "overshoot")
  state = run_deepfool(logits_fn, x, labels, norm=norm, overshoot=overshoot, max_iter=max_iter,
                       num_candidates=num_candidates, deepsec_extra_step=deepsec_extra_step,
                       clip_min=clip_min, clip_max=clip_max, loop_mode=loop_mode)
  x_adv = _keep_successful(logits_fn, x, state.x_adv, labels)
  return base.finalize(logits_fn, x, x_adv, labels, targeted=False, iterations=state.updates,
                       queries=state.iteration)
