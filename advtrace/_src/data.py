"""In-memory image datasets: tfds MNIST / CIFAR-10, scikit-learn digits, and user ``.npz`` files.

Every loader returns NHWC float32 images in [0, 1] and int32 labels as NumPy arrays.

Order. ``mnist`` and ``cifar10`` come in the record order of the prepared tfds split (read
through ``tfds.data_source``, array_record format, no TensorFlow). tfds shuffles examples once,
when the dataset is prepared, so this order is fixed and deterministic, but it is *not* the
order of the original idx / binary files: index ``i`` here is not index ``i`` in torchvision.
``digits`` uses a fixed permutation (see :func:`load`); ``.npz`` files keep their stored order.

Testing. ``tfds.testing.mock_data`` does not work here: in tfds 4.9.10 its mocked source has an
unbound ``__getitems__`` and it ignores ``data_dir``. Write a tiny real array_record dataset
instead (``_write_tfds`` in ``tests/test_data.py`` does this without TensorFlow).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from advtrace._src import batching
from advtrace._src import checks

Batch = batching.Batch

_TFDS_DATASETS = ("mnist", "cifar10")
_DIGITS_SPLITS = ("train", "test", "all")
_DIGITS_SEED = 0
_READ_CHUNK = 1024


class Dataset(NamedTuple):
  """An image classification dataset held in memory.

  Attributes:
    images: float32 array of shape (N, H, W, C), values in [0, 1].
    labels: int32 array of shape (N,).
    name: the dataset name (``'mnist'``, ``'cifar10'``, ``'digits'``, or the ``.npz`` path).
    num_classes: the number of classes.
  """
  images: np.ndarray
  labels: np.ndarray
  name: str
  num_classes: int


class DatasetInfo(NamedTuple):
  """Static facts about a built-in dataset."""
  image_shape: tuple[int, int, int]
  num_classes: int


_INFO = {
    "mnist": DatasetInfo((28, 28, 1), 10),
    "cifar10": DatasetInfo((32, 32, 3), 10),
    "digits": DatasetInfo((8, 8, 1), 10),
}


class DatasetNotFoundError(FileNotFoundError):
  """A dataset (or its data dir, or its ``.npz`` file) is missing or not prepared."""


def dataset_info(name: str) -> DatasetInfo:
  """Returns the image shape (H, W, C) and class count of a built-in dataset."""
  checks.check_choice(name, _INFO, "dataset")
  return _INFO[name]


def load(name: str | os.PathLike, split: str = "test", data_dir: str | None = None) -> Dataset:
  """Loads a whole dataset split into memory.

  Args:
    name: ``'mnist'`` or ``'cifar10'`` (tfds, array_record), ``'digits'`` (scikit-learn's
      bundled 8x8 digits, offline), or the path of a ``.npz`` file with keys ``x`` (images)
      and ``y`` (integer labels). ``x`` is uint8 in [0, 255] or float in [0, 1], NHWC; a 3-D
      ``x`` is read as NHW grayscale. An optional scalar key ``num_classes`` sets the class
      count, which otherwise is 1 + the largest label in any ``y``/``y_*`` array of the file.
    split: for tfds datasets any tfds split spec (``'test'``, ``'train'``,
      ``'train[:10%]'``). For ``digits``: ``'train'`` (1438 images), ``'test'`` (359) or
      ``'all'`` (1797, scikit-learn order); test is the first ``n // 5`` entries of the
      permutation ``np.random.RandomState(0).permutation(n)``, train the rest. For ``.npz``:
      keys ``x_<split>``/``y_<split>`` are used when present, else ``x``/``y`` (split ignored).
    data_dir: tfds data dir; defaults to ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

  Returns:
    A :class:`Dataset`; see the module docstring for the (deterministic) example order.

  Raises:
    DatasetNotFoundError: the data dir, the prepared dataset or the ``.npz`` file is missing.
    ValueError: unknown dataset name or split, or malformed ``.npz`` contents.
    TypeError: ``.npz`` arrays of the wrong dtype.
  """
  if isinstance(name, os.PathLike) or str(name).lower().endswith(".npz"):
    return _load_npz(Path(name), split)
  if name not in _INFO:
    raise ValueError(f"Unknown dataset {name!r}. Valid names: {', '.join(sorted(_INFO))}, "
                     "or the path of a .npz file with keys 'x' and 'y'.")
  if name == "digits":
    return _load_digits(split)
  return _load_tfds(name, split, data_dir)


def _load_digits(split: str) -> Dataset:
  from sklearn.datasets import load_digits

  checks.check_choice(split, _DIGITS_SPLITS, "digits split")
  digits = load_digits()
  images = (digits.images[..., None] / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  if split != "all":
    perm = np.random.RandomState(_DIGITS_SEED).permutation(len(labels))
    n_test = len(labels) // 5
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    images, labels = images[idx], labels[idx]
  return Dataset(images, labels, "digits", 10)


def _prepare_hint(name: str, data_dir: str) -> str:
  return (
      f"To prepare it once (needs internet and TensorFlow, only for this step):\n"
      f"  pip install 'advtrace[prepare]'\n"
      f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
      f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"\n"
      f"Then point advtrace at that directory with the TFDS_DATA_DIR environment variable, "
      f"the --data_dir flag, or load(..., data_dir=...).")


def _resolve_data_dir(data_dir: str | None) -> str:
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def _tfds_source(name: str, split: str, data_dir: str):
  """Opens a prepared tfds split as a random-access source, with clear errors when missing."""
  import tensorflow_datasets as tfds

  if not os.path.isdir(data_dir):
    raise DatasetNotFoundError(
        f"Dataset {name!r}: the tfds data dir {data_dir} does not exist.\n"
        + _prepare_hint(name, data_dir))
  # tfds.data_source would try to download and prepare a missing dataset (which needs
  # TensorFlow) and report it confusingly, so check for the prepared files first.
  builder = tfds.builder(name, data_dir=data_dir)
  if not os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):
    raise DatasetNotFoundError(
        f"Dataset {name!r} (version {builder.version}) is not prepared in the tfds data dir "
        f"{data_dir}: {builder.data_dir}/dataset_info.json is missing.\n"
        + _prepare_hint(name, data_dir))
  if builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
    raise DatasetNotFoundError(
        f"Dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
        "but random access without TensorFlow needs array_record. Prepare it again into "
        "another directory with file_format='array_record'.\n" + _prepare_hint(name, data_dir))
  return builder.as_data_source(split=split)


def _load_tfds(name: str, split: str, data_dir: str | None) -> Dataset:
  data_dir = _resolve_data_dir(data_dir)
  source = _tfds_source(name, split, data_dir)
  info = _INFO[name]
  n = len(source)
  images = np.empty((n, *info.image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  # Batched reads are ~30% faster than one record at a time; PNG decoding dominates.
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, n)))
    for i, example in zip(keys, source.__getitems__(keys), strict=True):
      images[i] = example["image"]
      labels[i] = example["label"]
  checks.check_labels(labels, info.num_classes, name=f"{name} labels")
  return Dataset(_to_unit_float(images), labels, name, info.num_classes)


def _to_unit_float(images_u8: np.ndarray) -> np.ndarray:
  # float32 division, as torchvision's ToTensor does, so inputs match DEEPSEC bit for bit.
  return np.divide(images_u8, np.float32(255), dtype=np.float32)


def _load_npz(path: Path, split: str) -> Dataset:
  if not path.is_file():
    raise DatasetNotFoundError(f"Dataset file {path} does not exist.")
  try:
    archive = np.load(path, allow_pickle=False)
  except Exception as e:  # np.load raises several types on corrupt or non-NumPy files.
    raise ValueError(f"Cannot read {path} as a NumPy .npz archive: {e}") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single array, not an .npz archive with keys 'x' and 'y'. "
                     "Save with np.savez(path, x=images, y=labels).")
  with archive:
    arrays = {k: _read_array(archive, k, path) for k in archive.files}
  xk, yk = (f"x_{split}", f"y_{split}") if f"x_{split}" in arrays else ("x", "y")
  missing = [k for k in (xk, yk) if k not in arrays]
  if missing:
    raise ValueError(
        f"{path} lacks the key(s) {missing}; it has {sorted(arrays)}. Expected 'x' (images) and "
        f"'y' (labels), or 'x_{split}' and 'y_{split}'.")
  images = _npz_images(arrays[xk], f"{path}[{xk!r}]")
  y, what = arrays[yk], f"{path}[{yk!r}]"
  checks.check_labels(y, name=what, size=len(images))
  if "num_classes" in arrays:
    num_classes = arrays["num_classes"]
    if num_classes.shape or num_classes.dtype.kind not in "iu" or num_classes < 1:
      raise ValueError(f"{path}['num_classes'] must be a positive integer scalar, got "
                       f"{num_classes!r}.")
    num_classes = int(num_classes)
  else:  # Infer from every label array, so that all splits of one file agree.
    label_arrays = [a for k, a in arrays.items() if (k == "y" or k.startswith("y_")) and a.size]
    num_classes = 1 + max(int(a.max()) for a in label_arrays if a.dtype.kind in "iu")
  checks.check_labels(y, num_classes, name=what)
  return Dataset(images, y.astype(np.int32), str(path), num_classes)


def _read_array(archive, key: str, path: Path) -> np.ndarray:
  try:
    return archive[key]
  except ValueError as e:  # Object arrays need pickle, which we never allow.
    raise ValueError(f"{path}[{key!r}] cannot be loaded without pickle ({e}); store a plain "
                     "numeric array.") from e


def _npz_images(x: np.ndarray, what: str) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]  # NHW grayscale.
  if x.dtype == np.uint8:
    x = _to_unit_float(x)
  elif not np.issubdtype(x.dtype, np.floating):
    raise TypeError(f"{what} has dtype {x.dtype}; images must be uint8 in [0, 255] or float "
                    "in [0, 1].")
  checks.check_images(x, what, channels=(1, 3))
  return x.astype(np.float32, copy=False)


def batches(
    data: Dataset | tuple[np.ndarray, np.ndarray | None],
    batch_size: int,
    *,
    shuffle_key: jax.Array | int | None = None,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
  """Yields fixed-shape batches of a dataset, optionally in a shuffled order.

  Every batch has exactly ``batch_size`` rows, so a jitted step never retraces. Without
  ``drop_remainder`` the last batch is padded by repeating a real row and ``mask`` marks the
  real rows (see :func:`advtrace._src.batching.padded_batches`); each example appears exactly
  once with ``mask`` True.

  Args:
    data: a :class:`Dataset` or an ``(images, labels)`` pair; labels may be None.
    batch_size: rows per batch.
    shuffle_key: None for the stored order; else a JAX PRNG key (or an int seed for
      ``jax.random.key``) that fixes the permutation. Use ``jax.random.fold_in(key, epoch)``
      for a new order each epoch.
    drop_remainder: drop the last incomplete batch instead of padding it (for training).

  Returns:
    An iterator of ``Batch(x, y, mask)`` NumPy batches.
  """
  x, y = (data.images, data.labels) if isinstance(data, Dataset) else data
  checks.check_positive(batch_size, "batch_size", allow_zero=False)
  n = len(x)
  if y is not None and len(y) != n:
    raise ValueError(f"images and labels differ in length: {n} vs {len(y)}.")
  if drop_remainder and n < batch_size:
    raise ValueError(f"drop_remainder=True with {n} examples and batch_size {batch_size} "
                     "would yield no batch; lower batch_size.")
  if shuffle_key is None:
    order = np.arange(n)
  else:
    key = jax.random.key(shuffle_key) if isinstance(shuffle_key, int) else shuffle_key
    order = np.asarray(jax.random.permutation(key, n))
  if drop_remainder:
    order = order[:n - n % batch_size]
  # Batch the indices, then gather: padding logic stays in one place and x is never copied whole.
  for idx in batching.padded_batches(order, None, batch_size):
    yield Batch(x[idx.x], None if y is None else y[idx.x], idx.mask)


def deepsec_split(
    dataset: Dataset, valid_fraction: float = 0.1, seed: int = 100
) -> tuple[Dataset, Dataset]:
  """Splits a training set into train and validation parts the way DEEPSEC does.

  Mirrors ``RawModels/Utils/dataset.py::get_mnist_train_validate_loader``: shuffle
  ``range(n)`` with NumPy's legacy generator seeded with ``seed``, take the first
  ``floor(valid_fraction * n)`` indices for validation and the rest for training (60,000 ->
  54,000 / 6,000 for MNIST). Our tfds record order differs from torchvision's, so the exact
  images in each part differ from DEEPSEC's even though the index sets are the same.

  Args:
    dataset: the full training set.
    valid_fraction: fraction of examples held out for validation, in [0, 1].
    seed: the NumPy seed (DEEPSEC uses 100).

  Returns:
    ``(train, val)`` datasets, each in the shuffled order.

  References:
    Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
    IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
  """
  if not 0.0 <= valid_fraction <= 1.0:
    raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}.")
  n = len(dataset.labels)
  idx = np.arange(n)
  np.random.RandomState(seed).shuffle(idx)  # Same stream as np.random.seed(seed); shuffle.
  split = int(np.floor(valid_fraction * n))
  return _subset(dataset, idx[split:]), _subset(dataset, idx[:split])


def _subset(dataset: Dataset, idx: np.ndarray) -> Dataset:
  return dataset._replace(images=dataset.images[idx], labels=dataset.labels[idx])


def select_candidates(
    predict_fn: Callable[[jax.Array], jax.Array],
    dataset: Dataset,
    number: int,
    seed: int = 100,
    *,
    batch_size: int = 256,
) -> np.ndarray:
  """Draws DEEPSEC's evaluation candidates: ``number`` correctly classified examples.

  Mirrors ``CleanDatasets/CandidatesSelection.py``: collect the correctly classified examples
  in dataset order, then ``random.sample`` them with Python's generator seeded with ``seed``.

  Args:
    predict_fn: maps a batch of images (B, H, W, C) to logits (B, num_classes); jit it.
    dataset: the test set.
    number: how many candidates to draw (DEEPSEC: 1000).
    seed: the Python ``random`` seed (DEEPSEC: 100).
    batch_size: batch size for ``predict_fn``.

  Returns:
    int64 indices into ``dataset``, in draw order (not sorted).

  References:
    Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
    IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
  """
  checks.check_positive(number, "number")
  logits = batching.map_batched(predict_fn, dataset.images, batch_size)
  if logits.shape != (len(dataset.labels), dataset.num_classes):
    raise ValueError(f"predict_fn must return logits of shape (batch, {dataset.num_classes}); "
                     f"got {logits.shape} for {len(dataset.labels)} images.")
  correct = np.flatnonzero(np.argmax(logits, axis=-1) == dataset.labels)
  if number > len(correct):
    raise ValueError(f"Asked for {number} candidates but only {len(correct)} of "
                     f"{len(dataset.labels)} examples are classified correctly.")
  return np.asarray(random.Random(seed).sample(correct.tolist(), number), np.int64)
