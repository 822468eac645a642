"""Universal adversarial perturbations (UAP): one perturbation ``v`` that fools most inputs.

:func:`uap` computes ``v`` on a set of images with the original, sequential algorithm: each pass
visits the images in a fresh random order; for every image that ``x + v`` does not yet fool,
DeepFool (L2) computes the minimal extra perturbation ``dr`` from ``clip(x + v)`` and, if
DeepFool converged within ``deepfool_max_iter - 1`` iterations, ``v`` becomes
``project(v + dr)``. The update of ``v`` after image ``i`` is needed before image ``i + 1``, so a
pass is sequential over the images: ``"fused"``, one jitted ``lax.scan`` with DeepFool as a
bounded ``lax.while_loop`` inside it; ``"host"``, a Python loop over the images that runs
DeepFool's jitted step from the host. On 2 CPU cores with the DEEPSEC MNIST CNN the host pass
took 6.1 s per 100 images against 55 s fused (XLA:CPU's slow input-gradient kernels inside
compiled loops, see ``loop.py``), so ``"auto"`` picks host on CPU and fused elsewhere. Passes
repeat until the fooling rate reaches ``fool_rate`` or ``max_outer_iters``. A pass can take
minutes, so :func:`uap` hands a :class:`UAPCheckpoint` to ``on_pass`` after each one and resumes
from one (``resume_from``) exactly where an uninterrupted run would be.

:func:`apply_uap` (or :func:`uap_attack`, with the common attack signature) applies a computed
``v`` to a batch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from advtrace._src import batching
from advtrace._src import checks
from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import deepfool
from advtrace._src.attacks import loop
from advtrace._src.attacks import projections

UAP_NORMS = ("linf", "l2")


class UAPInfo(NamedTuple):
  """Diagnostics of :func:`uap`.

  Attributes:
    fooling_rate: the fooling rate of the returned ``v`` on the evaluation set.
    fooling_rates: the fooling rate after each pass, float64[passes].
    passes: the number of passes over the images that were run.
    converged: whether ``fooling_rate >= fool_rate``.
    updates: how many times ``v`` was updated in each pass, int64[passes].
    seconds: wall time of each pass (including compilation in the first), float64[passes].
  """
  fooling_rate: float
  fooling_rates: np.ndarray
  passes: int
  converged: bool
  updates: np.ndarray
  seconds: np.ndarray


class UAPCheckpoint(NamedTuple):
  """The state of :func:`uap` after some passes, enough to resume it.

  Attributes:
    v: the perturbation after the last pass.
    fooling_rates: the fooling rate after each pass, float64[passes].
    updates: how many times ``v`` was updated in each pass, int64[passes].
    seconds: wall time of each pass, float64[passes].
  """
  v: np.ndarray
  fooling_rates: np.ndarray
  updates: np.ndarray
  seconds: np.ndarray


def _check_resume(resume: UAPCheckpoint, image_shape, max_outer_iters: int) -> None:
  if np.shape(resume.v) != tuple(image_shape):
    raise ValueError(f"resume_from.v has shape {np.shape(resume.v)}, the images "
                     f"{tuple(image_shape)}; resume with the checkpoint of this computation.")
  passes = len(resume.fooling_rates)
  if not len(resume.updates) == len(resume.seconds) == passes:
    raise ValueError("resume_from holds per-pass histories of different lengths "
                     f"({passes}, {len(resume.updates)}, {len(resume.seconds)}); it is corrupt.")
  if passes > max_outer_iters:
    raise ValueError(f"resume_from has {passes} passes, more than max_outer_iters="
                     f"{max_outer_iters}.")
  if not np.all(np.isfinite(resume.v)):
    raise ValueError("resume_from.v holds NaN or inf; it is corrupt.")


class _Config(NamedTuple):
  norm: str
  deepfool_max_iter: int
  num_candidates: int | None
  deepsec_dr: bool
  clip_min: float
  clip_max: float


def _converged(cfg: _Config, updates):
  """The reference's rule: only a DeepFool that converged early updates ``v``."""
  return updates < cfg.deepfool_max_iter - 1


