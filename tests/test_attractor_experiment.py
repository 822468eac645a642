"""End-to-end test of the injected-attractors experiment on a slice of MNIST (DEEPSEC CNN)."""

import concurrent.futures
import os
import stat
import threading

import numpy as np
import pytest
from conftest import deepsec_weights
from conftest import experiment_config
from conftest import tfds_data_dir

from advtrace._src import attractor_experiment as experiment
from advtrace._src import data
from advtrace._src import qim
from advtrace._src.attacks import catalog
from advtrace._src.attacks import runner

needs_mnist = pytest.mark.skipif(
    deepsec_weights("MNIST_raw.pt") is None or tfds_data_dir() is None,
    reason="../shared MNIST weights or tfds data are absent")


def _config():
  config = experiment.default_config()
  config.update(dict(
      data_dir=tfds_data_dir(), split="test[:300]", calibration_split="train[:3000]",
      weights=str(deepsec_weights("MNIST_raw.pt")), model="deepsec_mnist", dataset="mnist",
      candidate_pool=40, default_n_examples=12, batch_size=12, attacks=("fgsm", "llc"),
      integrated_attacks=("fgsm",), ablation_attacks=("fgsm",), fig5_examples=24,
      fig7_examples=4, fig7_directions=32, fig7_radii=(1.0,), key_seed=3))
  config.n_examples = {"fgsm": 12, "llc": 12}
  return config


@needs_mnist
def test_full_run_then_resume(tmp_path):
  workdir = tmp_path / "run"
  config = _config()
  results = experiment.run(config, workdir)

  # The key sits outside the workdir, owner-only; results name it by fingerprint only.
  key_path = experiment.default_key_path(str(workdir))
  assert not key_path.startswith(str(workdir) + os.sep)
  assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
  secret = qim.load_secret_key(key_path)
  assert results["key_fingerprint"] == secret.fingerprint()
  text = (workdir / "results.json").read_text()
  assert "key_seed" not in text
  assert "key_seed" not in (workdir / "experiment_config.json").read_text()

  assert results["table2"]["n_test"] == 300
  assert abs(results["table2"]["drop"]) <= 1.0
  for row in results["calibration"]:
    assert abs(row["calibration_fpr"] - row["target_fpr"]) <= 1.0
  rows = {r["attack"]: r for r in results["table1"]}
  assert set(rows) == {"fgsm", "llc"}
  for r in rows.values():
    assert r["n_examples"] == 12 and 0.0 <= r["attack_success_rate"] <= 100.0
    g = r["overall_asr_fpr5"]
    tpr = r["detection_rate_fpr5"]
    assert g == pytest.approx(r["attack_success_rate"] * (1 - (tpr or 0.0) / 100))
  # The runs on M attacked C's candidates: the same images as the runs on C.
  with np.load(workdir / "victim" / "fgsm" / "adversarial.npz") as c, \
       np.load(workdir / "attractor" / "fgsm" / "adversarial.npz") as m:
    np.testing.assert_array_equal(c["indices"], m["indices"])
  assert {r["attack"] for r in results["table5"]} == {"fgsm"}
  assert set(results["ablations"]["fgsm"]) == {"a_weighted_sum", "b_other_key", "c_key_known"}
  for name in ("fig5", "fig7"):
    assert (workdir / results[name]["figure"]).exists()
  assert results["fig5"]["c_l1"]["mean"] == pytest.approx(1.0, abs=1e-4)
  assert "## Table I" in (workdir / "results.md").read_text()

  # Resume: nothing is attacked again.
  stamp = os.stat(workdir / "attractor" / "fgsm" / "adversarial.npz").st_mtime_ns
  again = experiment.run(config, workdir)
  assert os.stat(workdir / "attractor" / "fgsm" / "adversarial.npz").st_mtime_ns == stamp
  assert again["table1"] == results["table1"]

  # A run of one attack keeps what earlier runs finished, in Table I order; an earlier run
  # with other settings (here llc's example count) is left out rather than failing the run.
  piece = _config()
  piece.update(dict(attacks=("llc",), integrated_attacks=(), ablation_attacks=()))
  kept = experiment.run(piece, workdir)
  assert kept["table1"] == results["table1"]
  assert [r["attack"] for r in kept["table5"]] == ["fgsm"]
  assert list(kept["ablations"]) == ["fgsm"]
  piece.attacks = ("fgsm",)
  piece.n_examples.llc = 10
  assert [r["attack"] for r in experiment.run(piece, workdir)["table1"]] == ["fgsm"]

  # Other decoder settings in the same workdir are refused.
  other = _config()
  other.qim.a2 = 0.05
  with pytest.raises(ValueError, match="other settings"):
    experiment.run(other, workdir)


@needs_mnist
def test_bad_config_fails_before_work(tmp_path):
  config = _config()
  config.stages = ("table1", "tabel5")
  with pytest.raises(ValueError, match="Unknown stages"):
    experiment.run(config, tmp_path)
  config = _config()
  config.attacks = ("fgsm", "no_such_attack")
  with pytest.raises(ValueError, match="no_such_attack"):
    experiment.run(config, tmp_path)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_experiment_configs_use_table7_settings(dataset):
  config = experiment_config(f"attractors_{dataset}")
  assert config.dataset == config.paper_column == dataset
  assert config.settings == f"table7_{dataset}"
  assert set(config.attacks) == set(config.integrated_attacks) == set(catalog.DEEPSEC_ATTACKS)
  assert all(int(config.n_examples[a]) >= 200 for a in config.attacks)
  assert tuple(config.target_fprs) == (0.05, 0.005)
  for name in config.attacks:
    runner.resolve_attack(name, config.settings)


def test_cifar10_fails_clearly_without_data_and_makes_no_key(tmp_path):
  config = experiment_config("attractors_cifar10")
  config.data_dir = str(tmp_path / "no_tfds")
  workdir = tmp_path / "out"
  with pytest.raises(data.DatasetNotFoundError, match="cifar10"):
    experiment.run(config, workdir)
  assert not os.path.exists(experiment.default_key_path(str(workdir)))
  assert not workdir.exists()


def test_runs_started_together_create_one_key(tmp_path):
  """Two runs on one workdir (one per core, as documented) must not each create a key: the
  second's would overwrite the first's on disk while the first goes on attacking with its own."""
  path = str(tmp_path / "run.secret" / "key.npz")
  cfg = qim.QIMConfig()
  start = threading.Barrier(4)

  def load_or_create(_):
    start.wait()
    return experiment._load_or_create_key(path, None, 3, (4, 4, 1), cfg).fingerprint()

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    fingerprints = set(pool.map(load_or_create, range(4)))
  assert fingerprints == {qim.load_secret_key(path).fingerprint()}
  assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
