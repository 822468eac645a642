"""Input validation shared by every public entry point.

Each check raises a ``ValueError`` (or ``TypeError`` for dtypes) whose message
says what was wrong and how to fix it. Checks run on concrete (host) arrays at
API boundaries, never inside traced code: under ``jit`` the values are unknown,
so :func:`check_images` only validates shape and dtype there.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_images(
    x,
    name: str = "x",
    *,
    rank: int = 4,
    channels: Sequence[int] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> None:
  """Checks that ``x`` is a float image batch in NHWC layout with values in range.

  Args:
    x: the array to check.
    name: its name, used in error messages.
    rank: the expected number of dimensions (4 for a batch, 3 for one image).
    channels: allowed channel counts (last axis), or None for any.
    value_range: inclusive (low, high) bounds on the values.

  Raises:
    TypeError: if ``x`` is not a floating-point array.
    ValueError: on a wrong rank or channel count, NaN/Inf, or out-of-range values.
  """
  shape = np.shape(x)
  dtype = np.asarray(x).dtype if _is_concrete(x) else x.dtype
  if len(shape) != rank:
    layout = "NHWC (batch, height, width, channels)" if rank == 4 else "HWC"
    raise ValueError(
        f"{name} must have {rank} dimensions in {layout} layout, got shape {shape}. "
        "Add a batch axis with x[None] for a single image, or transpose NCHW "
        "data with x.transpose(0, 2, 3, 1).")
  if channels is not None and shape[-1] not in channels:
    raise ValueError(
        f"{name} has {shape[-1]} channels (last axis, shape {shape}); expected one of "
        f"{tuple(channels)}. Images must be NHWC; NCHW input must be transposed.")
  if not np.issubdtype(dtype, np.floating) and dtype != jax.numpy.bfloat16:
    raise TypeError(
        f"{name} must be a floating-point array with values in {list(value_range)}, got "
        f"dtype {dtype}. Convert uint8 images with x.astype(np.float32) / 255.")
  if not _is_concrete(x):
    return
  arr = np.asarray(x, dtype=np.float32)
  if arr.size == 0:
    raise ValueError(f"{name} is empty (shape {shape}); pass at least one image.")
  if not np.all(np.isfinite(arr)):
    bad = int(np.sum(~np.isfinite(arr)))
    raise ValueError(f"{name} contains {bad} NaN or Inf values; clean the input first.")
  lo, hi = value_range
  if arr.min() < lo or arr.max() > hi:
    raise ValueError(
        f"{name} has values in [{arr.min():.4g}, {arr.max():.4g}], outside the allowed range "
        f"[{lo}, {hi}]. Scale images to [0, 1] (e.g. divide uint8 images by 255).")


def check_labels(y, num_classes: int | None = None, name: str = "y", *, size: int | None = None):
  """Checks that ``y`` is a 1-D integer label vector with values in [0, num_classes)."""
  shape = np.shape(y)
  dtype = np.asarray(y).dtype if _is_concrete(y) else y.dtype
  if len(shape) != 1:
    raise ValueError(f"{name} must be a 1-D vector of integer labels, got shape {shape}.")
  if size is not None and shape[0] != size:
    raise ValueError(f"{name} has {shape[0]} labels but there are {size} images; they must match.")
  if not np.issubdtype(dtype, np.integer):
    raise TypeError(f"{name} must hold integer class labels, got dtype {dtype}. "
                    "Pass class indices (not one-hot vectors or floats).")
  if num_classes is not None and _is_concrete(y) and shape[0]:
    arr = np.asarray(y)
    if arr.min() < 0 or arr.max() >= num_classes:
      raise ValueError(f"{name} has labels in [{arr.min()}, {arr.max()}], outside "
                       f"[0, {num_classes}).")


def check_choice(value: str, choices, what: str) -> None:
  """Raises a ValueError naming the valid choices when ``value`` is not one of them."""
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}. Valid choices: {', '.join(sorted(choices))}.")


def check_positive(value, name: str, *, allow_zero: bool = True) -> None:
  """Checks a scalar or per-example hyperparameter array for finite, non-negative values."""
  if not _is_concrete(value):
    return
  arr = np.asarray(value, dtype=np.float64)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  if np.any(arr < 0) or (not allow_zero and np.any(arr == 0)):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {value!r}.")
