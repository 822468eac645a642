"""Tests for advtrace.data: loaders, validation, batching, DEEPSEC split and candidates."""

from __future__ import annotations

import io
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tfds_data_dir

from advtrace import data

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_tfds(data_dir, name, splits):
  """Writes a real, tiny tfds dataset (array_record) without TensorFlow.

  ``splits`` maps a split name to (uint8 images, labels). Images are PNG-encoded with PIL, as
  tfds does, and the metadata comes from the registered tfds builder, so ``load`` reads these
  files through exactly the code path used for the real dataset. (``tfds.testing.mock_data``
  cannot be used: in tfds 4.9.10 its mocked data source has an unbound ``__getitems__``.)
  """
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from PIL import Image

  builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
  os.makedirs(builder.data_dir)
  infos = []
  for split, (images, labels) in splits.items():
    path = os.path.join(builder.data_dir, f"{name}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      png = io.BytesIO()
      Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(png, "PNG")
      example = {"id": f"{split}_{i}", "image": io.BytesIO(png.getvalue()), "label": int(label)}
      if "id" not in builder.info.features:
        del example["id"]
      writer.write(builder.info.features.serialize_example(example))
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(labels)], num_bytes=0))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(builder.data_dir)


def _assert_unit_images(x, shape):
  assert x.shape == shape and x.dtype == np.float32
  assert 0.0 <= x.min() and x.max() <= 1.0


# --- digits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("split,n", [("train", 1438), ("test", 359), ("all", 1797)])
def test_digits_shapes_and_range(split, n):
  ds = data.load("digits", split)
  _assert_unit_images(ds.images, (n, 8, 8, 1))
  assert ds.labels.dtype == np.int32 and ds.labels.shape == (n,)
  assert set(np.unique(ds.labels)) == set(range(10))
  assert ds.name == "digits" and ds.num_classes == 10


def test_digits_values_deterministic_and_splits_partition():
  from sklearn.datasets import load_digits

  full = data.load("digits", "all")
  np.testing.assert_array_equal(full.images[..., 0], load_digits().images / 16.0)
  train, test = data.load("digits", "train"), data.load("digits", "test")
  again = data.load("digits", "test")
  np.testing.assert_array_equal(test.images, again.images)
  np.testing.assert_array_equal(test.labels, again.labels)

  def rows(ds):  # Sorted (image, label) rows: train + test must be a rearrangement of all.
    flat = np.concatenate([ds.images.reshape(len(ds.labels), -1), ds.labels[:, None]], axis=1)
    return flat[np.lexsort(flat.T[::-1])]

  both = data.Dataset(np.concatenate([train.images, test.images]),
                      np.concatenate([train.labels, test.labels]), "digits", 10)
  np.testing.assert_array_equal(rows(both), rows(full))


def test_digits_unknown_split():
  with pytest.raises(ValueError, match="validation"):
    data.load("digits", "validation")


def test_dataset_info_and_unknown_name():
  assert data.dataset_info("mnist") == ((28, 28, 1), 10)
  assert data.dataset_info("cifar10").image_shape == (32, 32, 3)
  assert data.dataset_info("digits").image_shape == (8, 8, 1)
  for bad in (lambda: data.load("imagenet"), lambda: data.dataset_info("imagenet")):
    with pytest.raises(ValueError, match="cifar10.*digits.*mnist"):
      bad()


# --- tfds: MNIST (real, shared) and CIFAR-10 (tiny real array_record files) -------------------


@pytest.fixture(scope="module")
def mnist_dir():
  root = tfds_data_dir()
  if root is None or not os.path.isdir(os.path.join(root, "mnist")):
    pytest.skip("prepared tfds MNIST not found: set TFDS_DATA_DIR or provide "
                "../shared/tensorflow_datasets/mnist")
  return root


