"""The attack contract: result types, input checks, per-example keys and hyperparameters.

Every attack in advtrace is a pure function

    attack(logits_fn, x, labels, key, *, targeted=False, **hyperparameters) -> AttackOutput

- ``logits_fn`` maps a batch of NHWC images in the box to logits. Any function works: a
  registered model (``advtrace.models.logits_fn``), a watermarked copy, the attractor model.
- ``labels`` are the true labels for an untargeted attack and the target labels when
  ``targeted=True``.
- ``key`` is one typed PRNG key (row ``i`` then uses ``fold_in(key, i)``) or a batch of keys,
  one per row. A batch of keys makes row ``i`` of a batched call equal to the single-example
  call with ``keys[i:i+1]``, up to float rounding: XLA may round a model's arithmetic
  differently for another batch shape, and over thousands of steps an early-abort test can
  then stop on another step.
- Continuous hyperparameters (epsilon, step sizes, confidence, ...) are Python scalars or
  per-example arrays of shape ``(batch,)``.
- The output is already projected onto the threat model and clipped to the box; ``success`` is
  measured on that returned output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import checks
from advtrace._src import xla

LogitsFn = Callable[[jax.Array], jax.Array]


class AttackInfo(NamedTuple):
  """Per-example diagnostics returned with every adversarial batch.

  Attributes:
    success: bool[B], measured on the returned ``x_adv`` (misclassified for untargeted attacks,
      classified as the target for targeted ones).
    iterations: int32[B], optimisation steps the example actually used.
    queries: int32[B], model queries (forward evaluations) the attack spent on the example;
      exact for query-based attacks, the number of forward+backward passes for white-box ones.
    l0: number of changed input values (pixels times channels), float32[B].
    l2: ``||x_adv - x||_2`` per example, float32[B].
    linf: ``||x_adv - x||_inf`` per example, float32[B].
    predicted: int32[B], the model's label for ``x_adv``.
  """
  success: jax.Array
  iterations: jax.Array
  queries: jax.Array
  l0: jax.Array
  l2: jax.Array
  linf: jax.Array
  predicted: jax.Array


class AttackOutput(NamedTuple):
  """``(x_adv, info)``: the adversarial batch and its :class:`AttackInfo`."""
  x_adv: jax.Array
  info: AttackInfo


def check_inputs(x, labels, *, clip_min: float = 0.0, clip_max: float = 1.0) -> None:
  """Validates an attack's image batch and labels at the API boundary (no-op on tracers)."""
  if not clip_min < clip_max:
    raise ValueError(f"clip_min must be < clip_max, got clip_min={clip_min}, clip_max={clip_max}.")
  checks.check_images(x, "x", value_range=(clip_min, clip_max))
  checks.check_labels(labels, None, "labels", size=np.shape(x)[0])


def per_example(value, batch: int, name: str, *, allow_zero: bool = True) -> jax.Array:
  """Broadcasts a scalar or per-example hyperparameter to a float32 array of shape ``(batch,)``."""
  checks.check_positive(value, name, allow_zero=allow_zero)
  arr = jnp.asarray(value, jnp.float32)
  if arr.ndim == 0:
    return jnp.broadcast_to(arr, (batch,))
  if arr.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or have shape ({batch},) (one per example), "
                     f"got shape {arr.shape}.")
  return arr


def example_keys(key: jax.Array, batch: int) -> jax.Array:
  """One key per example: ``fold_in(key, i)`` for a single key, or the given batch of keys."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise TypeError("key must be a typed PRNG key from jax.random.key(seed), got an array of "
                    f"dtype {key.dtype}. Wrap a raw key with jax.random.wrap_key_data.")
  if key.shape == ():
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))
  if key.shape != (batch,):
    raise ValueError(f"key must be a single key or a batch of {batch} keys, got shape {key.shape}.")
  return key


def single_logits(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
  """Applies a batched ``logits_fn`` to one example (used inside per-example, vmapped code)."""
  return logits_fn(x[None])[0]


def is_success(logits: jax.Array, labels: jax.Array, targeted) -> jax.Array:
  """Untargeted: argmax differs from the label. Targeted: argmax equals the target."""
  pred = jnp.argmax(logits, axis=-1)
  return jnp.where(targeted, pred == labels, pred != labels)


def perturbation_norms(x: jax.Array, x_adv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example (L0, L2, Linf) norms of ``x_adv - x`` over all non-batch axes."""
  d = (x_adv - x).reshape(x.shape[0], -1).astype(jnp.float32)
  return (jnp.sum(d != 0, axis=1).astype(jnp.float32),
          jnp.sqrt(jnp.sum(d * d, axis=1)),
          jnp.max(jnp.abs(d), axis=1))


@functools.partial(xla.jit, static_argnames=("logits_fn", "targeted"))
def finalize(logits_fn: LogitsFn, x: jax.Array, x_adv: jax.Array, labels: jax.Array, *,
             targeted: bool, iterations, queries) -> AttackOutput:
  """Builds the :class:`AttackOutput` for an already projected and clipped ``x_adv``."""
  logits = logits_fn(x_adv)
  l0, l2, linf = perturbation_norms(x, x_adv)
  batch = x.shape[0]
  info = AttackInfo(
      success=is_success(logits, labels, targeted),
      iterations=jnp.broadcast_to(jnp.asarray(iterations, jnp.int32), (batch,)),
      queries=jnp.broadcast_to(jnp.asarray(queries, jnp.int32), (batch,)),
      l0=l0, l2=l2, linf=linf,
      predicted=jnp.argmax(logits, axis=-1).astype(jnp.int32))
  return AttackOutput(x_adv.astype(x.dtype), info)
