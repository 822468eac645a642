"""Tests for the model zoo, the registry and head/tail splitting."""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advtrace._src.models import registry
from advtrace._src.models import zoo

pytestmark = pytest.mark.usefixtures("fast_compiles")


NUM_CLASSES = 7
BATCH = 2

# Tiny variants: same topology (ResNets keep four stages), a fraction of the channels.
TINY = {
    "small_cnn": dict(width=4),
    "resnet18": dict(width=4, stage_sizes=(1, 1, 1, 1)),
    "resnet50": dict(width=2, stage_sizes=(1, 1, 1, 1)),
    "vgg16_bn": dict(width=2),
    "vgg16": dict(width=2),
    "alexnet": dict(width=4),
}
ZOO = tuple(TINY)
BN_MODELS = ("resnet18", "resnet50", "vgg16_bn")
DROPOUT_MODELS = ("vgg16", "alexnet")
PLAIN_MODELS = ("small_cnn", "vgg16", "alexnet")

# DEEPSEC models (tested elsewhere) join the split-equivalence checks when present.
try:
  from advtrace._src.models import deepsec  # noqa: F401
  DEEPSEC_SHAPES = {"deepsec_mnist": (28, 28, 1), "deepsec_resnet20": (32, 32, 3)}
except ImportError:
  DEEPSEC_SHAPES = {}


def _shapes(name):
  shapes = [(28, 28, 1), (32, 32, 3)]
  if name == "small_cnn":
    shapes.append((8, 8, 1))
  return shapes


def _model(name, **overrides):
  return registry.get_model(name, num_classes=NUM_CLASSES, **{**TINY.get(name, {}), **overrides})


