"""DEEPSEC victim models: the restricted .pt reader, the Flax import, and NumPy cross-checks.

The references here are independent of the code under test: NumPy forward passes in PyTorch's
NCHW layout, written from the DEEPSEC model definitions, fed straight from the reader's arrays
(no Flax, no layout conversion).
"""

from __future__ import annotations

import pickle
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import deepsec_weights
from conftest import tfds_data_dir
from flax import traverse_util

from advtrace._src import evaluation
from advtrace._src.models import deepsec_weights as dw
from advtrace._src.models import registry
from third_party.deepsec import legacy_torch

MNIST_PT = deepsec_weights("MNIST_raw.pt")
CIFAR_PT = deepsec_weights("CIFAR10_raw.pt")
needs_mnist_pt = pytest.mark.skipif(
    MNIST_PT is None, reason="../shared/weights/deepsec/MNIST_raw.pt is absent")
needs_cifar_pt = pytest.mark.skipif(
    CIFAR_PT is None, reason="../shared/weights/deepsec/CIFAR10_raw.pt is absent")


# ------------------------------------------------------------------------------ NumPy reference


def np_conv2d(x, w, b=None, stride=1, pad=0):
  """NCHW x OIHW cross-correlation with symmetric zero padding, via stride tricks + einsum."""
  if pad:
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  x = np.ascontiguousarray(x)
  n, c, h, wd = x.shape
  _, _, kh, kw = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  s = x.strides
  patches = np.lib.stride_tricks.as_strided(
      x, (n, c, oh, ow, kh, kw), (s[0], s[1], s[2] * stride, s[3] * stride, s[2], s[3]))
  out = np.einsum("nchwij,ocij->nohw", patches, w, optimize=True)
  return out if b is None else out + b[None, :, None, None]


def np_maxpool2(x):
  n, c, h, w = x.shape
  return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def np_bn(x, sd, prefix):
  scale = sd[f"{prefix}.weight"] / np.sqrt(sd[f"{prefix}.running_var"] + 1e-5)
  shift = sd[f"{prefix}.bias"] - sd[f"{prefix}.running_mean"] * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def relu(x):
  return np.maximum(x, 0)


def np_mnist_logits(sd, x_nchw):
  """DEEPSEC MNISTConvNet.forward in NumPy (eval mode)."""
  h = relu(np_conv2d(x_nchw, sd["conv32.0.weight"], sd["conv32.0.bias"]))
  h = np_maxpool2(relu(np_conv2d(h, sd["conv32.2.weight"], sd["conv32.2.bias"])))
  h = relu(np_conv2d(h, sd["conv64.0.weight"], sd["conv64.0.bias"]))
  h = np_maxpool2(relu(np_conv2d(h, sd["conv64.2.weight"], sd["conv64.2.bias"])))
  h = h.reshape(len(h), -1)  # out.view(-1, 4 * 4 * 64) on NCHW.
  h = relu(h @ sd["fc1.weight"].T + sd["fc1.bias"])
  h = relu(h @ sd["fc2.weight"].T + sd["fc2.bias"])
  h = h @ sd["fc3.weight"].T + sd["fc3.bias"]
  return h - h.max(axis=1, keepdims=True)


def np_resnet20_logits(sd, x_nchw):
  """DEEPSEC resnet20_cifar.forward in NumPy (eval mode)."""
  h = relu(np_bn(np_conv2d(x_nchw, sd["conv1.weight"], sd["conv1.bias"], pad=1), sd, "bn1"))
  for layer, stride in ((1, 1), (2, 2), (3, 2)):
    for j in range(3):
      p = f"layer{layer}.{j}"
      s = stride if j == 0 else 1
      out = relu(np_bn(np_conv2d(h, sd[f"{p}.conv1.weight"], stride=s, pad=1), sd, f"{p}.bn1"))
      out = np_bn(np_conv2d(out, sd[f"{p}.conv2.weight"], pad=1), sd, f"{p}.bn2")
      if f"{p}.downsample.0.weight" in sd:
        h = np_bn(np_conv2d(h, sd[f"{p}.downsample.0.weight"], sd[f"{p}.downsample.0.bias"],
                            stride=s), sd, f"{p}.downsample.1")
      h = relu(out + h)
  h = h.mean(axis=(2, 3))
  h = h @ sd["fc.weight"].T + sd["fc.bias"]
  return h - h.max(axis=1, keepdims=True)


