"""Tests for the training loop: steps, eval-mode BatchNorm, schedules, augmentation, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import experiment_config
from conftest import experiment_config_module

from advtrace import training
from advtrace._src import batching
from advtrace._src import training as training_lib


class TinyNet(nn.Module):
  """Conv -> BatchNorm -> ReLU -> Dropout -> Dense: every code path of the train step."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    x = nn.Dropout(0.25, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def _toy_data(n=96, seed=0):
  """Three classes told apart by which third of a 4x4 image is bright."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n).astype(np.int32)
  x = rng.uniform(0, 0.3, (n, 4, 4, 1)).astype(np.float32)
  for i, c in enumerate(y):
    x[i, :, c:c + 2] += 0.6
  return np.clip(x, 0, 1), y


def _config(**overrides):
  config = training.default_config()
  config.learning_rate = 0.1
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 2
  config.log_every_steps = 0
  config.update(overrides)
  return config


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_train_step_reduces_loss():
  x, y = _toy_data()
  model, tx = TinyNet(), optax.sgd(0.1, momentum=0.9)
  state = training.create_train_state(model, tx, jax.random.key(0), x.shape[1:])
  batch = batching.Batch(x[:32], y[:32], np.ones(32, bool))
  losses = []
  for _ in range(30):
    state, metrics = training.train_step(state, batch, model=model, tx=tx)
    losses.append(float(metrics["loss_sum"] / metrics["count"]))
  assert int(state.step) == 30
  assert losses[-1] < 0.5 * losses[0], losses


def test_train_step_ignores_masked_rows():
  x, y = _toy_data(32)
  model, tx = TinyNet(), optax.sgd(0.1)
  state = training.create_train_state(model, tx, jax.random.key(0), x.shape[1:])
  mask = np.arange(32) < 20
  flipped = np.where(mask, y, (y + 1) % 3).astype(np.int32)  # Only padded labels differ.
  s1, m1 = training.train_step(state, batching.Batch(x, y, mask), model=model, tx=tx)
  s2, m2 = training.train_step(state, batching.Batch(x, flipped, mask), model=model, tx=tx)
  assert float(m1["count"]) == 20
  _assert_trees_equal(s1.params, s2.params)
  assert float(m1["loss_sum"]) == float(m2["loss_sum"])


def test_eval_uses_running_batchnorm_statistics():
  x, y = _toy_data(50)
  model, tx = TinyNet(), optax.sgd(0.1)
  state = training.create_train_state(model, tx, jax.random.key(1), x.shape[1:])
  for i in range(3):
    batch = batching.Batch(x[16 * i:16 * i + 16], y[16 * i:16 * i + 16], np.ones(16, bool))
    state, _ = training.train_step(state, batch, model=model, tx=tx)
  variables = training.variables_of(state)
  mean = variables["batch_stats"]["BatchNorm_0"]["mean"]
  assert np.abs(np.asarray(mean)).max() > 0  # Running stats were updated by the train steps.

  # Eval mode: each row's logits do not depend on the rest of the batch.
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  full = apply(variables, x)
  alone = jnp.concatenate([apply(variables, x[i:i + 1]) for i in range(5)])
  np.testing.assert_allclose(full[:5], alone, rtol=1e-5, atol=1e-5)
  batch_mode, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(full, batch_mode, atol=1e-3)

  # evaluate(): padded batches with a mask, one compilation for all batches.
  expected = float(np.mean(np.argmax(full, -1) == y))
  before = training_lib.eval_step._cache_size()
  metrics = training.evaluate(model, variables, x, y, batch_size=16)  # 16 + 16 + 16 + 2 rows
  assert training_lib.eval_step._cache_size() - before <= 1
  assert metrics["count"] == 50
  assert metrics["accuracy"] == pytest.approx(expected)


def test_resume_after_crash_gives_identical_results(tmp_path, monkeypatch):
  x, y = _toy_data(80)
  train, val = (x[:64], y[:64]), (x[64:], y[64:])
  config = _config(num_epochs=3, batch_size=24)  # 64 = 24 + 24 + 16: the last batch is padded.

  straight_vars, straight = training.fit(config, tmp_path / "a", TinyNet(), train, val)

  calls = {"n": 0}
  real_run_epoch = training_lib._run_epoch

  def crashing_run_epoch(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt("simulated crash during the second epoch")
    return real_run_epoch(*args, **kwargs)

  monkeypatch.setattr(training_lib, "_run_epoch", crashing_run_epoch)
  with pytest.raises(KeyboardInterrupt):
    training.fit(config, tmp_path / "b", TinyNet(), train, val)
  monkeypatch.setattr(training_lib, "_run_epoch", real_run_epoch)
  resumed_vars, resumed = training.fit(config, tmp_path / "b", TinyNet(), train, val)

  assert resumed["resumed_from_epoch"] == 1
  _assert_trees_equal(straight_vars, resumed_vars)
  _assert_trees_equal(training.restore_variables(tmp_path / "a" / "checkpoints" / "latest"),
                      training.restore_variables(tmp_path / "b" / "checkpoints" / "latest"))
  drop_timing = lambda h: [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in h]
  assert drop_timing(straight["history"]) == drop_timing(resumed["history"])


def test_best_checkpoint_by_validation_accuracy(tmp_path, monkeypatch):
  x, y = _toy_data(80)
  train, val = (x[:64], y[:64]), (x[64:], y[64:])
  scripted = iter([0.5, 0.7, 0.70001, 0.6])  # Epoch 3 ties epoch 2 at 4 decimals: later wins.
  real_evaluate = training_lib.evaluate

  def fake_evaluate(model, variables, images, labels, batch_size=500):
    metrics = real_evaluate(model, variables, images, labels, batch_size)
    return dict(metrics, accuracy=next(scripted))

  monkeypatch.setattr(training_lib, "evaluate", fake_evaluate)
  config = _config(num_epochs=4, keep_latest=4)
  best_vars, progress = training.fit(config, tmp_path, TinyNet(), train, val)
  assert progress["best_epoch"] == 3
  assert progress["best_val_accuracy"] == 0.70001
  from_best = training.restore_variables(tmp_path)
  _assert_trees_equal(from_best, best_vars)
  _assert_trees_equal(from_best, training.restore_variables(tmp_path / "checkpoints/latest", 3))
  last = training.restore_variables(tmp_path / "checkpoints" / "latest")
  assert not np.array_equal(last["params"]["Dense_0"]["kernel"],
                            from_best["params"]["Dense_0"]["kernel"])
  assert set(from_best) == {"params", "batch_stats"}
  with pytest.raises(FileNotFoundError, match="available epochs"):
    training.restore_variables(tmp_path, step=99)
  with pytest.raises(FileNotFoundError, match="No advtrace checkpoints"):
    training.restore_variables(tmp_path / "nowhere")


def test_improvement_rule_matches_deepsec():
  assert training_lib.is_improvement(0.1, None)
  assert training_lib.is_improvement(0.98, 0.98)
  assert training_lib.is_improvement(0.98001, 0.98004)  # Equal after rounding to 4 decimals.
  assert not training_lib.is_improvement(0.9799, 0.98)


def test_deepsec_cifar10_schedule_at_epoch_boundaries():
  config = experiment_config("train_deepsec_cifar10")
  spe = 1407  # ceil(45,000 / 32)
  tx, schedule = training.make_optimizer(config, spe)
  lr = lambda epoch, offset=0: float(schedule(epoch * spe + offset))
  assert lr(0) == pytest.approx(1e-3)
  # adjust_learning_rate(80) runs after 0-based epoch 80, so epoch 81 is the first at 1e-4.
  assert lr(81, -1) == pytest.approx(1e-3)
  assert lr(81) == pytest.approx(1e-4)
  assert lr(121, -1) == pytest.approx(1e-4)
  assert lr(121) == pytest.approx(1e-5)
  assert lr(161) == pytest.approx(1e-6)
  assert lr(181, -1) == pytest.approx(1e-6)
  assert lr(181) == pytest.approx(5e-7)
  assert lr(199, spe - 1) == pytest.approx(5e-7)


def test_schedule_floor():
  config = _config(lr_schedule="piecewise", learning_rate=1.0, lr_boundaries_epochs=(0, 1),
                   lr_scales=(0.01, 0.01), lr_floor=1e-3)
  schedule = training.make_schedule(config, steps_per_epoch=10)
  assert [float(schedule(s)) for s in (9, 10, 20)] == pytest.approx([1.0, 0.01, 1e-3])


def test_sgd_matches_torch_nesterov_with_weight_decay():
  config = experiment_config("train_deepsec_mnist")
  tx, _ = training.make_optimizer(config, 540)
  p, g1, g2 = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25]), jnp.array([-0.1, 0.3])
  lr, m, wd = 0.05, 0.9, 1e-6
  state = tx.init(p)
  # torch.optim.SGD(nesterov=True, weight_decay): d = g + wd p; buf = m buf + d; p -= lr (d + m buf)
  buf = jnp.zeros(2)
  for g in (g1, g2):
    updates, state = tx.update(g, state, p)
    d = g + wd * p
    buf = m * buf + d
    expected = p - lr * (d + m * buf)
    p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p, expected, rtol=1e-6)


def test_random_translate_flip():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0.2, 1.0, (64, 10, 10, 3)).astype(np.float32))
  key = jax.random.key(3)
  out = jax.jit(training.random_translate_flip)(key, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  assert float(out.min()) >= 0.0 and float(out.max()) <= float(x.max())
  np.testing.assert_array_equal(out, training.random_translate_flip(key, x))
  assert not np.array_equal(out, training.random_translate_flip(jax.random.key(4), x))
  # Every output is an integer shift (|shift| <= round(0.1 * 10) = 1, zero fill) of the input,
  # possibly mirrored; both flip states and several shifts occur.
  seen = set()
  for img, aug in zip(np.asarray(x), np.asarray(out), strict=True):
    matches = [(dy, dx, f) for dy in (-1, 0, 1) for dx in (-1, 0, 1) for f in (False, True)
               if np.array_equal(aug, _shift_flip(img, dy, dx, f))]
    assert len(matches) == 1
    seen.add(matches[0])
  assert {f for _, _, f in seen} == {False, True}
  assert len({(dy, dx) for dy, dx, _ in seen}) >= 5
  np.testing.assert_array_equal(training.identity_augment(key, x), x)


def _shift_flip(img, dy, dx, flip):
  h, w, _ = img.shape
  padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
  out = padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
  return out[:, ::-1] if flip else out


def test_bad_config_raises_clear_errors(tmp_path):
  x, y = _toy_data(32)
  with pytest.raises(ValueError, match="Unknown optimizer 'sgdd'"):
    training.fit(_config(optimizer="sgdd"), tmp_path, TinyNet(), (x, y), (x, y))
  with pytest.raises(ValueError, match="Unknown augmentation"):
    training.get_augment("mixup")
  with pytest.raises(ValueError, match="same length"):
    training.make_schedule(_config(lr_schedule="piecewise", lr_boundaries_epochs=(1,)), 10)
  with pytest.raises(ValueError, match="training images"):
    training.fit(_config(), tmp_path, TinyNet(), (x * 255, y), (x, y))


@pytest.mark.parametrize("name", ["train_digits_small_cnn", "train_mnist_small_cnn",
                                  "train_deepsec_mnist", "train_deepsec_cifar10"])
def test_configs_document_command_runtime_and_result(name):
  module = experiment_config_module(name)
  doc = module.__doc__
  assert f"--config=experiments/configs/{name}.py" in doc
  assert "Expected runtime on 2 CPU cores:" in doc and "Expected result:" in doc
  config = module.get_config()
  assert set(config) == set(training.default_config())  # Overrides only; no unknown fields.


def test_train_and_evaluate_on_digits(tmp_path):
  config = experiment_config("train_digits_small_cnn")
  config.num_epochs = 2
  config.max_train_examples = 640
  results = training.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test_accuracy"] == results["test_accuracy"]
  assert saved["num_train"] == 640 and saved["num_val"] == 143 and saved["num_test"] == 359
  assert "test accuracy" in (tmp_path / "results.md").read_text()
  model, variables, metadata = training.restore_model(tmp_path)
  assert metadata["model"] == "small_cnn" and metadata["input_shape"] == [8, 8, 1]
  from advtrace import data
  test = data.load("digits", "test")
  logits = model.apply(variables, test.images, train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  assert accuracy == pytest.approx(results["test_accuracy"])
  assert accuracy > 0.5  # Chance is 0.1.


_SAVE_ON_SECOND_DEVICE = """
import sys, numpy as np, jax
sys.path[:0] = sys.argv[2:]
import test_training as t
x, y = t._toy_data(80)
with jax.default_device(jax.devices()[1]):
  t.training.fit(t._config(), sys.argv[1], t.TinyNet(), (x[:64], y[:64]), (x[64:], y[64:]))