def _random_variables(model, image_shape, seed=0):
  """Variables of the right shapes, filled on the host so that no ``init`` is compiled.

  He-scaled kernels, small biases, and non-trivial BatchNorm statistics (so that eval mode is not
  the identity). Real ``init`` is covered by ``test_init_matches_shapes``.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((BATCH, *image_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    kind = path[-1].key
    if kind == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / math.prod(leaf.shape[:-1]))
    elif kind == "scale":
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    elif kind == "var":
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _tiny(name, image_shape):
  """A tiny (or, for DEEPSEC models, full-size) model and random variables for it."""
  model = _model(name)
  return model, _random_variables(model, image_shape)


def _images(image_shape, seed=0, batch=BATCH):
  return jax.random.uniform(jax.random.key(seed), (batch, *image_shape))


def _num_params(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _param_shapes(name, image_shape=(32, 32, 3), **kwargs):
  model = registry.get_model(name, num_classes=10, **kwargs)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))["params"]


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


def test_list_models_includes_zoo():
  names = registry.list_models()
  assert set(ZOO) <= set(names)
  assert names == sorted(names)


def test_get_model_returns_registered_class():
  expected = {"small_cnn": zoo.SmallCNN, "resnet18": zoo.ResNet18, "resnet50": zoo.ResNet50,
              "vgg16_bn": zoo.VGG16BN, "vgg16": zoo.VGG16, "alexnet": zoo.AlexNet}
  for name, cls in expected.items():
    model = registry.get_model(name, num_classes=3)
    assert type(model) is cls
    assert model.num_classes == 3


def test_unknown_model_name_lists_choices():
  with pytest.raises(ValueError, match=r"resnet19.*Valid choices:.*resnet18.*small_cnn"):
    registry.get_model("resnet19")


def test_register_twice_rejected():
  with pytest.raises(ValueError, match="registered twice"):
    registry.register("resnet18")(zoo.ResNet18)


# ------------------------------------------------------------------------------------------------
# Forward pass
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,image_shape",
                         [(n, s) for n in ZOO for s in _shapes(n)])
def test_output_shape_and_dtype(name, image_shape):
  model, variables = _tiny(name, image_shape)
  x = _images(image_shape)
  logits = registry.logits_fn(model, variables)(x)
  assert logits.shape == (BATCH, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Different images give different logits (the model is not constant).
  assert not np.allclose(logits[0], logits[1])


@pytest.mark.parametrize("name", ["small_cnn", "vgg16_bn"])
def test_init_matches_shapes(name):
  model, random_vars = _tiny(name, (28, 28, 1))
  variables = registry.init_variables(model, jax.random.key(0), (BATCH, 28, 28, 1))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, random_vars)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
  kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(variables) if p[-1].key == "kernel"]
  assert all(np.std(k) > 0 for k in kernels)
  for stats in jax.tree.leaves(variables.get("batch_stats", {})):
    assert np.all((stats == 0) | (stats == 1))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_jit_matches_eager(name):
  model, variables = _tiny(name, (28, 28, 1))
  x = _images((28, 28, 1))
  fn = registry.logits_fn(model, variables)
  np.testing.assert_allclose(jax.jit(fn)(x), fn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in ZOO if n != "small_cnn"])
def test_small_inputs_are_zero_padded_to_32(name):
  model, variables = _tiny(name, (28, 28, 1))
  unpadded = _model(name, min_size=0)
  x = _images((28, 28, 1))
  x32 = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  np.testing.assert_allclose(model.apply(variables, x, stop=model.stages[0]),
                             unpadded.apply(variables, x32, stop=model.stages[0]),
                             atol=1e-5, rtol=1e-5)


def test_small_cnn_pools_only_large_maps():
  model, variables = _tiny("small_cnn", (8, 8, 1))
  assert model.apply(variables, _images((8, 8, 1)), stop="conv2").shape == (BATCH, 4, 4, 8)
  model, variables = _tiny("small_cnn", (28, 28, 1))
  assert model.apply(variables, _images((28, 28, 1)), stop="conv2").shape == (BATCH, 7, 7, 8)


def test_rejects_non_nhwc_input():
  model, variables = _tiny("small_cnn", (8, 8, 1))
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((8, 8, 1)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=0), "width must be a positive int"),
    (dict(num_classes=0), "num_classes must be a positive int"),
    (dict(stage_sizes=(2, 2, 2)), "stage_sizes must be 4 positive"),
])
def test_bad_config_rejected(kwargs, match):
  model = registry.get_model("resnet18", **{"num_classes": 10, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


# ------------------------------------------------------------------------------------------------
# Train / eval behaviour
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_train_vs_eval(name):
  model, variables = _tiny(name, (32, 32, 3))
  x = _images((32, 32, 3), batch=4)
  rngs = {"dropout": jax.random.key(0)}

  train_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, updates = train_fn(variables, x)
  assert logits.shape == (4, NUM_CLASSES)
  old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
  assert len(old) == len(new) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new, strict=True))
  # Train mode normalises with batch statistics, so one example's output depends on the others.
  train_a, _ = train_fn(variables, x)
  train_b, _ = train_fn(variables, x.at[1:].set(1.0 - x[1:]))
  assert not np.allclose(train_a[0], train_b[0], atol=1e-4)
  # Eval mode uses running statistics: per-example, and different from train mode.
  eval_fn = jax.jit(registry.logits_fn(model, variables))
  eval_a, eval_b = eval_fn(x), eval_fn(x.at[1:].set(1.0 - x[1:]))
  np.testing.assert_allclose(eval_a[0], eval_b[0], atol=1e-5, rtol=1e-5)
  assert not np.allclose(eval_a, train_a, atol=1e-4)
  # Train mode must be allowed to update the statistics.
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(variables, x, train=True, rngs=rngs)


def test_batchnorm_momentum_matches_pytorch():
  model, variables = _tiny("vgg16_bn", (32, 32, 3))
  x = _images((32, 32, 3), batch=4)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], stop="block1")
  conv0 = variables["params"]["block1"]["Conv_0"]
  h = jax.lax.conv_general_dilated(x, conv0["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv0["bias"]
  old = variables["batch_stats"]["block1"]["BatchNorm_0"]
  new = updates["batch_stats"]["block1"]["BatchNorm_0"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * h.mean(axis=(0, 1, 2)),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_no_batch_stats_without_batchnorm(name):
  _, variables = _tiny(name, (32, 32, 3))
  assert set(variables) == {"params"}


@pytest.mark.parametrize("name", DROPOUT_MODELS)
def test_dropout_only_in_train_mode(name):
  model, variables = _tiny(name, (32, 32, 3))
  x = _images((32, 32, 3))
  train_fn = jax.jit(lambda k: model.apply(variables, x, train=True, rngs={"dropout": k}))
  a, b = train_fn(jax.random.key(1)), train_fn(jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train_fn(jax.random.key(1)))
  eval_fn = jax.jit(registry.logits_fn(model, variables))
  np.testing.assert_array_equal(eval_fn(x), eval_fn(x))
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, x, train=True)


# ------------------------------------------------------------------------------------------------
# Stages and head/tail split
# ------------------------------------------------------------------------------------------------


def _split_cases():
  cases = [(n, (32, 32, 3)) for n in ZOO] + [("small_cnn", (8, 8, 1)), ("vgg16_bn", (28, 28, 1))]
  cases += list(DEEPSEC_SHAPES.items())
  return cases


@pytest.mark.parametrize("name,image_shape", _split_cases())
def test_split_equivalence_at_every_cut(name, image_shape):
  model, variables = _tiny(name, image_shape)
  x = _images(image_shape, seed=3)
  full = np.asarray(jax.jit(registry.logits_fn(model, variables))(x))
  assert full.shape == (BATCH, NUM_CLASSES)
  cuts = model.stages[:-1]
  assert len(cuts) >= 3
  for at in cuts:
    head, tail = registry.split(model, variables, at)
    h = head(x)
    assert h.shape[0] == BATCH
    assert h.shape != full.shape, f"head at {at!r} returned logits"
    np.testing.assert_allclose(tail(h), full, atol=1e-5, rtol=1e-5, err_msg=f"cut at {at!r}")


@pytest.mark.parametrize("name", ZOO)
def test_variables_are_keyed_by_stage(name):
  model, variables = _tiny(name, (32, 32, 3))
  for collection in variables.values():
    assert set(collection) <= set(model.stages)
  assert set(variables["params"]) >= {model.stages[0], model.stages[-1]}


def test_head_variables_select_head_params():
  model, variables = _tiny("resnet18", (32, 32, 3))
  at = "stage1"
  head_keys = model.stages[:model.stages.index(at) + 1]
  head_vars = {c: {k: v for k, v in col.items() if k in head_keys} for c, col in variables.items()}
  x = _images((32, 32, 3))
  np.testing.assert_allclose(model.apply(head_vars, x, stop=at),
                             model.apply(variables, x, stop=at), atol=1e-6)


@pytest.mark.parametrize("at", ["nope", "logits"])
def test_bad_split_point_rejected(at):
  model, variables = _tiny("small_cnn", (8, 8, 1))
  with pytest.raises(ValueError, match=r"split point for SmallCNN.*Valid choices:.*conv1"):
    registry.split(model, variables, at)


def test_bad_start_stop_rejected():
  model, variables = _tiny("small_cnn", (8, 8, 1))
  x = _images((8, 8, 1))
  with pytest.raises(ValueError, match=r"Unknown stop stage 'conv9'.*conv1, conv2"):
    model.apply(variables, x, stop="conv9")
  with pytest.raises(ValueError, match=r"Unknown start stage 'conv9'"):
    model.apply(variables, x, start="conv9")
  with pytest.raises(ValueError, match="comes before"):
    model.apply(variables, x, start="conv2", stop="conv1")


def test_run_stages_semantics():
  stages = [("a", lambda x: x + 1), ("b", lambda x: 2 * x), ("c", lambda x: x - 3)]
  assert zoo.run_stages(stages, 5) == 9
  assert zoo.run_stages(stages, 5, stop="a") == 6
  assert zoo.run_stages(stages, 5, stop="b") == 12
  assert zoo.run_stages(stages, 6, start="a") == 9
  assert zoo.run_stages(stages, 6, start="a", stop="b") == 12
  assert zoo.run_stages(stages, 6, start="b", stop="b") == 6
  assert zoo.run_stages(stages, 6, start="c") == 6
  with pytest.raises(ValueError, match="unique"):
    zoo.run_stages(stages + [("a", abs)], 5)


# ------------------------------------------------------------------------------------------------
# Full-width parameter counts (shapes only, nothing allocated)
# ------------------------------------------------------------------------------------------------


def _conv_params(cin, cout, k=3, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def _dense_params(cin, cout):
  return cin * cout + cout


def _bn_params(c):
  return 2 * c


def _expected_resnet(block_counts, bottleneck, classes=10, cin=3):
  total = _conv_params(cin, 64, bias=False) + _bn_params(64)
  c = 64
  for i, n in enumerate(block_counts):
    planes = 64 * 2**i
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      if bottleneck:
        out = 4 * planes
        total += (_conv_params(c, planes, 1, False) + _conv_params(planes, planes, 3, False)
                  + _conv_params(planes, out, 1, False) + _bn_params(planes) * 2 + _bn_params(out))
      else:
        out = planes
        total += (_conv_params(c, planes, 3, False) + _conv_params(planes, planes, 3, False)
                  + _bn_params(planes) * 2)
      if stride != 1 or c != out:
        total += _conv_params(c, out, 1, False) + _bn_params(out)
      c = out
  return total + _dense_params(c, classes)


def _expected_vgg(bn, hidden, classes=10, cin=3):
  total, c = 0, cin
  for cout in [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]:
    total += _conv_params(c, cout) + (_bn_params(cout) if bn else 0)
    c = cout
  for h in hidden:
    total += _dense_params(c, h)
    c = h
  return total + _dense_params(c, classes)


def _expected_alexnet(classes=10, cin=3):
  total, c = 0, cin
  for cout in [64, 192, 384, 256, 256]:
    total += _conv_params(c, cout)
    c = cout
  return total + _dense_params(4 * 4 * 256, 512) + _dense_params(512, 512) + _dense_params(
      512, classes)


@pytest.mark.parametrize("name,expected", [
    # Literature values for the CIFAR variants (e.g. kuangliu/pytorch-cifar) for the first three.
    ("resnet18", 11_173_962),
    ("resnet50", 23_520_842),
    ("vgg16_bn", 14_728_266),
    ("resnet18", _expected_resnet([2, 2, 2, 2], bottleneck=False)),
    ("resnet50", _expected_resnet([3, 4, 6, 3], bottleneck=True)),
    ("vgg16_bn", _expected_vgg(bn=True, hidden=[])),
    ("vgg16", _expected_vgg(bn=False, hidden=[512, 512])),
    ("alexnet", _expected_alexnet()),
])
def test_full_width_param_counts(name, expected):
  assert _num_params(_param_shapes(name)) == expected


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "alexnet"])
def test_mnist_shapes_differ_only_in_first_conv(name):
  cifar = _num_params(_param_shapes(name, (32, 32, 3)))
  mnist = _num_params(_param_shapes(name, (28, 28, 1)))
  assert cifar - mnist == 9 * 2 * 64


def test_tracing_head_sizes():
  # shared/notes/tracing.md section 2.2: head params of the per-copy heads.
  resnet = _param_shapes("resnet18")
  assert _num_params(resnet["stem"]) + _num_params(resnet["stage1"]) == 149_824
  assert _num_params(_param_shapes("vgg16_bn")["block1"]) == 38_976


def test_small_cnn_param_count():
  params = _param_shapes("small_cnn", (28, 28, 1))
  expected = (_conv_params(1, 16) + _conv_params(16, 32) + _dense_params(7 * 7 * 32, 64)
              + _dense_params(64, 10))
  assert _num_params(params) == expected


def test_max_pool_2x2_matches_flax_values_and_gradients_with_ties():
  import flax.linen as nn

  from advtrace._src.models.layers import max_pool_2x2
  for shape in [(3, 8, 8, 4), (2, 7, 9, 3)]:
    x = jnp.round(jax.random.uniform(jax.random.key(0), shape) * 3) / 3  # many ties
    ref = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(ref(x)))
    g = jax.random.normal(jax.random.key(1), ref(x).shape)
    grad = lambda f, g=g, x=x: jax.grad(lambda z: jnp.sum(f(z) * g))(x)
    np.testing.assert_array_equal(np.asarray(grad(max_pool_2x2)), np.asarray(grad(ref)))