def random_variables(model, input_shape, seed=0):
  """Random variables from NumPy (cheap: no JAX PRNG compilation); BN variances positive."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape),
                                             train=False))
  rng = np.random.RandomState(seed)
  flat = traverse_util.flatten_dict(shapes)
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "var":
      out[path] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    else:
      fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
      out[path] = (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------ reader


@needs_mnist_pt
def test_reader_mnist_file():
  sd = legacy_torch.load_state_dict(MNIST_PT)
  assert len(sd) == 14
  assert list(sd)[:2] == ["conv32.0.weight", "conv32.0.bias"]
  assert sd["conv32.0.weight"].shape == (32, 1, 3, 3)
  assert sd["conv64.2.weight"].shape == (64, 64, 3, 3)
  assert sd["fc1.weight"].shape == (200, 1024)
  assert sd["fc3.bias"].shape == (10,)
  assert all(v.dtype == np.float32 for v in sd.values())
  assert sum(v.size for v in sd.values()) == 312_202
  assert all(np.isfinite(v).all() for v in sd.values())


@needs_cifar_pt
def test_reader_cifar_file():
  sd = legacy_torch.load_state_dict(CIFAR_PT)
  assert len(sd) == 131
  assert sd["conv1.weight"].shape == (16, 3, 3, 3)
  assert sd["conv1.bias"].shape == (16,)
  assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
  assert sd["layer3.0.downsample.1.running_var"].shape == (64,)
  assert sd["fc.weight"].shape == (10, 64)
  trackers = [k for k in sd if k.endswith("num_batches_tracked")]
  assert len(trackers) == 21
  assert all(sd[k].dtype == np.int64 and sd[k].shape == () and sd[k] == 144_921 for k in trackers)
  trainable = sum(v.size for k, v in sd.items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert trainable == 272_586
  assert all(np.all(v > 0) for k, v in sd.items() if k.endswith("running_var"))


def _pickle_calling(module: str, name: str, arg: str) -> bytes:
  """A protocol-2 pickle body that calls ``module.name(arg)`` when loaded (no PROTO/STOP)."""
  data = arg.encode()
  return (f"c{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(data)) + data
          + b"\x85R")


def _legacy_file(magic_pickle: bytes, state_pickle: bytes, keys_pickle: bytes) -> bytes:
  sys_info = {"protocol_version": 1001, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  return (magic_pickle + pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
          + state_pickle + keys_pickle)


def _payloads(marker):
  return {
      ("os", "system"): f"touch {marker}",
      ("posix", "system"): f"touch {marker}",
      ("builtins", "eval"): f"open({str(marker)!r}, 'w').close()",
      ("builtins", "exec"): f"open({str(marker)!r}, 'w').close()",
  }


@pytest.mark.parametrize("where", ["state_dict", "inside_ordered_dict", "header", "key_list"])
@pytest.mark.parametrize("target", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                    ("builtins", "exec")])
def test_reader_refuses_malicious_pickle(tmp_path, where, target):
  marker = tmp_path / "pwned"
  evil = _pickle_calling(*target, _payloads(marker)[target])
  proto, stop = b"\x80\x02", b"."
  good_magic = pickle.dumps(legacy_torch.MAGIC_NUMBER, protocol=2)
  empty_state = b"\x80\x02ccollections\nOrderedDict\n)R."
  empty_keys = pickle.dumps([], protocol=2)
  if where == "state_dict":
    raw = _legacy_file(good_magic, proto + evil + stop, empty_keys)
  elif where == "inside_ordered_dict":
    # An allowed global first, then the payload as the value of a state-dict entry.
    state = b"\x80\x02ccollections\nOrderedDict\n)RX\x01\x00\x00\x00w" + evil + b"s."
    raw = _legacy_file(good_magic, state, empty_keys)
  elif where == "header":
    raw = _legacy_file(proto + evil + stop, empty_state, empty_keys)
  else:
    raw = _legacy_file(good_magic, empty_state, proto + evil + stop)
  path = tmp_path / "evil.pt"
  path.write_bytes(raw)
  with pytest.raises(legacy_torch.LegacyTorchError, match=rf"refused global {'.'.join(target)}"):
    legacy_torch.load_state_dict(path)
  with pytest.raises(ValueError, match="refused global"), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # The unknown-digest warning.
    dw.load_deepsec(path)
  assert not marker.exists(), "the payload ran"


def test_reader_payload_marker_is_a_real_check(tmp_path):
  """The marker payload does run under plain pickle, so its absence above means something."""
  marker = tmp_path / "pwned"
  evil = b"\x80\x02" + _pickle_calling("builtins", "eval", _payloads(marker)[("builtins", "eval")])
  pickle.loads(evil + b".")  # Trusted here: our own payload, proving the marker mechanism.
  assert marker.exists()


@needs_mnist_pt
def test_reader_truncated_file(tmp_path):
  raw = MNIST_PT.read_bytes()
  for cut, message in ((len(raw) - 100, "truncated"), (len(raw) - 3, "truncated"),
                       (1000, "state dict is not a valid pickle"), (0, "magic number")):
    path = tmp_path / f"cut{cut}.pt"
    path.write_bytes(raw[:cut])
    with pytest.raises(legacy_torch.LegacyTorchError, match=message):
      legacy_torch.load_state_dict(path)


@needs_mnist_pt
def test_reader_bad_magic_protocol_and_trailing_bytes(tmp_path):
  raw = MNIST_PT.read_bytes()
  magic_len = len(pickle.dumps(legacy_torch.MAGIC_NUMBER, protocol=2))
  assert raw[:magic_len] == pickle.dumps(legacy_torch.MAGIC_NUMBER, protocol=2)
  cases = {
      "bad_magic": (pickle.dumps(0x1950A86A20F9469CFC6D, protocol=2) + raw[magic_len:],
                    "bad magic number"),
      "zip": (b"PK\x03\x04" + raw[4:], "magic number"),
      "bad_protocol": (raw[:magic_len] + pickle.dumps(1002, protocol=2) + raw[magic_len + 6:],
                       "protocol version"),
      "trailing": (raw + b"\x00", "1 unexpected trailing bytes"),
  }
  for name, (data, message) in cases.items():
    path = tmp_path / f"{name}.pt"
    path.write_bytes(data)
    with pytest.raises(legacy_torch.LegacyTorchError, match=message):
      legacy_torch.load_state_dict(path)


@needs_mnist_pt
def test_reader_count_mismatch(tmp_path):
  raw = bytearray(MNIST_PT.read_bytes())
  # Storages follow the sorted key list; in this file the last one is conv32.0.weight's (288
  # floats), so its int64 element count sits 8 + 4 * 288 bytes before the end.
  count_pos = len(raw) - 4 * 288 - 8
  assert struct.unpack_from("<q", raw, count_pos)[0] == 288
  struct.pack_into("<q", raw, count_pos, 289)
  path = tmp_path / "count.pt"
  path.write_bytes(bytes(raw))
  with pytest.raises(legacy_torch.LegacyTorchError, match="289 elements"):
    legacy_torch.load_state_dict(path)


def test_reader_honours_offset_and_stride():
  data = np.arange(20, dtype=np.float32)
  storage = legacy_torch._Storage("k", data.dtype, 20)
  ref = legacy_torch._TensorRef(storage, 2, (3, 4), (1, 3))  # A transposed (4, 3) view.
  np.testing.assert_array_equal(legacy_torch._to_array(ref, data, "t"),
                                data[2:14].reshape(4, 3).T)
  too_long = legacy_torch._TensorRef(storage, 10, (4, 3), (3, 1))
  with pytest.raises(legacy_torch.LegacyTorchError, match="past the end"):
    legacy_torch._to_array(too_long, data, "t")


# ------------------------------------------------------------------------------ Flax models


def test_parameter_counts_and_stages():
  for name, count, buffers in (("deepsec_mnist", 312_202, 0), ("deepsec_resnet20", 272_586, 1_568)):
    model = registry.get_model(name)
    variables = jax.eval_shape(lambda m=model, n=name: m.init(
        jax.random.key(0), jnp.zeros(dw.INPUT_SHAPES[n]), train=False))
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    n_stats = sum(x.size for x in jax.tree.leaves(variables.get("batch_stats", {})))
    assert (n_params, n_stats) == (count, buffers)
    # Each stage owns the variables under its own name.
    assert set(variables["params"]) <= set(model.stages)


def test_logits_are_shifted_and_split_matches():
  for name in ("deepsec_mnist", "deepsec_resnet20"):
    model = registry.get_model(name)
    shape = (3, *dw.INPUT_SHAPES[name][1:])
    variables = random_variables(model, shape)
    x = np.random.RandomState(1).rand(*shape).astype(np.float32)
    logits = jax.jit(registry.logits_fn(model, variables))(x)
    np.testing.assert_allclose(logits.max(axis=1), 0.0)
    assert logits.shape == (3, 10)
    for at in model.stages[1:-1:2]:
      head, tail = registry.split(model, variables, at)
      np.testing.assert_allclose(jax.jit(lambda v, h=head, t=tail: t(h(v)))(x), logits,
                                 atol=1e-5)
    with pytest.raises(ValueError, match="Unknown stop stage"):
      model.apply(variables, x, stop="nope")


def test_mnist_dropout_only_in_train_mode():
  model = registry.get_model("deepsec_mnist")
  variables = random_variables(model, (4, 28, 28, 1))
  x = np.random.RandomState(1).rand(4, 28, 28, 1).astype(np.float32)
  eval1 = model.apply(variables, x)
  np.testing.assert_array_equal(eval1, model.apply(variables, x, train=False))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)
  fc1 = model.apply(variables, x, train=True, stop="fc1", rngs={"dropout": jax.random.key(2)})
  fc1_eval = model.apply(variables, x, stop="fc1")
  dropped = np.asarray(fc1) == 0
  assert 0.3 < (dropped & (np.asarray(fc1_eval) > 0)).sum() / (np.asarray(fc1_eval) > 0).sum() < 0.7
  kept = ~dropped
  np.testing.assert_allclose(np.asarray(fc1)[kept], 2 * np.asarray(fc1_eval)[kept], rtol=1e-5)


def test_resnet_train_mode_updates_batch_stats():
  model = registry.get_model("deepsec_resnet20")
  variables = random_variables(model, (4, 32, 32, 3))
  x = np.random.RandomState(1).rand(4, 32, 32, 3).astype(np.float32)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old = variables["batch_stats"]["stem"]["bn1"]["mean"]
  new = updates["batch_stats"]["stem"]["bn1"]["mean"]
  conv = variables["params"]["stem"]["conv1"]
  pre_bn = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  batch_mean = (pre_bn + conv["bias"]).mean(axis=(0, 1, 2))
  # Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch mean.
  np.testing.assert_allclose(new, 0.9 * old + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  assert not np.allclose(old, new)


# ------------------------------------------------------------------------------ weight import


@needs_cifar_pt
def test_resnet20_matches_numpy_on_random_inputs():
  sd = legacy_torch.load_state_dict(CIFAR_PT)
  name, variables = dw.load_deepsec(CIFAR_PT)
  assert name == "deepsec_resnet20"
  x = np.random.RandomState(0).rand(8, 32, 32, 3).astype(np.float32)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  expected = np_resnet20_logits(sd64, x.transpose(0, 3, 1, 2).astype(np.float64))
  got = np.asarray(registry.logits_fn(registry.get_model(name), variables)(x))
  diff = np.abs(got - expected).max()
  print(f"ResNet-20 max |Flax - NumPy| logit difference: {diff:.3g}")
  assert diff < 1e-4
  assert np.ptp(expected, axis=1).min() > 1.0  # Non-degenerate logits: the check is meaningful.


@needs_mnist_pt
def test_mnist_accuracy_matches_numpy(tmp_path):
  data_dir = tfds_data_dir()
  if data_dir is None:
    pytest.skip("tfds MNIST is absent (set TFDS_DATA_DIR or provide ../shared)")
  from advtrace._src import data

  results = evaluation.evaluate(tmp_path, dataset="mnist", weights=str(MNIST_PT),
                                data_dir=data_dir, dump_logits=True)
  assert results["model"] == "deepsec_mnist"
  assert results["n_examples"] == 10_000
  assert results["weights_sha256"] in dw.KNOWN_SHA256

  sd = legacy_torch.load_state_dict(MNIST_PT)
  ds = data.load("mnist", "test", data_dir)
  x = ds.images.transpose(0, 3, 1, 2)
  ref = np.concatenate([np_mnist_logits(sd, x[i:i + 250]) for i in range(0, len(x), 250)])
  ref_accuracy = 100.0 * np.mean(ref.argmax(axis=1) == ds.labels)
  print(f"MNIST accuracy: evaluate {results['accuracy']:.2f}%, NumPy {ref_accuracy:.2f}%")
  assert abs(results["accuracy"] - ref_accuracy) <= 0.01
  assert results["accuracy"] > 99.0
  logits = np.load(tmp_path / "logits.npy")
  print(f"MNIST max |Flax - NumPy| logit difference: {np.abs(logits - ref).max():.3g}")
  assert np.abs(logits - ref).max() < 1e-3


# ------------------------------------------------------------------------------ errors


def test_unknown_model_name():
  with pytest.raises(ValueError, match="Unknown model name 'deepsec_mnsit'.*deepsec_mnist"):
    registry.get_model("deepsec_mnsit")
  with pytest.raises(ValueError, match="Unknown DEEPSEC model name"):
    dw.deepsec_to_flax({}, "resnet18")


@needs_mnist_pt
def test_wrong_shape_weights():
  with pytest.raises(ValueError, match="do not fit DeepSecResNet20.*missing.*unexpected"):
    dw.load_deepsec(MNIST_PT, "deepsec_resnet20")
  sd = legacy_torch.load_state_dict(MNIST_PT)
  sd["fc1.weight"] = sd["fc1.weight"][:, :1000]
  with pytest.raises(ValueError, match=r"wrong shape: params/fc1/kernel: got \(1000, 200\)"):
    dw.deepsec_to_flax(sd, "deepsec_mnist")
  del sd["fc1.weight"]
  with pytest.raises(ValueError, match="missing: params/fc1/kernel"):
    dw.deepsec_to_flax(sd, "deepsec_mnist")


def test_missing_weights_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found.*MNIST_raw.pt"):
    dw.load_deepsec(tmp_path / "MNIST_raw.pt")


@needs_mnist_pt
def test_unknown_digest_warns_but_loads(tmp_path):
  raw = bytearray(MNIST_PT.read_bytes())
  raw[-1] ^= 1  # Flip a bit of the last float: a "retrained" file.
  path = tmp_path / "retrained.pt"
  path.write_bytes(bytes(raw))
  with pytest.warns(UserWarning, match="not one of the released DEEPSEC files"):
    name, variables = dw.load_deepsec(path)
  assert name == "deepsec_mnist"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, original = dw.load_deepsec(MNIST_PT)
  diff = jax.tree.map(lambda a, b: np.sum(a != b), variables, original)
  assert sum(jax.tree.leaves(diff)) == 1


@needs_cifar_pt
def test_resnet_mapping_covers_every_tensor():
  sd = legacy_torch.load_state_dict(CIFAR_PT)
  _, variables = dw.load_deepsec(CIFAR_PT)
  flat = traverse_util.flatten_dict(variables, sep="/")
  assert len(flat) == len(sd) - 21  # Every tensor except num_batches_tracked.
  np.testing.assert_array_equal(flat["params/stem/conv1/kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["batch_stats/layer3/block_0/downsample_bn/var"],
                                sd["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(flat["params/fc/kernel"], sd["fc.weight"].T)