def test_mnist_real(mnist_dir):
  test = data.load("mnist", "test", data_dir=mnist_dir)
  _assert_unit_images(test.images, (10000, 28, 28, 1))
  assert test.labels.dtype == np.int32 and test.num_classes == 10
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), MNIST_TEST_LABEL_COUNTS)
  # Exactly k / 255 for uint8 k, computed in float32 as torchvision's ToTensor does.
  as_u8 = np.round(test.images * 255).astype(np.uint8)
  np.testing.assert_array_equal(np.divide(as_u8, np.float32(255), dtype=np.float32), test.images)
  head = data.load("mnist", "test[:100]", data_dir=mnist_dir)  # Fixed record order.
  np.testing.assert_array_equal(head.images, test.images[:100])
  np.testing.assert_array_equal(head.labels, test.labels[:100])


@pytest.mark.slow  # Decoding 60,000 PNGs: ~10-25 s on 2 cores.
def test_mnist_train_real(mnist_dir):
  train = data.load("mnist", "train", data_dir=mnist_dir)
  _assert_unit_images(train.images, (60000, 28, 28, 1))
  fit, val = data.deepsec_split(train)
  assert (len(fit.labels), len(val.labels)) == (54000, 6000)


def test_cifar10_from_array_record(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  test_x = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
  test_y = np.arange(13) % 10
  train_x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  _write_tfds(tmp_path, "cifar10", {"test": (test_x, test_y), "train": (train_x, np.zeros(5))})

  ds = data.load("cifar10", "test", data_dir=str(tmp_path))
  _assert_unit_images(ds.images, (13, 32, 32, 3))
  np.testing.assert_array_equal(ds.images, test_x.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.labels, test_y)
  assert ds.labels.dtype == np.int32 and ds.name == "cifar10" and ds.num_classes == 10

  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # The default data dir.
  train = data.load("cifar10", "train")
  np.testing.assert_array_equal(train.images, train_x.astype(np.float32) / 255)
  np.testing.assert_array_equal(data.load("cifar10", "test[:4]").labels, test_y[:4])
  with pytest.raises(ValueError, match="validation"):
    data.load("cifar10", "validation")


@pytest.mark.parametrize("missing", ["dir", "dataset"])
def test_tfds_missing_data_error(tmp_path, missing):
  data_dir = str(tmp_path / "nowhere") if missing == "dir" else str(tmp_path)
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load("cifar10", data_dir=data_dir)
  assert isinstance(info.value, FileNotFoundError)
  msg = str(info.value)
  for part in ("'cifar10'", data_dir, "pip install 'advtrace[prepare]'", "download_and_prepare",
               "file_format='array_record'", "TFDS_DATA_DIR", "--data_dir"):
    assert part in msg, part
  assert not os.path.exists(tmp_path / "nowhere")  # Nothing was created or downloaded.


# --- .npz -------------------------------------------------------------------------------------


def _npz(tmp_path, **arrays):
  path = tmp_path / "user.npz"
  np.savez(path, **arrays)
  return path


def test_npz_uint8_round_trip(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
  y = np.array([0, 1, 2, 3, 4, 4], np.int64)
  ds = data.load(str(_npz(tmp_path, x=x, y=y)))
  np.testing.assert_array_equal(ds.images, x.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.labels, y)
  assert ds.labels.dtype == np.int32 and ds.num_classes == 5


def test_npz_float_grayscale_splits_and_num_classes(tmp_path):
  x = np.random.default_rng(1).random((4, 7, 7))
  path = _npz(tmp_path, x_train=x, y_train=np.array([0, 1, 1, 0]), x_test=x[:2],
              y_test=np.array([2, 2]))
  train = data.load(path, "train")  # A pathlib.Path works too.
  _assert_unit_images(train.images, (4, 7, 7, 1))
  np.testing.assert_array_equal(train.images[..., 0], x.astype(np.float32))
  # Inferred from every label array in the file, so both splits agree.
  assert train.num_classes == data.load(path, "test").num_classes == 3
  ds = data.load(_npz(tmp_path, x=x, y=np.array([0, 1, 1, 0]), num_classes=10), "anything")
  assert ds.num_classes == 10


@pytest.mark.parametrize("x,y,error,match", [
    (np.full((2, 4, 4, 1), np.nan), [0, 1], ValueError, "NaN"),
    (np.full((2, 4, 4, 1), 1.5), [0, 1], ValueError, "outside the allowed range"),
    (np.full((2, 4, 4, 1), -0.1), [0, 1], ValueError, "outside the allowed range"),
    (np.zeros((2, 16)), [0, 1], ValueError, "dimensions"),
    (np.zeros((2, 4, 4, 1, 1)), [0, 1], ValueError, "dimensions"),
    (np.zeros((2, 3, 8, 8)), [0, 1], ValueError, "channels"),
    (np.zeros((0, 4, 4, 1)), np.zeros(0, int), ValueError, "empty"),
    (np.full((2, 4, 4, 1), "a"), [0, 1], TypeError, "dtype"),
    (np.zeros((2, 4, 4, 1), bool), [0, 1], TypeError, "dtype"),
    (np.zeros((2, 4, 4, 1), np.int64), [0, 1], TypeError, "uint8"),
    (np.zeros((2, 4, 4, 1)), [0, 1, 1], ValueError, "3 labels but there are 2 images"),
    (np.zeros((2, 4, 4, 1)), [0.0, 1.0], TypeError, "integer"),
    (np.zeros((2, 4, 4, 1)), [True, False], TypeError, "integer"),
    (np.zeros((2, 4, 4, 1)), [[0], [1]], ValueError, "1-D"),
    (np.zeros((2, 4, 4, 1)), [-1, 1], ValueError, "outside"),
])
def test_npz_invalid(tmp_path, x, y, error, match):
  path = _npz(tmp_path, x=x, y=np.asarray(y))
  with pytest.raises(error, match=match):
    data.load(str(path))


def test_npz_label_above_num_classes(tmp_path):
  path = _npz(tmp_path, x=np.zeros((2, 4, 4, 1)), y=np.array([0, 10]), num_classes=10)
  with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
    data.load(str(path))


def test_npz_missing_keys_file_and_unsafe(tmp_path):
  with pytest.raises(ValueError, match=r"lacks the key\(s\) \['y'\].*'x_test' and 'y_test'"):
    data.load(str(_npz(tmp_path, x=np.zeros((2, 4, 4, 1)), labels=np.zeros(2, int))))
  with pytest.raises(data.DatasetNotFoundError, match="nope.npz"):
    data.load(str(tmp_path / "nope.npz"))
  obj = np.empty(2, object)
  np.savez(tmp_path / "obj.npz", x=np.zeros((2, 4, 4, 1)), y=obj)  # Would need pickle.
  with pytest.raises(ValueError, match="pickle"):
    data.load(str(tmp_path / "obj.npz"))
  np.save(tmp_path / "single.npy", np.zeros(3))
  os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
  with pytest.raises(ValueError, match="not an .npz archive"):
    data.load(str(tmp_path / "single.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="Cannot read"):
    data.load(str(tmp_path / "junk.npz"))


# --- batches ----------------------------------------------------------------------------------


def _indexed(n):
  """A dataset whose image i is filled with i, so rows can be traced through batching."""
  x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1)).copy()
  return data.Dataset(x, np.arange(n, dtype=np.int32), "indexed", n)


def _real_rows(batches):
  return np.concatenate([b.y[b.mask] for b in batches])


def test_batches_pad_without_loss():
  ds = _indexed(10)
  out = list(data.batches(ds, 4))
  assert len(out) == 3
  for b in out:
    assert b.x.shape == (4, 2, 2, 1) and b.y.shape == (4,) and b.mask.shape == (4,)
    np.testing.assert_array_equal(b.x[:, 0, 0, 0], b.y)  # Images and labels stay paired.
  assert [int(b.mask.sum()) for b in out] == [4, 4, 2]
  np.testing.assert_array_equal(_real_rows(out), np.arange(10))
  assert set(out[-1].y[~out[-1].mask]) <= set(range(10))  # Padding repeats real rows.
  (only,) = data.batches((ds.images, None), 16)
  assert only.y is None and only.x.shape[0] == 16 and only.mask.sum() == 10


def test_batches_shuffle_is_explicit_and_deterministic():
  ds = _indexed(37)
  order = lambda key: _real_rows(data.batches(ds, 8, shuffle_key=key))
  a = order(jax.random.key(3))
  np.testing.assert_array_equal(np.sort(a), np.arange(37))
  assert not np.array_equal(a, np.arange(37))
  np.testing.assert_array_equal(a, order(jax.random.key(3)))
  np.testing.assert_array_equal(a, order(3))
  assert not np.array_equal(a, order(jax.random.key(4)))
  for b in data.batches(ds, 8, shuffle_key=jax.random.key(3)):
    np.testing.assert_array_equal(b.x[:, 0, 0, 0], b.y)


def test_batches_drop_remainder_and_errors():
  ds = _indexed(10)
  out = list(data.batches(ds, 4, shuffle_key=jax.random.key(0), drop_remainder=True))
  assert len(out) == 2 and all(b.mask.all() for b in out)
  assert len(np.unique(_real_rows(out))) == 8
  with pytest.raises(ValueError, match="no batch"):
    list(data.batches(ds, 11, drop_remainder=True))
  with pytest.raises(ValueError, match="batch_size"):
    list(data.batches(ds, 0))
  with pytest.raises(ValueError, match="differ in length"):
    list(data.batches((ds.images, ds.labels[:3]), 4))


# --- DEEPSEC split and candidates -------------------------------------------------------------


def test_deepsec_split():
  ds = _indexed(1000)
  train, val = data.deepsec_split(ds)
  assert (len(train.labels), len(val.labels)) == (900, 100)
  assert not set(train.labels) & set(val.labels)
  np.testing.assert_array_equal(np.sort(np.concatenate([train.labels, val.labels])),
                                np.arange(1000))
  np.testing.assert_array_equal(train.images[:, 0, 0, 0], train.labels)
  again, _ = data.deepsec_split(ds)
  np.testing.assert_array_equal(train.labels, again.labels)
  other, _ = data.deepsec_split(ds, seed=101)
  assert not np.array_equal(train.labels, other.labels)

  # DEEPSEC's literal recipe, global NumPy state and a Python list included.
  state = np.random.get_state()
  try:
    indices = list(range(1000))
    np.random.seed(100)
    np.random.shuffle(indices)
  finally:
    np.random.set_state(state)
  np.testing.assert_array_equal(val.labels, indices[:100])
  np.testing.assert_array_equal(train.labels, indices[100:])
  assert len(data.deepsec_split(_indexed(6), valid_fraction=0.5)[1].labels) == 3
  with pytest.raises(ValueError, match="valid_fraction"):
    data.deepsec_split(ds, valid_fraction=1.5)


def _candidate_setup():
  """50 images whose first pixel encodes the class the dummy model predicts."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 50).astype(np.int32)
  predicted = np.where(rng.random(50) < 0.6, labels, (labels + 1) % 10)
  images = np.zeros((50, 4, 4, 1), np.float32)
  images[:, 0, 0, 0] = predicted / 10
  predict_fn = jax.jit(
      lambda x: jax.nn.one_hot(jnp.round(x[:, 0, 0, 0] * 10).astype(jnp.int32), 10))
  return data.Dataset(images, labels, "toy", 10), predict_fn, predicted


def test_select_candidates():
  ds, predict_fn, predicted = _candidate_setup()
  correct = np.flatnonzero(predicted == ds.labels)
  idx = data.select_candidates(predict_fn, ds, 12, batch_size=16)
  assert idx.shape == (12,) and len(set(idx)) == 12
  assert set(idx) <= set(correct)
  np.testing.assert_array_equal(idx, data.select_candidates(predict_fn, ds, 12))
  assert not np.array_equal(idx, data.select_candidates(predict_fn, ds, 12, seed=7))
  state = random.getstate()
  try:  # DEEPSEC: random.seed(seed); random.sample(successful, number).
    random.seed(100)
    np.testing.assert_array_equal(idx, random.sample(list(correct), 12))
  finally:
    random.setstate(state)
  assert sorted(data.select_candidates(predict_fn, ds, len(correct))) == list(correct)
  with pytest.raises(ValueError, match="classified correctly"):
    data.select_candidates(predict_fn, ds, len(correct) + 1)
  with pytest.raises(ValueError, match="logits of shape"):
    data.select_candidates(lambda x: predict_fn(x)[:, :5], ds, 3)
