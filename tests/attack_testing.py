"""Shared fixtures and property checks for attack tests (conventions.md §1).

Every attack test module builds an ``AttackCase`` (how to call the attack, which hyperparameter
makes it a no-op, which norm bounds it) and runs the generic checks below on it, so each
property is written once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from advtrace import data as adv_data

NORM_TOL = 1e-5  # float32 tolerance for the norm-bound property


@dataclasses.dataclass
class AttackCase:
  """How to exercise one attack.

  Attributes:
    name: a readable id.
    fn: ``fn(logits_fn, x, labels, key, **kwargs) -> AttackOutput``.
    kwargs: hyperparameters for a normal call.
    targeted: whether labels are targets; passed to the attack as ``targeted=True``.
    zero_kwargs: overrides that must make the attack return ``x`` exactly (eps=0 or 0 steps),
      or None if the attack has no such setting.
    norm: ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"`` bound to check, with ``eps_key`` naming the
      radius in kwargs; None for unbounded attacks.
    per_example: the name of a hyperparameter that accepts a per-example array, or None.
    per_example_values: two different values for it (mixed-array check).
    stochastic: whether different keys should give different outputs.
  """
  name: str
  fn: Callable[..., Any]
  kwargs: dict
  targeted: bool = False
  zero_kwargs: dict | None = None
  norm: str | None = None
  eps_key: str = "eps"
  per_example: str | None = "eps"
  per_example_values: tuple[float, float] = (0.1, 0.3)
  stochastic: bool = False

  def __call__(self, logits_fn, x, labels, key, **overrides):
    kwargs = {**self.kwargs, **overrides}
    if self.targeted:
      kwargs["targeted"] = True
    return self.fn(logits_fn, x, labels, key, **kwargs)


# ---------------------------------------------------------------------------- models


class _MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


@functools.lru_cache(maxsize=None)
def digits_model():
  """A small MLP trained on scikit-learn digits (~97% test accuracy), trained once per process.

  Returns:
    ``(logits_fn, x, y)``: the model and 64 correctly classified test images with labels.
  """
  # Train with XLA's default optimisations whatever the calling module set, so that every test
  # module gets the same weights whichever one trains them first.
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    return _train_digits_model()
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def _train_digits_model():
  train = adv_data.load("digits", "train")
  test = adv_data.load("digits", "test")
  model = _MLP()
  params = model.init(jax.random.key(0), train.images[:1])
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  x, y = jnp.asarray(train.images), jnp.asarray(train.labels)
  for _ in range(400):
    params, opt_state = step(params, opt_state, x, y)
  logits_fn = jax.jit(lambda z: model.apply(params, z))
  pred = np.asarray(jnp.argmax(logits_fn(test.images), -1))
  ok = np.flatnonzero(pred == test.labels)[:64]
  return logits_fn, jnp.asarray(test.images[ok]), jnp.asarray(test.labels[ok])


def linear_model(num_classes: int = 10, shape=(8, 8, 1), seed: int = 0):
  """A random linear classifier ``logits = W x + b`` with its weights (for closed forms)."""
  kw, kb = jax.random.split(jax.random.key(seed))
  dim = int(np.prod(shape))
  w = jax.random.normal(kw, (dim, num_classes)) / np.sqrt(dim)
  b = 0.1 * jax.random.normal(kb, (num_classes,))
  return (lambda x: x.reshape(x.shape[0], -1) @ w + b), w, b


def targets_for(labels):
  """A deterministic target different from each label."""
  return (jnp.asarray(labels) + 1) % 10


class RowCounter:
  """A model that counts the rows it evaluates at run time (through a debug callback), i.e.
  the queries actually made; call ``jax.effects_barrier()`` before reading ``rows``."""

  def __init__(self, fn):
    self.fn = fn
    self.rows = 0

  def _add(self, n):
    self.rows += int(n)

  def __call__(self, x):
    jax.debug.callback(self._add, jnp.int32(x.shape[0]))
    return self.fn(x)


def run_in_batches(fn, logits_fn, x, labels, size=4, **kwargs):
  """Runs an attack on batches of ``size`` rows and concatenates the outputs.

  Batches of the shape the property tests compiled (4) reuse their compiled steps, and batch
  consistency makes the result equal to one big batch. Batch ``i`` (rows ``i`` to
  ``i + size``) gets the key ``jax.random.key(i)``.

  Args:
    fn: ``fn(logits_fn, x, labels, key, **kwargs) -> AttackOutput``: an attack or an
      ``AttackCase``.
    logits_fn: the model.
    x: images.
    labels: labels or targets.
    size: rows per batch.
    **kwargs: hyperparameters passed to every call.

  Returns:
    The concatenated ``AttackOutput``.
  """
  outs = [fn(logits_fn, x[i:i + size], labels[i:i + size], jax.random.key(i), **kwargs)
          for i in range(0, x.shape[0], size)]
  return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


class CountingLogits:
  """Wraps a logits function and counts Python-level calls, i.e. traces under jit."""

  def __init__(self, fn):
    self.fn = fn
    self.calls = 0

  def __call__(self, x):
    self.calls += 1
    return self.fn(x)


# ---------------------------------------------------------------------------- properties


def _labels(case: AttackCase, y):
  return targets_for(y) if case.targeted else y


def check_shape_dtype(case: AttackCase, logits_fn, x, y):
  out = case(logits_fn, x, _labels(case, y), jax.random.key(0))
  assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
  n = x.shape[0]
  for field in ("success", "iterations", "queries", "l0", "l2", "linf", "predicted"):
    assert getattr(out.info, field).shape == (n,), field
  return out


def check_zero_is_identity(case: AttackCase, logits_fn, x, y):
  if case.zero_kwargs is None:
    return
  out = case(logits_fn, x, _labels(case, y), jax.random.key(0), **case.zero_kwargs)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(x))


def norm_of(delta, norm):
  d = np.asarray(delta, np.float64).reshape(delta.shape[0], -1)
  return {"linf": lambda: np.abs(d).max(1), "l2": lambda: np.sqrt((d * d).sum(1)),
          "l1": lambda: np.abs(d).sum(1), "l0": lambda: (d != 0).sum(1)}[norm]()


def check_bounds(case: AttackCase, out, x, clip=(0.0, 1.0)):
  xa = np.asarray(out.x_adv)
  assert xa.min() >= clip[0] and xa.max() <= clip[1], (xa.min(), xa.max())
  assert np.all(np.isfinite(xa))
  if case.norm is not None:
    eps = np.broadcast_to(np.asarray(case.kwargs[case.eps_key], np.float64), (x.shape[0],))
    n = norm_of(xa - np.asarray(x), case.norm)
    assert np.all(n <= eps * (1 + NORM_TOL) + NORM_TOL), (n.max(), eps.max())
  # The reported norms describe the returned output.
  np.testing.assert_allclose(np.asarray(out.info.linf), norm_of(xa - np.asarray(x), "linf"),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.info.l2), norm_of(xa - np.asarray(x), "l2"),
                             rtol=1e-4, atol=1e-5)


def check_success_flag(out, logits_fn, labels, targeted):
  pred = np.asarray(jnp.argmax(logits_fn(out.x_adv), -1))
  expect = pred == np.asarray(labels) if targeted else pred != np.asarray(labels)
  np.testing.assert_array_equal(np.asarray(out.info.success), expect)


def check_determinism(case: AttackCase, logits_fn, x, y):
  labels = _labels(case, y)
  a = case(logits_fn, x, labels, jax.random.key(3))
  b = case(logits_fn, x, labels, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(a.x_adv), np.asarray(b.x_adv))
  if case.stochastic:
    c = case(logits_fn, x, labels, jax.random.key(4))
    assert not np.array_equal(np.asarray(a.x_adv), np.asarray(c.x_adv))


def check_batch_consistency(case: AttackCase, logits_fn, x, y, rows=(0, 2), atol=1e-5):
  labels = _labels(case, y)
  keys = jax.random.split(jax.random.key(5), x.shape[0])
  full = case(logits_fn, x, labels, keys)
  for i in rows:
    single = case(logits_fn, x[i:i + 1], labels[i:i + 1], keys[i:i + 1])
    np.testing.assert_allclose(np.asarray(single.x_adv[0]), np.asarray(full.x_adv[i]), atol=atol)
    assert bool(single.info.success[0]) == bool(full.info.success[i])


def check_per_example_hparam(case: AttackCase, logits_fn, x, y, atol=1e-5):
  if case.per_example is None:
    return
  labels = _labels(case, y)
  keys = jax.random.split(jax.random.key(6), x.shape[0])
  name, (v1, v2) = case.per_example, case.per_example_values
  scalar = case(logits_fn, x, labels, keys, **{name: v1})
  vector = case(logits_fn, x, labels, keys, **{name: jnp.full((x.shape[0],), v1)})
  np.testing.assert_allclose(np.asarray(vector.x_adv), np.asarray(scalar.x_adv), atol=atol)
  mixed_vals = jnp.where(jnp.arange(x.shape[0]) % 2 == 0, v1, v2)
  mixed = case(logits_fn, x, labels, keys, **{name: mixed_vals})
  other = case(logits_fn, x, labels, keys, **{name: v2})
  even, odd = np.arange(x.shape[0]) % 2 == 0, np.arange(x.shape[0]) % 2 == 1
  np.testing.assert_allclose(np.asarray(mixed.x_adv)[even], np.asarray(scalar.x_adv)[even],
                             atol=atol)
  np.testing.assert_allclose(np.asarray(mixed.x_adv)[odd], np.asarray(other.x_adv)[odd],
                             atol=atol)


def check_no_retrace(case: AttackCase, logits_fn, x, y):
  """A second batch of the same shape must not trace the model again."""
  counting = CountingLogits(logits_fn)
  labels = _labels(case, y)
  case(counting, x, labels, jax.random.key(0))
  first = counting.calls
  assert first > 0
  x2 = jnp.clip(x[::-1] + 0.0, 0.0, 1.0)
  case(counting, x2, labels[::-1], jax.random.key(1))
  assert counting.calls == first, f"retraced: {counting.calls - first} new model traces"


def check_input_not_modified(case: AttackCase, logits_fn, x, y):
  before = np.array(x, copy=True)
  case(logits_fn, x, _labels(case, y), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(x), before)


def run_standard_properties(case: AttackCase, logits_fn, x, y):
  """Properties 1-7 and 10 of conventions.md §1, plus the success flag and input immutability."""
  out = check_shape_dtype(case, logits_fn, x, y)
  check_bounds(case, out, x)
  check_success_flag(out, logits_fn, _labels(case, y), case.targeted)
  check_zero_is_identity(case, logits_fn, x, y)
  check_determinism(case, logits_fn, x, y)
  check_batch_consistency(case, logits_fn, x, y)
  check_per_example_hparam(case, logits_fn, x, y)
  check_no_retrace(case, logits_fn, x, y)
  check_input_not_modified(case, logits_fn, x, y)
