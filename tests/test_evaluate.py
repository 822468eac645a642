"""experiments/evaluate.py and advtrace._src.evaluation: outputs, weight sources, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import deepsec_weights
from conftest import repo_root

from advtrace._src import data
from advtrace._src import evaluation
from advtrace._src import training
from advtrace._src import weights as weights_lib
from advtrace._src.models import registry

MNIST_PT = deepsec_weights("MNIST_raw.pt")
needs_mnist_pt = pytest.mark.skipif(
    MNIST_PT is None, reason="../shared/weights/deepsec/MNIST_raw.pt is absent")


def _accuracy_from_logits(logits, labels):
  return 100.0 * np.mean(np.argmax(logits, axis=1) == labels)


def test_binary_on_digits_random_init(tmp_path):
  """Runs the binary end to end (a subprocess, so absl flags stay private to it)."""
  workdir = tmp_path / "eval"
  cmd = [sys.executable, str(repo_root() / "experiments" / "evaluate.py"), "--model=small_cnn",
         "--dataset=digits", "--batch_size=100", "--seed=3", "--dump_logits",
         f"--workdir={workdir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  results = json.loads((workdir / "results.json").read_text())
  ds = data.load("digits", "test")
  assert results["model"] == "small_cnn"
  assert (results["dataset"], results["split"]) == ("digits", "test")
  assert results["n_examples"] == len(ds.labels) == 359
  assert results["weights"] is None and results["weights_sha256"] is None
  assert results["wall_time_s"] > 0

  logits = np.load(workdir / "logits.npy")
  assert logits.shape == (359, 10) and logits.dtype == np.float32
  # Logits in input order: recompute with the same model and seed in this process.
  model = registry.get_model("small_cnn")
  variables = registry.init_variables(model, jax.random.key(3), (1, 8, 8, 1))
  np.testing.assert_allclose(logits, registry.logits_fn(model, variables)(ds.images), atol=1e-5)
  # Accuracy is in percent and agrees with the dumped logits.
  assert results["accuracy"] == pytest.approx(_accuracy_from_logits(logits, ds.labels))
  assert results["n_correct"] == round(results["accuracy"] * 359 / 100)
  table = (workdir / "results.md").read_text()
  assert "| small_cnn | digits | test | 359 |" in table
  assert not [p for p in os.listdir(workdir) if p.startswith(".tmp-")]


def test_training_checkpoint_roundtrip(tmp_path):
  config = training.default_config()
  config.dataset = "digits"
  config.model = "small_cnn"
  config.num_epochs = 2
  config.max_train_examples = 300
  config.batch_size = 50
  config.eval_batch_size = 200
  config.log_every_steps = 1000
  train_dir = tmp_path / "train"
  trained = training.train_and_evaluate(config, train_dir)

  # Workdir (best checkpoint, model name from model.json) vs the training loop's own test eval.
  results = evaluation.evaluate(tmp_path / "e1", dataset="digits", weights=str(train_dir))
  assert results["model"] == "small_cnn"
  assert results["accuracy"] == pytest.approx(100.0 * trained["test_accuracy"], abs=1e-6)
  assert results["accuracy"] > 20.0  # Trained for two epochs: well above chance (10%).

  # One step directory, and the latest checkpoint.
  best_step = train_dir / "checkpoints" / "best" / str(trained["best_epoch"])
  assert best_step.is_dir()
  again = evaluation.evaluate(tmp_path / "e2", dataset="digits", weights=str(best_step),
                              model="small_cnn")
  assert again["n_correct"] == results["n_correct"]
  latest = evaluation.evaluate(tmp_path / "e3", dataset="digits",
                               weights=str(train_dir / "checkpoints" / "latest"))
  assert latest["n_examples"] == 359

  with pytest.raises(ValueError, match="holds a 'small_cnn' model, not 'deepsec_mnist'"):
    evaluation.evaluate(tmp_path / "e4", dataset="digits", weights=str(train_dir),
                        model="deepsec_mnist")


@needs_mnist_pt
def test_npz_dataset_with_deepsec_weights(tmp_path):
  rng = np.random.RandomState(0)
  x = rng.randint(0, 256, size=(37, 28, 28, 1)).astype(np.uint8)
  y = rng.randint(0, 10, size=37)
  path = tmp_path / "inputs.npz"
  np.savez(path, x=x, y=y, num_classes=10)
  results = evaluation.evaluate(tmp_path / "out", dataset=str(path), weights=str(MNIST_PT),
                                model="deepsec_mnist", batch_size=16, dump_logits=True)
  logits = np.load(tmp_path / "out" / "logits.npy")
  from advtrace._src.models import deepsec_weights as dw

  name, variables = dw.load_deepsec(MNIST_PT)
  expected = registry.logits_fn(registry.get_model(name), variables)(x.astype(np.float32) / 255)
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  assert results["accuracy"] == pytest.approx(_accuracy_from_logits(logits, y))


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown model name 'nope'"):
    evaluation.evaluate(tmp_path, dataset="digits", model="nope")
  with pytest.raises(FileNotFoundError, match="not found"):
    evaluation.evaluate(tmp_path, dataset="digits", weights=str(tmp_path / "missing.pt"))
  with pytest.raises(data.DatasetNotFoundError):
    evaluation.evaluate(tmp_path, dataset="mnist", model="deepsec_mnist",
                        data_dir=str(tmp_path / "no_such_dir"))
  with pytest.raises(ValueError, match="deepsec_mnist takes 28x28x1 images.*digits has 8x8x1"):
    evaluation.evaluate(tmp_path, dataset="digits", model="deepsec_mnist")
  with pytest.raises(ValueError, match=r"cannot take inputs of shape \(1, 8, 8, 1\)"):
    weights_lib.variable_shapes(registry.get_model("deepsec_mnist"), (1, 8, 8, 1))
  with pytest.raises(ValueError, match="pass a model name"):
    evaluation.evaluate(tmp_path, dataset="digits")
  with pytest.raises(ValueError, match="batch_size"):
    evaluation.evaluate(tmp_path, dataset="digits", model="small_cnn", batch_size=0)
  assert not (tmp_path / "results.json").exists()


@needs_mnist_pt
def test_deepsec_weights_on_wrong_dataset(tmp_path):
  with pytest.raises(ValueError, match="deepsec_mnist takes 28x28x1 images"):
    evaluation.evaluate(tmp_path, dataset="digits", weights=str(MNIST_PT))
