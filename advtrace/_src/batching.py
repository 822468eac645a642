"""Fixed-shape batching: every batch has the same shape, so jitted functions never retrace."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np


class Batch(NamedTuple):
  """One padded batch. ``mask`` is False on padding rows, which repeat row 0 of the batch."""
  x: np.ndarray
  y: np.ndarray | None
  mask: np.ndarray


def pad_to(a: np.ndarray, size: int) -> np.ndarray:
  """Pads the leading axis of ``a`` to ``size`` by repeating its first row."""
  n = a.shape[0]
  if n == size:
    return a
  if n == 0 or n > size:
    raise ValueError(f"cannot pad a batch of {n} rows to {size}")
  return np.concatenate([a, np.repeat(a[:1], size - n, axis=0)], axis=0)


def padded_batches(x: np.ndarray, y: np.ndarray | None, batch_size: int) -> Iterator[Batch]:
  """Yields batches of exactly ``batch_size`` rows in input order; the last one is padded.

  Padding repeats a real row (not zeros), so padded rows are valid inputs for any model or
  attack; callers drop them with ``mask``.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(x)
  for start in range(0, n, batch_size):
    xb = x[start:start + batch_size]
    yb = None if y is None else y[start:start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[:len(xb)] = True
    yield Batch(pad_to(xb, batch_size), None if yb is None else pad_to(yb, batch_size), mask)


def map_batched(fn: Callable[..., jax.Array], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Applies ``fn`` (ideally jitted) to ``x`` in fixed-size padded batches; returns a NumPy array.

  Rows come back in input order and padding rows are dropped.
  """
  outs = []
  for batch in padded_batches(np.asarray(x), None, min(batch_size, max(len(x), 1))):
    outs.append(np.asarray(fn(batch.x))[batch.mask])
  return np.concatenate(outs, axis=0)
