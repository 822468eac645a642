r"""Injected attractors: the combined model, the forensic detector F_d and recovery F_r.

The victim classifier :math:`C` is bound to the QIM decoder :math:`W` (``advtrace._src.qim``)
by the normalised sum of eq. (2),

.. math::
  M(x) = \frac{C(x) + W(x)}{\lVert C(x) + W(x) \rVert_1}, \qquad C = \mathrm{softmax}(z),

exposed to attacks as the logits-like ``log M`` (D6), so every attack of the library runs on it
unchanged. An attack that pushes class *k* of :math:`M` up or down unknowingly pushes
:math:`w_k` too; F_d flags the anomaly in :math:`w` and F_r recovers the label as
:math:`\arg\min w`.

References:
  Zhang, Chang, Lee, "Detection and Recovery of Adversarial Attacks with Injected Attractors",
  2020. https://arxiv.org/abs/2003.02732 (§V, eqs. 1-3).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import qim
from advtrace._src.attacks.base import LogitsFn

_LOG_EPS = 1e-12


# ------------------------------------------------------------------------------ models


def _decoder(messages, cfg, x):
  return qim.decode(x, messages, cfg)


def decoder_fn(secret: qim.SecretKey, cfg: qim.QIMConfig = qim.QIMConfig()):
  """``x -> W(x)``, shape ``(batch, num_messages)``."""
  return functools.partial(_decoder, secret.messages, cfg)


def combine(c: jax.Array, w: jax.Array) -> jax.Array:
  """Eq. (2) from its parts, as logits: ``log((C + W) / |C + W|)``.

  Args:
    c: the classifier's class probabilities, shape ``(..., num_classes)``.
    w: the decoder's outputs ``W(x)`` for the same inputs, same shape.

  Returns:
    ``log M``, same shape; its softmax is ``M``.
  """
  s = c + w
  return jnp.log(s / jnp.sum(s, axis=-1, keepdims=True) + _LOG_EPS)


def _combined_logits(classifier, messages, cfg, x):
  return combine(jax.nn.softmax(classifier(x), axis=-1), qim.decode(x, messages, cfg))


def attractor_logits_fn(classifier: LogitsFn, secret: qim.SecretKey,
                        cfg: qim.QIMConfig = qim.QIMConfig()) -> LogitsFn:
  """The combined model of eq. (2) as logits ``log M(x)``; ``softmax(log M) = M``.

  Args:
    classifier: the victim ``C`` as a batched logits function.
    secret: the decoder's messages (one per class of ``C``).
    cfg: the decoder settings.

  Returns:
    A batched logits function. Create it once and reuse it: attacks cache their compiled steps
    on the function object.
  """
  return functools.partial(_combined_logits, classifier, secret.messages, cfg)


def _weighted_sum_logits(classifier, messages, cfg, threshold, slope, x):
  c = jax.nn.softmax(classifier(x), axis=-1)
  w = qim.decode(x, messages, cfg)
  trap = w / jnp.sum(w, axis=-1, keepdims=True)  # the trapdoor decoder's class distribution
  detector = jax.nn.sigmoid(slope * (jnp.max(w, axis=-1, keepdims=True) / cfg.a2 - threshold))
  return jnp.log(detector * trap + (1.0 - detector) * c + _LOG_EPS)


def weighted_sum_logits_fn(classifier: LogitsFn, secret: qim.SecretKey,
                           cfg: qim.QIMConfig = qim.QIMConfig(), *, threshold: float = 0.95,
                           slope: float = 100.0) -> LogitsFn:
  r"""The paper's counter-example, eq. (1): :math:`M = D \cdot W + (1 - D) \cdot C`.

  The trapdoor detector :math:`D(x) = \sigma(\text{slope} \cdot (\max_k w_k / A_2 -
  \text{threshold}))` is ~0 on clean inputs (clean images sit near :math:`\max w / A_2 \approx
  \tanh 1 \approx 0.76`) and ~1 at an attractor, and the trapdoor decoder is :math:`W` normalised
  to a distribution. On clean inputs both the output and the input gradient are dominated by
  :math:`C`, so gradient attacks ignore the attractors (Fig. 6). Used for ablation (a).
  """
  return functools.partial(_weighted_sum_logits, classifier, secret.messages, cfg,
                           float(threshold), float(slope))


# ------------------------------------------------------------------------------ forensics


class Calibration(NamedTuple):
  """Thresholds of F_d calibrated on clean data (D7), and the score's standardisation.

  Attributes:
    upper: U of C1 (max w > U).
    lower: L of C2 (min w < L).
    sigma0: sigma_0 of C3 (std w > sigma_0).
    tail: the common one-sided tail mass that realised ``target_fpr`` on the calibration set.
    target_fpr: the false-positive rate asked for.
    calibration_fpr: the rate actually flagged on the calibration set.
    mean: per-statistic mean (max, min, std) on the calibration set, for the score.
    scale: per-statistic standard deviation on the calibration set.
  """
  upper: float
  lower: float
  sigma0: float
  tail: float
  target_fpr: float
  calibration_fpr: float
  mean: tuple[float, float, float]
  scale: tuple[float, float, float]


def w_statistics(w: jax.Array) -> jax.Array:
  """Per example ``(max w, min w, std w)``; shape ``(batch, 3)``. ``std`` is the population SD."""
  return jnp.stack([jnp.max(w, -1), jnp.min(w, -1), jnp.std(w, -1)], axis=-1)


def _flags_at(stats: np.ndarray, upper, lower, sigma0) -> np.ndarray:
  return np.stack([stats[:, 0] > upper, stats[:, 1] < lower, stats[:, 2] > sigma0], -1)


def _thresholds(stats: np.ndarray, tail: float):
  return (np.quantile(stats[:, 0], 1.0 - tail), np.quantile(stats[:, 1], tail),
          np.quantile(stats[:, 2], 1.0 - tail))


def calibrate(w_clean, target_fpr: float, *, iterations: int = 60) -> Calibration:
  """Sets U, L and sigma_0 so that C1 or C2 or C3 flags ``target_fpr`` of clean inputs (D7).

  Each threshold is a one-sided quantile with the same tail mass ``t`` (upper for max and std,
  lower for min); ``t`` is found by bisection so that the union of the three conditions flags
  ``target_fpr`` of the calibration set. Never calibrate on the evaluation set.

  Args:
    w_clean: decoder outputs on held-out clean images, shape ``(n, num_messages)``.
    target_fpr: the false-positive rate to realise, in (0, 1).
    iterations: bisection steps.
  """
  if not 0.0 < target_fpr < 1.0:
    raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}.")
  stats = np.asarray(w_statistics(jnp.asarray(w_clean)), np.float64)
  if stats.shape[0] < 2 or not np.all(np.isfinite(stats)):
    raise ValueError("calibration needs at least 2 clean decoder outputs, all finite; got "
                     f"{stats.shape[0]} rows.")
  lo, hi = 0.0, target_fpr
  for _ in range(iterations):
    tail = 0.5 * (lo + hi)
    fpr = _flags_at(stats, *_thresholds(stats, tail)).any(-1).mean()
    lo, hi = (tail, hi) if fpr <= target_fpr else (lo, tail)
  upper, lower, sigma0 = _thresholds(stats, lo)
  realised = float(_flags_at(stats, upper, lower, sigma0).any(-1).mean())
  return Calibration(float(upper), float(lower), float(sigma0), float(lo), float(target_fpr),
                     realised, tuple(map(float, stats.mean(0))),
                     tuple(map(float, np.maximum(stats.std(0), 1e-12))))


def detect(w: jax.Array, cal: Calibration) -> tuple[jax.Array, jax.Array]:
  """F_d: ``(flagged, conditions)``; conditions is bool ``(batch, 3)`` for C1, C2, C3."""
  s = w_statistics(w)
  conditions = jnp.stack([s[:, 0] > cal.upper, s[:, 1] < cal.lower, s[:, 2] > cal.sigma0], -1)
  return jnp.any(conditions, -1), conditions


def detection_score(w: jax.Array, cal: Calibration) -> jax.Array:
  """A threshold-free score for AUC: the largest standardised exceedance of the three statistics."""
  s = w_statistics(w)
  mean, scale = jnp.asarray(cal.mean), jnp.asarray(cal.scale)
  z = (s - mean) / scale
  return jnp.max(jnp.stack([z[:, 0], -z[:, 1], z[:, 2]], -1), -1)


def recover(w: jax.Array) -> jax.Array:
  """F_r: the recovered label ``argmin W(x)``."""
  return jnp.argmin(w, axis=-1)


def _integrated_logits(classifier, messages, cfg, cal, x):
  logits = _combined_logits(classifier, messages, cfg, x)
  w = qim.decode(x, messages, cfg)
  flagged, _ = detect(w, cal)
  served, recovered = jnp.argmax(logits, -1), recover(w)
  idx = jnp.arange(logits.shape[-1])
  # D10: on flagged inputs swap the entries of the served and the recovered label, so that
  # argmax equals the label F_r returns while gradients still flow through M.
  perm = jnp.where(idx == served[:, None], recovered[:, None],
                   jnp.where(idx == recovered[:, None], served[:, None], idx))
  swapped = jnp.take_along_axis(logits, perm, axis=-1)
  return jnp.where(flagged[:, None], swapped, logits)


def integrated_logits_fn(classifier: LogitsFn, secret: qim.SecretKey, cal: Calibration,
                         cfg: qim.QIMConfig = qim.QIMConfig()) -> LogitsFn:
  """M_(d,r): classify, detect, recover, as one logits-like function that attacks can target.

  Its argmax is ``argmax M(x)`` when F_d does not flag ``x`` and ``argmin W(x)`` when it does.
  """
  return functools.partial(_integrated_logits, classifier, secret.messages, cfg, cal)
