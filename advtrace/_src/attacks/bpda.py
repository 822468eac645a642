"""Backward Pass Differentiable Approximation (BPDA) for non-differentiable preprocessing.

``bpda(logits_fn, preprocess, backward)`` is a new ``logits_fn`` whose forward pass is
``logits_fn(preprocess(x))`` and whose backward pass through ``preprocess`` uses the VJP of the
differentiable ``backward(x)`` instead (default: the identity, i.e. the straight-through
estimator). Every attack in the library then runs on it unchanged, e.g.
``pgd(bpda(f, quantize), x, y, key, eps=0.3, step_size=0.04, num_steps=100)``.

The wrapper is a frozen dataclass, equal (and hashed) by its three functions, so two wrappers of
the same functions share the attacks' jit caches. Pass module-level functions (or one
``functools.partial`` object reused), not a new lambda per call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from advtrace._src.attacks import base
from advtrace._src.attacks import gradient

Preprocess = Callable[[jax.Array], jax.Array]


def quantize(x: jax.Array, levels: int = 256) -> jax.Array:
  """Rounds ``x`` in [0, 1] to ``levels`` evenly spaced values: ``round(255 x) / 255`` for 256.

  Its gradient is zero almost everywhere, which stops plain gradient attacks.
  """
  if levels < 2:
    raise ValueError(f"levels must be >= 2, got {levels}.")
  scale = levels - 1
  return jnp.round(x * scale) / scale


def _identity(x: jax.Array) -> jax.Array:
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _approximated(preprocess: Preprocess, backward: Preprocess, x: jax.Array) -> jax.Array:
  return preprocess(x)


def _approximated_fwd(preprocess, backward, x):
  return preprocess(x), x


def _approximated_bwd(preprocess, backward, x, cotangent):
  del preprocess
  _, vjp = jax.vjp(backward, x)
  return vjp(cotangent)


_approximated.defvjp(_approximated_fwd, _approximated_bwd)


@dataclasses.dataclass(frozen=True)
class BPDALogits:
  """``logits_fn(preprocess(x))`` with the backward pass of ``backward`` through ``preprocess``."""
  logits_fn: base.LogitsFn
  preprocess: Preprocess
  backward: Preprocess = _identity

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.logits_fn(_approximated(self.preprocess, self.backward, x))


def bpda(logits_fn: base.LogitsFn, preprocess: Preprocess,
         backward: Preprocess | None = None) -> BPDALogits:
  """Wraps a model with non-differentiable preprocessing for gradient attacks (BPDA).

  Args:
    logits_fn: batched model, images to logits.
    preprocess: the (possibly non-differentiable) input transformation, e.g. :func:`quantize`.
    backward: a differentiable function with ``backward(x) ~ preprocess(x)`` whose VJP replaces
      that of ``preprocess``; None for the identity (straight-through estimator).

  Returns:
    A ``logits_fn`` whose forward pass is ``logits_fn(preprocess(x))`` and whose gradient is
    ``J_backward(x)^T grad logits_fn(preprocess(x))``.

  References:
    Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security:
    Circumventing Defenses to Adversarial Examples", ICML 2018. https://arxiv.org/abs/1802.00420
  """
  if not callable(logits_fn) or not callable(preprocess):
    raise TypeError("logits_fn and preprocess must be callables mapping image batches to "
                    "arrays.")
  if backward is not None and not callable(backward):
    raise TypeError(f"backward must be a callable or None, got {type(backward).__name__}.")
  return BPDALogits(logits_fn, preprocess, _identity if backward is None else backward)


def bpda_pgd(logits_fn: base.LogitsFn, x: jax.Array, labels: jax.Array, key: jax.Array, *,
             eps, step_size, num_steps: int, preprocess: Preprocess = quantize,
             backward: Preprocess | None = None, targeted: bool = False,
             **kw) -> base.AttackOutput:
  """PGD (L-inf by default) through BPDA: ``pgd(bpda(logits_fn, preprocess, backward), ...)``.

  Success and the returned diagnostics are those of the preprocessed model. Seed 003 Table VIII
  (from the Trapdoor paper): ``eps=0.3, num_steps=100, step_size=0.04`` with ``quantize``.

  Args:
    logits_fn: the model without its preprocessing.
    x: images, NHWC in ``[clip_min, clip_max]``.
    labels: true labels (untargeted) or target labels (``targeted=True``).
    key: a typed PRNG key, or one per example (PGD's random start).
    eps: the radius of the ball; scalar or per-example.
    step_size: the step per iteration; scalar or per-example.
    num_steps: iterations.
    preprocess: the non-differentiable preprocessing (default :func:`quantize`).
    backward: its differentiable approximation (default identity).
    targeted: whether ``labels`` are targets.
    **kw: further arguments of :func:`advtrace.attacks.pgd` (``norm``, ``random_start``, ...).

  Returns:
    ``AttackOutput(x_adv, info)``.

  References:
    Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security:
    Circumventing Defenses to Adversarial Examples", ICML 2018. https://arxiv.org/abs/1802.00420
  """
  return gradient.pgd(bpda(logits_fn, preprocess, backward), x, labels, key, eps=eps,
                      step_size=step_size, num_steps=num_steps, targeted=targeted, **kw)