def _add(cfg: _Config, v, r_tot, eps, overshoot):
  """``project(v + dr)``, ``dr`` DeepFool's perturbation (with the overshoot unless deepsec_dr)."""
  dr = r_tot if cfg.deepsec_dr else (1.0 + overshoot) * r_tot
  return projections.project(v + dr, eps, cfg.norm)


_add_jit = jax.jit(_add, static_argnums=0)  # for the host pass (the fused one inlines _add)


@functools.partial(xla.jit, static_argnums=(0, 1))
def _uap_pass(logits_fn, cfg: _Config, v, xs, preds, eps, overshoot):
  """One sequential pass of the UAP algorithm over ``xs`` (in the given order)."""

  def visit(carry, inp):
    v, updates = carry
    xi, yi = inp
    xp = jnp.clip(xi + v, cfg.clip_min, cfg.clip_max)
    fooled = jnp.argmax(base.single_logits(logits_fn, xp)) != yi

    def improve(v):
      s = deepfool.run_deepfool_single(
          logits_fn, xp, yi, overshoot=overshoot, max_iter=cfg.deepfool_max_iter,
          num_candidates=cfg.num_candidates, clip_min=cfg.clip_min, clip_max=cfg.clip_max)
      ok = _converged(cfg, s.updates)
      return jnp.where(ok, _add(cfg, v, s.r_tot, eps, overshoot), v), ok

    v, changed = jax.lax.cond(fooled, lambda v: (v, jnp.bool_(False)), improve, v)
    return (v, updates + changed.astype(jnp.int32)), None

  (v, updates), _ = jax.lax.scan(visit, (v, jnp.int32(0)), (xs, preds))
  return v, updates


@functools.partial(xla.jit, static_argnums=(0, 4, 5))
def _fools(logits_fn, v, xi, yi, clip_min, clip_max):
  return jnp.argmax(base.single_logits(logits_fn, jnp.clip(xi + v, clip_min, clip_max))) != yi


def _uap_pass_host(logits_fn, cfg: _Config, v, xs, preds, eps, overshoot):
  """:func:`_uap_pass` driven from the host, image by image (same updates)."""
  updates = 0
  for xi, yi in zip(xs, preds, strict=True):
    if bool(_fools(logits_fn, v, xi, yi, cfg.clip_min, cfg.clip_max)):
      continue
    xp = jnp.clip(xi + v, cfg.clip_min, cfg.clip_max)[None]
    s = deepfool.run_deepfool(
        logits_fn, xp, yi[None], norm="l2", overshoot=overshoot[None],
        max_iter=cfg.deepfool_max_iter, num_candidates=cfg.num_candidates,
        deepsec_extra_step=False, clip_min=cfg.clip_min, clip_max=cfg.clip_max, loop_mode="host")
    if _converged(cfg, int(s.updates[0])):
      v = _add_jit(cfg, v, s.r_tot[0], eps, overshoot)
      updates += 1
  return v, updates


@functools.partial(xla.jit, static_argnums=(0,))
def _predict(logits_fn, x):
  return jnp.argmax(logits_fn(x), axis=-1).astype(jnp.int32)


@functools.partial(xla.jit, static_argnums=(0, 3, 4))
def _predict_perturbed(logits_fn, x, v, clip_min, clip_max):
  return jnp.argmax(logits_fn(jnp.clip(x + v, clip_min, clip_max)), axis=-1).astype(jnp.int32)


