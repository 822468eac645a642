r"""OptMargin: CW-L2 whose adversarial example also survives fixed small random offsets.

.. math::
  \min_w \; \|x'(w) - x\|_2^2 + c \sum_{j=1}^{n} f\big(\Pi_{box}(x'(w) + u_j)\big)

with :math:`x'(w)` CW's tanh parametrisation, :math:`f` the margin loss (confidence
:math:`\kappa`), and :math:`u_1, \dots, u_{n-1}` orthogonal random offsets, :math:`u_n = 0`
(the point itself). The result sits away from the decision boundary in many directions, which
defeats region-based classification defences. The optimiser and binary search are CW-L2's
(``cw.tanh_attack``); the ``n`` copies of an example go through the model as one batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import xla
from advtrace._src.attacks import base
from advtrace._src.attacks import binary_search
from advtrace._src.attacks import cw
from advtrace._src.attacks import loop

NOISE_SCALINGS = ("linf", "rms")
DECISION_RULES = ("point", "all")


def noise_vectors(key: jax.Array, shape: tuple[int, ...], noise_count: int, noise_mag,
                  scaling: str = "linf") -> jax.Array:
  """One example's OptMargin offsets, shape ``(noise_count,) + shape``; the last one is zero.

  ``noise_count`` Gaussian vectors are orthonormalised by QR, then scaled by ``noise_mag``:
  ``"linf"`` divides by their largest entry, so the largest entry over all offsets is
  ``noise_mag`` (DEEPSEC); ``"rms"`` multiplies by ``sqrt(d)``, so each offset's
  root-mean-square entry is ``noise_mag`` (the authors' code). The last offset is then set to
  zero in both, as in both codes.

  Args:
    key: a typed PRNG key for this example.
    shape: one image's shape ``(H, W, C)``.
    noise_count: the number of offsets, the zero one included.
    noise_mag: their magnitude (scalar, may be traced).
    scaling: ``"linf"`` or ``"rms"``.

  Returns:
    The offsets, float32.
  """
  dim = int(np.prod(shape))
  q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, noise_count)))
  if scaling == "linf":
    q = q / jnp.max(jnp.abs(q))
  else:
    q = q * np.sqrt(dim)
  noise = (q * noise_mag).T.reshape((noise_count,) + tuple(shape))
  return noise.at[-1].set(0.0)


@functools.partial(xla.jit, static_argnums=(1, 2, 4))
def _batch_noise(keys, shape, noise_count, noise_mag, scaling):
  return jax.vmap(lambda k, m: noise_vectors(k, shape, noise_count, m, scaling))(keys, noise_mag)


def _check_noise(x, noise_count, noise_scaling):
  dim = int(np.prod(np.shape(x)[1:]))
  if isinstance(noise_count, bool) or not isinstance(noise_count, int) or not (
      1 <= noise_count <= dim):
    raise ValueError(f"noise_count must be an integer in [1, {dim}] (the number of offsets, "
                     f"at most the image size), got {noise_count!r}.")
  if noise_scaling not in NOISE_SCALINGS:
    raise ValueError(f"Unknown noise_scaling {noise_scaling!r}. Valid choices: "
                     f"{', '.join(NOISE_SCALINGS)}.")


def optmargin(
    logits_fn: base.LogitsFn,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    targeted: bool = False,
    initial_const=0.02,
    kappa=0.0,
    learning_rate=0.2,
    binary_search_steps: int = 4,
    max_iterations: int = 10000,
    noise_count: int = 20,
    noise_mag=0.3,
    noise_scaling: str = "linf",
    decision_rule: str = "point",
    abort_early: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    loop_mode: str = "auto",
) -> base.AttackOutput:
  r"""OptMargin (DEEPSEC's OM), a minimal-perturbation L2 attack robust to small noise.

  CW-L2 (``cw_l2``) with the margin loss summed over ``noise_count`` copies
  :math:`\Pi_{box}(x' + u_j)` (module docstring). The offsets are drawn once per example from
  its key and stay fixed over all steps and rounds. The closest iterate that passes the
  ``decision_rule`` (with confidence ``kappa``) is the example's answer:

  - ``"point"`` (DEEPSEC): the copy with zero offset, i.e. the point itself, is adversarial.
    The closest such iterate is usually the first one past the boundary, before the noise
    terms have pushed it further, so the answer is close to CW-L2's and is rarely robust to
    the offsets.
  - ``"all"`` (the authors' code): every copy is adversarial, so the answer is robust to the
    offsets it was optimised against.

  ``success`` in the output is the plain classification of the returned ``x_adv``; the fraction
  of copies that are adversarial is reported by :func:`optmargin_noise_success`. An example
  never found adversarial returns ``x`` with ``success=False``.

  Settings: the defaults are DEEPSEC's MNIST settings (Table VII): c0 0.02, 4 binary steps,
  lr 0.2, 20 offsets (the zero one included: 19 noisy copies and the point), noise_mag 0.3,
  10,000 iterations, kappa 0; DEEPSEC runs them without early abort (``abort_early=False``).
  CIFAR-10: ``initial_const=1, learning_rate=0.02, noise_mag=0.03137``. Differences from
  DEEPSEC: offsets are drawn per example (row ``i`` of a batch gets the offsets of the
  single-example call with key ``i``) rather than once per batch; a failure returns ``x``
  (DEEPSEC returns zeros); DEEPSEC's bisection bug (``binary_search.py``) is not reproduced.
  The authors' code instead scales the offsets to RMS ``noise_mag`` (``noise_scaling="rms"``)
  and uses ``decision_rule="all"``.

  Args:
    logits_fn: batched model, NHWC images to logits.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example (draws the offsets).
    targeted: whether ``labels`` are targets (DEEPSEC's OM is untargeted).
    initial_const: ``c`` of the first round (> 0); scalar or per-example.
    kappa: confidence margin (>= 0); scalar or per-example.
    learning_rate: Adam's step size; scalar or per-example.
    binary_search_steps: rounds of the search over ``c`` (0 returns ``x``).
    max_iterations: Adam steps per round (0 returns ``x``).
    noise_count: copies per example, the zero offset included.
    noise_mag: the offsets' magnitude (>= 0); scalar or per-example.
    noise_scaling: ``"linf"`` (DEEPSEC) or ``"rms"`` (the authors' code); see
      :func:`noise_vectors`.
    decision_rule: ``"point"`` (DEEPSEC) or ``"all"`` (the authors' code), see above.
    abort_early: stop an example's round when its loss stalls (CW's rule).
    clip_min: lower end of the box.
    clip_max: upper end of the box.
    loop_mode: ``"auto"``, ``"host"`` or ``"fused"`` (see ``advtrace._src.attacks.loop``).

  Returns:
    ``AttackOutput(x_adv, info)``; ``info.iterations`` counts Adam steps and ``info.queries``
    model evaluations (``noise_count`` forward and backward passes per step).

  References:
    He, Li, Song, "Decision Boundary Analysis of Adversarial Examples", ICLR 2018.
    https://openreview.net/forum?id=BkpiPMbA-
  """
  base.check_inputs(x, labels, clip_min=clip_min, clip_max=clip_max)
  binary_search.check_search_args(binary_search_steps, max_iterations)
  _check_noise(x, noise_count, noise_scaling)
  if decision_rule not in DECISION_RULES:
    raise ValueError(f"Unknown decision_rule {decision_rule!r}. Valid choices: "
                     f"{', '.join(DECISION_RULES)}.")
  loop.resolve_loop(loop_mode)
  x = jnp.asarray(x)
  batch = x.shape[0]
  noise = _batch_noise(base.example_keys(key, batch), x.shape[1:], noise_count,
                       base.per_example(noise_mag, batch, "noise_mag"), noise_scaling)
  return cw.tanh_attack(
      logits_fn, x, jnp.asarray(labels, jnp.int32), targeted=bool(targeted),
      initial_const=base.per_example(initial_const, batch, "initial_const", allow_zero=False),
      kappa=base.per_example(kappa, batch, "kappa"),
      learning_rate=base.per_example(learning_rate, batch, "learning_rate", allow_zero=False),
      binary_search_steps=binary_search_steps, max_iterations=max_iterations,
      abort_early=bool(abort_early), noise=noise, clip_min=clip_min, clip_max=clip_max,
      loop_mode=loop_mode, all_copies=decision_rule == "all")


@functools.partial(xla.jit, static_argnames=("logits_fn", "targeted", "clip_min", "clip_max"))
def _noise_success(logits_fn, x_adv, labels, noise, *, targeted, clip_min, clip_max):
  copies = jnp.clip(x_adv[:, None] + noise, clip_min, clip_max)
  logits = logits_fn(copies.reshape((-1,) + x_adv.shape[1:]))
  pred = jnp.argmax(logits, -1).reshape(noise.shape[:2])
  hit = pred == labels[:, None] if targeted else pred != labels[:, None]
  return jnp.mean(hit.astype(jnp.float32), axis=1)


def optmargin_noise_success(
    logits_fn: base.LogitsFn,
    x_adv: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    targeted: bool = False,
    noise_count: int = 20,
    noise_mag=0.3,
    noise_scaling: str = "linf",
    clip_min: float = 0.0,
    clip_max: float = 1.0,
) -> jax.Array:
  """The fraction of OptMargin's copies of ``x_adv`` that are adversarial, per example.

  Pass the ``key`` and noise settings given to :func:`optmargin` to score its own offsets, or
  a fresh key to test robustness to unseen offsets of the same size. The zero offset (the
  point itself) is one of the ``noise_count`` copies.

  Args:
    logits_fn: batched model.
    x_adv: adversarial images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or targets (``targeted=True``).
    key: a typed PRNG key, or one per example.
    targeted: whether ``labels`` are targets.
    noise_count: copies per example, the zero offset included.
    noise_mag: offset magnitude; scalar or per-example.
    noise_scaling: ``"linf"`` or ``"rms"`` (see :func:`noise_vectors`).
    clip_min: lower end of the box.
    clip_max: upper end of the box.

  Returns:
    float32[B] in [0, 1].
  """
  base.check_inputs(x_adv, labels, clip_min=clip_min, clip_max=clip_max)
  _check_noise(x_adv, noise_count, noise_scaling)
  x_adv = jnp.asarray(x_adv)
  batch = x_adv.shape[0]
  noise = _batch_noise(base.example_keys(key, batch), x_adv.shape[1:], noise_count,
                       base.per_example(noise_mag, batch, "noise_mag"), noise_scaling)
  return _noise_success(logits_fn, x_adv, jnp.asarray(labels, jnp.int32), noise,
                        targeted=bool(targeted), clip_min=float(clip_min),
                        clip_max=float(clip_max))