for kind in ("best", "latest"):
  tree = t.training.restore_variables(f"{sys.argv[1]}/checkpoints/{kind}")
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  np.savez(f"{sys.argv[1]}/{kind}.npz", **{jax.tree_util.keystr(k): v for k, v in leaves})
"""


def test_checkpoint_saved_on_another_device_restores_here(tmp_path):
  """A checkpoint written from a device this process lacks (as when a run trained on a GPU is
  read on a CPU) restores onto this process's device, with the saved values."""
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _SAVE_ON_SECOND_DEVICE, str(tmp_path), tests,
                         os.path.dirname(tests)], capture_output=True, text=True, timeout=300,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (best,) = (tmp_path / "checkpoints" / "best").glob("*/variables")
  saved_on = training_lib._saved_tree_metadata(best)
  assert {leaf.sharding.device_str for leaf in jax.tree.leaves(saved_on)} == {"cpu:1"}
  for kind in ("best", "latest"):
    tree = training.restore_variables(tmp_path / "checkpoints" / kind)
    saved = np.load(tmp_path / f"{kind}.npz")
    leaves = dict(jax.tree_util.tree_leaves_with_path(tree))
    assert sorted(jax.tree_util.keystr(k) for k in leaves) == sorted(saved.files)
    for path, leaf in leaves.items():
      assert leaf.devices() == {jax.devices()[0]}
      np.testing.assert_array_equal(leaf, saved[jax.tree_util.keystr(path)])