def fooling_rate(logits_fn: base.LogitsFn, x, v, *, labels=None, clean_predictions=None,
                 clip_min: float = 0.0, clip_max: float = 1.0, batch_size: int = 256) -> float:
  """The fraction of ``x`` whose prediction changes under ``v``.

  Args:
    logits_fn: batched model.
    x: images, NHWC.
    v: the perturbation, broadcastable to one image.
    labels: if given, a changed prediction must also differ from the label (DEEPSEC's count).
    clean_predictions: the model's predictions on ``x`` if already known.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    batch_size: evaluation batch size.

  Returns:
    The fooling rate in [0, 1].
  """
  x = np.asarray(x)
  if clean_predictions is None:
    clean_predictions = batching.map_batched(functools.partial(_predict, logits_fn), x,
                                             batch_size)
  v = jnp.asarray(v)
  pert = batching.map_batched(
      lambda b: _predict_perturbed(logits_fn, b, v, float(clip_min), float(clip_max)), x,
      batch_size)
  fooled = pert != np.asarray(clean_predictions)
  if labels is not None:
    fooled &= pert != np.asarray(labels)
  return float(np.mean(fooled))


def uap(
    logits_fn: base.LogitsFn,
    x_train: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    fool_rate: float = 0.8,
    max_outer_iters: int = 20,
    deepfool_overshoot: float = 0.02,
    deepfool_max_iter: int = 10,
    num_candidates: int | None = None,
    x_val: jax.Array | None = None,
    labels_val: jax.Array | None = None,
    deepsec_dr: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    batch_size: int = 256,
    on_pass: Callable[[UAPCheckpoint], None] | None = None,
    resume_from: UAPCheckpoint | None = None,
    loop_mode: str = "auto",
) -> tuple[jax.Array, UAPInfo]:
  r"""Computes a universal adversarial perturbation ``v`` with ``||v||_norm <= eps``.

  The algorithm is the paper's (Algorithm 1), sequential over the images: for each image not
  yet fooled, ``v <- project(v + dr)`` with ``dr`` DeepFool's (L2) minimal perturbation of
  ``clip(x + v)``. As in the reference code, ``v`` is only updated when DeepFool converged in
  fewer than ``deepfool_max_iter - 1`` iterations. The order of the images is reshuffled with
  ``key`` in every pass. After each pass the fooling rate (prediction of ``clip(x + v)`` differs
  from that of ``x``) is measured on ``x_val`` (or ``x_train``) and the computation stops when it
  reaches ``fool_rate``.

  DEEPSEC settings: computed on 10% of the training set, fool rate measured on the other 90%
  with labels (``labels_val``), ``eps`` 0.3 (MNIST) / 0.1 (CIFAR-10), ``fool_rate`` 0.35 / 0.9
  (code) or 0.3 (seed-003 Table VII), ``max_outer_iters`` 20, DeepFool overshoot 0.02 and 10
  iterations. Deviations: the inner DeepFool stops at the first adversarial iterate (DEEPSEC's
  takes one extra step, see :func:`advtrace.attacks.deepfool`), and ``dr`` includes the
  overshoot factor as in the reference implementation (``deepsec_dr=True``: without it, as
  DEEPSEC).

  Args:
    logits_fn: batched model, NHWC images to logits.
    x_train: the images ``v`` is computed on, NHWC in ``[clip_min, clip_max]``.
    key: a typed PRNG key for the image order of each pass.
    eps: the radius of the ``norm`` ball ``v`` is projected onto.
    norm: ``"linf"`` or ``"l2"``.
    fool_rate: stop once the fooling rate reaches this (the paper's ``1 - delta``).
    max_outer_iters: the maximum number of passes over ``x_train``.
    deepfool_overshoot: overshoot of the inner DeepFool.
    deepfool_max_iter: iterations of the inner DeepFool.
    num_candidates: classes the inner DeepFool considers (None: all).
    x_val: images to measure the fooling rate on; default ``x_train``.
    labels_val: optional labels of ``x_val``: a fooled image must then also be misclassified
      (DEEPSEC's count).
    deepsec_dr: add DeepFool's ``r_tot`` without the ``1 + overshoot`` factor, as DEEPSEC.
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    batch_size: batch size for measuring the fooling rate.
    on_pass: optional callback, given a :class:`UAPCheckpoint` after each pass (e.g. to save
      it).
    resume_from: a checkpoint that ``on_pass`` got from a call with the same arguments; the
      computation goes on after its last pass and returns what the uninterrupted call returns.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see the module docstring).

  Returns:
    ``(v, info)``: ``v`` of shape ``x_train.shape[1:]`` and a :class:`UAPInfo`.

  References:
    Moosavi-Dezfooli, Fawzi, Fawzi, Frossard, "Universal adversarial perturbations", CVPR 2017.
    https://arxiv.org/abs/1610.08401
  """
  checks.check_images(x_train, "x_train", value_range=(clip_min, clip_max))
  if not clip_min < clip_max:
    raise ValueError(f"clip_min must be < clip_max, got clip_min={clip_min}, clip_max={clip_max}.")
  if norm not in UAP_NORMS:
    raise ValueError(f"Unknown norm {norm!r}. Valid choices: {', '.join(UAP_NORMS)}.")
  checks.check_positive(eps, "eps")
  checks.check_positive(deepfool_overshoot, "deepfool_overshoot")
  if np.ndim(eps) != 0 or np.ndim(deepfool_overshoot) != 0:
    raise ValueError("eps and deepfool_overshoot must be scalars (one perturbation for all).")
  if not 0.0 <= fool_rate <= 1.0:
    raise ValueError(f"fool_rate must be in [0, 1], got {fool_rate}.")
  if max_outer_iters < 0 or deepfool_max_iter < 0:
    raise ValueError("max_outer_iters and deepfool_max_iter must be >= 0, got "
                     f"{max_outer_iters} and {deepfool_max_iter}.")
  deepfool.check_num_candidates(num_candidates)
  if x_val is None:
    if labels_val is not None:
      raise ValueError("labels_val was given without x_val; pass both (or neither).")
    x_val = x_train
  else:
    checks.check_images(x_val, "x_val", value_range=(clip_min, clip_max))
    if np.shape(x_val)[1:] != np.shape(x_train)[1:]:
      raise ValueError(f"x_val images have shape {np.shape(x_val)[1:]}, x_train images "
                       f"{np.shape(x_train)[1:]}; they must match.")
  if labels_val is not None:
    checks.check_labels(labels_val, None, "labels_val", size=np.shape(x_val)[0])
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape != ():
    raise TypeError("key must be one typed PRNG key from jax.random.key(seed).")
  if resume_from is not None:
    _check_resume(resume_from, np.shape(x_train)[1:], max_outer_iters)

  mode = loop.resolve_loop(loop_mode)
  cfg = _Config(norm, int(deepfool_max_iter), num_candidates, bool(deepsec_dr),
                float(clip_min), float(clip_max))
  x_train = jnp.asarray(x_train)
  preds_train = jnp.asarray(batching.map_batched(
      functools.partial(_predict, logits_fn), np.asarray(x_train), batch_size))
  preds_val = batching.map_batched(functools.partial(_predict, logits_fn), np.asarray(x_val),
                                   batch_size)
  eps = jnp.float32(eps)
  overshoot = jnp.float32(deepfool_overshoot)
  if resume_from is None:
    v = jnp.zeros(x_train.shape[1:], x_train.dtype)
    rates, updates, seconds = [], [], []
  else:
    v = jnp.asarray(resume_from.v, x_train.dtype)
    rates = [float(r) for r in resume_from.fooling_rates]
    updates = [int(u) for u in resume_from.updates]
    seconds = [float(t) for t in resume_from.seconds]
  rate = rates[-1] if rates else fooling_rate(
      logits_fn, x_val, v, labels=labels_val, clean_predictions=preds_val, clip_min=clip_min,
      clip_max=clip_max, batch_size=batch_size)
  for i in range(len(rates), max_outer_iters):
    if rate >= fool_rate:
      break
    start = time.perf_counter()
    order = jax.random.permutation(jax.random.fold_in(key, i), x_train.shape[0])
    run_pass = _uap_pass_host if mode == "host" else _uap_pass
    v, n_updates = run_pass(logits_fn, cfg, v, x_train[order], preds_train[order], eps,
                            overshoot)
    rate = fooling_rate(logits_fn, x_val, v, labels=labels_val, clean_predictions=preds_val,
                        clip_min=clip_min, clip_max=clip_max, batch_size=batch_size)
    rates.append(rate)
    updates.append(int(n_updates))
    seconds.append(time.perf_counter() - start)
    logging.info("UAP pass %d: fooling rate %.4f, %d updates, %.1f s", i, rate, updates[-1],
                 seconds[-1])
    if on_pass is not None:
      on_pass(UAPCheckpoint(np.asarray(v), np.asarray(rates, np.float64),
                            np.asarray(updates, np.int64), np.asarray(seconds, np.float64)))
  info = UAPInfo(fooling_rate=rate, fooling_rates=np.asarray(rates, np.float64),
                 passes=len(rates), converged=rate >= fool_rate,
                 updates=np.asarray(updates, np.int64), seconds=np.asarray(seconds, np.float64))
  return v, info


@functools.partial(xla.jit, static_argnums=(2, 3))
def _apply(x, v, clip_min, clip_max):
  return jnp.clip(x + v, clip_min, clip_max).astype(x.dtype)


def apply_uap(logits_fn: base.LogitsFn, x: jax.Array, labels: jax.Array, v: jax.Array, *,
              clip_min: float = 0.0, clip_max: float = 1.0) -> base.AttackOutput:
  """Applies a universal perturbation: ``x_adv = clip(x + v)``, with the attack diagnostics.

  Args:
    logits_fn: batched model.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (success = misclassified).
    v: the perturbation, of shape ``x.shape[1:]`` (or ``(1,) + x.shape[1:]``; a per-example
      ``x.shape`` is accepted too).
    clip_min: lower end of the box.
    clip_max: upper end of the box.

  Returns:
    ``AttackOutput(x_adv, info)`` with ``iterations = queries = 0`` (computing ``v`` is not
    per-example work).
  """
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  shape = tuple(np.shape(x))
  if tuple(np.shape(v)) not in (shape[1:], (1,) + shape[1:], shape):
    raise ValueError(f"v must have shape {shape[1:]} (one image; or {(1,) + shape[1:]}, or "
                     f"{shape} per example), got {tuple(np.shape(v))}.")
  if checks._is_concrete(v) and not np.all(np.isfinite(np.asarray(v, np.float32))):  # pylint: disable=protected-access
    raise ValueError("v contains NaN or Inf values.")
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)
  x_adv = _apply(x, jnp.asarray(v, x.dtype), float(clip_min), float(clip_max))
  return base.finalize(logits_fn, x, x_adv, labels, targeted=False, iterations=0, queries=0)


def uap_attack(logits_fn: base.LogitsFn, x: jax.Array, labels: jax.Array,
               key: jax.Array | None = None, *, perturbation: jax.Array, targeted: bool = False,
               clip_min: float = 0.0, clip_max: float = 1.0,
               loop_mode: str = "auto") -> base.AttackOutput:
  """UAP with the common attack signature: applies a precomputed ``perturbation`` from :func:`uap`.

  Args:
    logits_fn: batched model.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels.
    key: unused; accepted for the common signature.
    perturbation: ``v`` from :func:`uap`.
    targeted: must be False (UAP is untargeted).
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: unused; accepted for the common signature.

  Returns:
    ``AttackOutput(x_adv, info)``, see :func:`apply_uap`.

  References:
    Moosavi-Dezfooli, Fawzi, Fawzi, Frossard, "Universal adversarial perturbations", CVPR 2017.
    https://arxiv.org/abs/1610.08401
  """
  del key, loop_mode
  if targeted:
    raise ValueError("UAP is untargeted; call it with targeted=False and the true labels.")
  return apply_uap(logits_fn, x, labels, perturbation, clip_min=clip_min, clip_max=clip_max)
