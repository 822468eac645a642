"""The attack runner: candidates, output files, resumption, no retracing, the summary table."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import deepsec_weights
from conftest import experiment_config
from conftest import repo_root
from conftest import tfds_data_dir

from advtrace._src import data
from advtrace._src import training
from advtrace._src.attacks import catalog
from advtrace._src.attacks import gradient
from advtrace._src.attacks import runner
from advtrace._src.attacks import uap as uap_lib
from advtrace._src.models import registry

pytestmark = pytest.mark.usefixtures("fast_compiles")

N, BATCH = 10, 4  # three batches, the last one padded (4, 4, 2 + 2 padding rows)


class _Interrupt(Exception):
  pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  """A small_cnn trained briefly on digits, saved as an advtrace training checkpoint."""
  root = tmp_path_factory.mktemp("digits_ckpt")
  train = data.load("digits", "train")
  net = registry.get_model("small_cnn")
  params = jax.jit(net.init)(jax.random.key(0), train.images[:1])["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, o, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        net.apply({"params": p}, x), y).mean()
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o)
    return optax.apply_updates(p, u), o

  opt = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(60):
    idx = rng.choice(len(train.labels), 128)
    params, opt = step(params, opt, train.images[idx], train.labels[idx])
  # The layout advtrace.training writes (model.json + checkpoints/best/<epoch>).
  training._write_metadata(root, {"model": "small_cnn", "num_classes": 10, "model_kwargs": {},
                                  "input_shape": [8, 8, 1], "dataset": "digits"})
  manager = training._manager(root / "checkpoints" / "best", keep=1)
  training._save(manager, 1, variables=ocp.args.StandardSave({"params": params}))
  training._close(manager)
  return str(root)


def _config(checkpoint, attack="fgsm", **overrides):
  config = runner.default_config()
  config.update(dict(attack=attack, model="", weights=checkpoint, dataset="digits",
                     n_examples=N, candidate_pool=40, batch_size=BATCH, settings="table7_mnist"))
  config.update(overrides)
  return config


def _assert_same_run(a_dir, b_dir):
  with np.load(a_dir / "adversarial.npz") as a, np.load(b_dir / "adversarial.npz") as b:
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _model(checkpoint):
  model, variables, _ = training.restore_model(checkpoint)
  return jax.jit(registry.logits_fn(model, variables))


def _swap(monkeypatch, name, fn):
  monkeypatch.setitem(catalog.CATALOG, name, dataclasses.replace(catalog.get(name), impl=fn))


# ----------------------------------------------------------------------------- candidates


def test_deepsec_candidates_match_select_candidates():
  ds = data.load("digits", "test")
  w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
  predict = lambda x: x.reshape(x.shape[0], -1) @ w
  logits = predict(ds.images)
  indices, targets = runner.deepsec_candidates(logits, ds.labels, 20, seed=100)
  np.testing.assert_array_equal(indices, data.select_candidates(predict, ds, 20, seed=100))
  assert np.all(np.argmax(logits[indices], -1) == ds.labels[indices])
  assert np.all(targets != ds.labels[indices]) and len(np.unique(targets)) > 3
  again = runner.deepsec_candidates(logits, ds.labels, 20, seed=100)
  np.testing.assert_array_equal(again[1], targets)
  other = runner.deepsec_candidates(logits, ds.labels, 20, seed=101)
  assert not np.array_equal(other[0], indices)
  with pytest.raises(ValueError, match="classified correctly"):
    runner.deepsec_candidates(logits, ds.labels, len(ds.labels), seed=100)


# ----------------------------------------------------------------------------- run_attack


def test_run_attack_outputs(checkpoint, tmp_path):
  workdir = tmp_path / "fgsm"
  results = runner.run_attack(_config(checkpoint), workdir)
  files = sorted(os.listdir(workdir))
  expected = [".lock", "adversarial.npz", "results.json", "results.md", "run_config.json"]
  assert files == expected, files
  with np.load(workdir / "adversarial.npz") as f:
    adv = dict(f)
  assert set(adv) == {"indices", "x", "x_adv", "y", "success", "predicted", "iterations", "l0",
                      "l2", "linf"}  # untargeted, not query-based: no target / queries
  ds = data.load("digits", "test")
  np.testing.assert_array_equal(adv["x"], ds.images[adv["indices"]])
  np.testing.assert_array_equal(adv["y"], ds.labels[adv["indices"]])
  assert adv["x_adv"].shape == (N, 8, 8, 1) and adv["x_adv"].dtype == np.float32
  assert np.max(np.abs(adv["x_adv"] - adv["x"])) <= 0.3 + 1e-6
  predict = _model(checkpoint)
  assert np.all(np.argmax(predict(adv["x"]), -1) == adv["y"])  # candidates are correct
  predicted = np.argmax(predict(adv["x_adv"]), -1)
  np.testing.assert_array_equal(adv["predicted"], predicted)
  np.testing.assert_array_equal(adv["success"], predicted != adv["y"])
  np.testing.assert_allclose(
      adv["l2"], np.linalg.norm((adv["x_adv"] - adv["x"]).reshape(N, -1), axis=1), rtol=1e-5)

  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert results["n_examples"] == N and results["attack"] == "fgsm"
  assert results["kwargs"] == {"eps": 0.3} and results["settings_table"] == "table7_mnist"
  assert results["attack_success_rate"] == pytest.approx(100 * adv["success"].mean())
  ok = adv["success"]
  if ok.any():
    assert results["mean_l2_successful"] == pytest.approx(adv["l2"][ok].mean(), rel=1e-6)
  assert results["mean_l2_all"] == pytest.approx(adv["l2"].mean(), rel=1e-6)
  assert results["mean_linf_all"] == pytest.approx(0.3, abs=1e-6)
  assert results["device"]["platform"] == jax.default_backend()
  assert results["attack_time_s"] > 0 and results["examples_per_sec"] > 0
  md = (workdir / "results.md").read_text()
  assert f"| attack success rate (%) | {results['attack_success_rate']:.2f}" in md
  # A finished run is returned as is, without running the attack again.
  assert runner.run_attack(_config(checkpoint), workdir) == saved


def test_targets(checkpoint, tmp_path):
  random_run = runner.run_attack(_config(checkpoint, "tmifgsm", attack_kwargs='{"num_steps": 3}'),
                                 tmp_path / "tmifgsm")
  assert random_run["target_rule"] == "random"
  with np.load(tmp_path / "tmifgsm" / "adversarial.npz") as f:
    adv = dict(f)
  assert np.all(adv["target"] != adv["y"])
  np.testing.assert_array_equal(adv["success"], adv["predicted"] == adv["target"])

  runner.run_attack(_config(checkpoint, "llc"), tmp_path / "llc")
  with np.load(tmp_path / "llc" / "adversarial.npz") as f:
    adv = dict(f)
  np.testing.assert_array_equal(adv["target"], np.argmin(_model(checkpoint)(adv["x"]), -1))
  np.testing.assert_array_equal(adv["success"], adv["predicted"] == adv["target"])


def test_resume_after_interruption(checkpoint, tmp_path, monkeypatch):
  calls = []

  def interrupted(logits_fn, x, labels, key, **kw):
    if len(calls) == 2:
      raise _Interrupt  # dies in the third batch
    calls.append(len(x))
    return gradient.pgd(logits_fn, x, labels, key, **kw)

  config = _config(checkpoint, "pgd", attack_kwargs='{"num_steps": 3}')
  _swap(monkeypatch, "pgd", interrupted)
  with pytest.raises(_Interrupt):
    runner.run_attack(config, tmp_path / "run")
  assert sorted(os.listdir(tmp_path / "run" / "partial")) == ["000000.npz", f"{BATCH:06d}.npz"]
  assert not (tmp_path / "run" / "results.json").exists()

  resumed = []

  def counting(logits_fn, x, labels, key, **kw):
    resumed.append(len(x))
    return gradient.pgd(logits_fn, x, labels, key, **kw)

  _swap(monkeypatch, "pgd", counting)
  runner.run_attack(config, tmp_path / "run")
  assert resumed == [BATCH]  # only the last batch (2 examples, padded to 4) was redone
  assert not (tmp_path / "run" / "partial").exists()
  assert not (tmp_path / "run" / "claims").exists()
  runner.run_attack(config, tmp_path / "fresh")  # uninterrupted, for comparison
  _assert_same_run(tmp_path / "run", tmp_path / "fresh")
  # A different config in the used workdir is refused.
  with pytest.raises(ValueError, match="different attack run.*kwargs"):
    runner.run_attack(_config(checkpoint, "pgd", attack_kwargs='{"num_steps": 4}'),
                      tmp_path / "run")


def test_padded_last_batch_does_not_retrace(checkpoint, tmp_path, monkeypatch):
  traces = [0]
  original = registry.logits_fn

  def counting_logits_fn(model, variables):
    fn = original(model, variables)

    def logits(x):
      traces[0] += 1  # Python-level calls happen only while tracing
      return fn(x)
    return logits

  monkeypatch.setattr(registry, "logits_fn", counting_logits_fn)
  runner.clear_context_cache()  # load the model again, through the counting logits_fn
  per_call = []

  def wrapped(logits_fn, x, labels, key, **kw):
    before = traces[0]
    out = gradient.bim(logits_fn, x, labels, key, **kw)
    jax.block_until_ready(out)
    per_call.append((x.shape, traces[0] - before))
    return out

  _swap(monkeypatch, "bim", wrapped)
  runner.run_attack(_config(checkpoint, "bim", attack_kwargs='{"num_steps": 2}'), tmp_path)
  runner.clear_context_cache()
  shapes, new_traces = zip(*per_call, strict=True)
  assert shapes == ((BATCH, 8, 8, 1),) * 3
  assert new_traces[0] > 0 and new_traces[1:] == (0, 0), new_traces


def test_uap_computes_then_applies(checkpoint, tmp_path):
  config = _config(checkpoint, "uap", attack_kwargs='{"max_outer_iters": 1}',
                   uap_train_fraction=0.05)
  results = runner.run_attack(config, tmp_path)
  assert results["uap"]["n_train"] == 72 and results["uap"]["n_val"] == 1366
  assert results["uap"]["passes"] <= 1
  with np.load(tmp_path / "uap_perturbation.npz") as f:
    v = f["perturbation"]
  with np.load(tmp_path / "adversarial.npz") as f:
    np.testing.assert_allclose(f["x_adv"], np.clip(f["x"] + v, 0, 1), atol=1e-6)
    assert np.max(np.abs(v)) <= 0.3 + 1e-6


def test_runs_on_one_workdir_share_its_batches(checkpoint, tmp_path, monkeypatch):
  # Two runs at once (threads: their file locks conflict as two processes' do) attack
  # different batches side by side, none twice, and end as one run alone does.
  config = _config(checkpoint, "pgd", attack_kwargs='{"num_steps": 3}')
  runner.run_attack(config, tmp_path / "alone")
  both_attacking = threading.Barrier(2, timeout=60)
  first_calls, calls = set(), []

  def attack(logits_fn, x, labels, key, **kw):
    me = threading.current_thread().name
    calls.append(me)
    if me not in first_calls:
      first_calls.add(me)
      both_attacking.wait()  # breaks (and fails the test) unless the other run is attacking too
    return gradient.pgd(logits_fn, x, labels, key, **kw)

  _swap(monkeypatch, "pgd", attack)
  with concurrent.futures.ThreadPoolExecutor(2) as workers:
    runs = [workers.submit(runner.run_attack, config, tmp_path / "shared") for _ in range(2)]
    results = [run.result(timeout=300) for run in runs]
  assert len(calls) == 3 and len(set(calls)) == 2  # three batches, split between both runs
  assert results[0]["attack_success_rate"] == results[1]["attack_success_rate"]
  _assert_same_run(tmp_path / "shared", tmp_path / "alone")


def test_the_batch_of_a_killed_run_goes_back_to_the_others(checkpoint, tmp_path):
  # Another process holds the claim on the second batch; the run attacks the first and the
  # last, waits, and attacks the second itself once that process is killed.
  config = _config(checkpoint, "fgsm")
  runner.run_attack(config, tmp_path / "alone")
  claims = tmp_path / "run" / "claims"
  claims.mkdir(parents=True)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, sys, time\n"
       "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
       "print('held', flush=True); time.sleep(120)", str(claims / f"{BATCH:06d}-{2 * BATCH:06d}")],
      stdout=subprocess.PIPE, text=True)
  run = concurrent.futures.ThreadPoolExecutor(1)
  try:
    assert holder.stdout.readline().strip() == "held"
    future = run.submit(runner.run_attack, config, tmp_path / "run")
    partial = tmp_path / "run" / "partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("*.npz"))) < 2 and time.monotonic() < deadline:
      time.sleep(0.1)
    assert sorted(os.listdir(partial)) == ["000000.npz", f"{2 * BATCH:06d}.npz"]
    time.sleep(0.5)
    assert not future.done()  # waiting for the held batch
  finally:
    holder.kill()
    holder.wait()
  assert future.result(timeout=120)["n_examples"] == N
  run.shutdown()
  _assert_same_run(tmp_path / "run", tmp_path / "alone")


def test_uap_interrupted_between_passes_resumes(checkpoint, tmp_path, monkeypatch):
  # A run stopped after UAP's first pass resumes from the saved pass and ends where an
  # uninterrupted run ends.
  def config():
    return _config(checkpoint, "uap", attack_kwargs='{"max_outer_iters": 2, "fool_rate": 1.0}',
                   uap_train_fraction=0.05)

  whole = runner.run_attack(config(), tmp_path / "whole")
  spec = catalog.get("uap")

  def stop_after_first_pass(*args, on_pass, **kw):
    def save_then_stop(state):
      on_pass(state)
      raise KeyboardInterrupt
    return uap_lib.uap(*args, on_pass=save_then_stop, **kw)

  monkeypatch.setitem(catalog.CATALOG, "uap",
                      dataclasses.replace(spec, prepare=stop_after_first_pass))
  with pytest.raises(KeyboardInterrupt):
    runner.run_attack(config(), tmp_path / "resumed")
  assert (tmp_path / "resumed" / "uap_progress.npz").exists()
  passes_run = []

  def count_passes(*args, on_pass, **kw):
    return uap_lib.uap(*args, on_pass=lambda state: (passes_run.append(1), on_pass(state)), **kw)

  monkeypatch.setitem(catalog.CATALOG, "uap", dataclasses.replace(spec, prepare=count_passes))
  resumed = runner.run_attack(config(), tmp_path / "resumed")
  assert len(passes_run) == 1  # only the second pass was left
  assert not (tmp_path / "resumed" / "uap_progress.npz").exists()
  assert resumed["uap"]["passes"] == whole["uap"]["passes"] == 2
  assert resumed["uap"]["fooling_rates"] == whole["uap"]["fooling_rates"]
  assert (resumed["uap"]["resumed_after_pass"], whole["uap"]["resumed_after_pass"]) == (1, 0)
  # The total wall time includes the pass finished before the interruption.
  assert resumed["uap"]["seconds_total"] >= sum(resumed["uap"]["seconds"])
  with np.load(tmp_path / "whole" / "uap_perturbation.npz") as f:
    v = f["perturbation"]
  with np.load(tmp_path / "resumed" / "uap_perturbation.npz") as f:
    np.testing.assert_array_equal(f["perturbation"], v)


def test_errors(checkpoint, tmp_path):
  with pytest.raises(ValueError, match="Unknown attack 'nope'"):
    runner.run_attack(_config(checkpoint, "nope"), tmp_path / "a")
  with pytest.raises(ValueError, match="config.weights is required"):
    runner.run_attack(_config("", "fgsm"), tmp_path / "b")
  with pytest.raises(FileNotFoundError):
    runner.run_attack(_config(str(tmp_path / "missing"), "fgsm"), tmp_path / "c")
  with pytest.raises(data.DatasetNotFoundError):
    runner.run_attack(_config(checkpoint, dataset="cifar10", data_dir=str(tmp_path / "no")),
                      tmp_path / "d")


# ----------------------------------------------------------------------------- reproduce


def _reproduce_config(checkpoint, attacks):
  config = runner.default_reproduce_config()
  config.update(dict(model="", weights=checkpoint, dataset="digits", candidate_pool=40,
                     batch_size=BATCH, attacks=attacks, default_n_examples=N))
  config.n_examples.fgsm = 6
  config.n_examples.llc = N
  return config


def test_reproduce_runs_skips_and_tabulates(checkpoint, tmp_path, monkeypatch):
  config = _reproduce_config(checkpoint, ("fgsm", "llc"))
  summary = runner.reproduce_attacks(config, tmp_path)
  rows = {r["attack"]: r for r in summary["rows"]}
  assert list(rows) == ["fgsm", "llc"]
  assert rows["fgsm"]["n_examples"] == 6 and rows["llc"]["n_examples"] == N
  for name, row in rows.items():
    own = json.loads((tmp_path / name / "results.json").read_text())
    assert row["attack_success_rate"] == own["attack_success_rate"]
    assert row["paper_asr"] == runner.PAPER_TABLE1_ASR["mnist"][name]
    assert row["delta"] == pytest.approx(own["attack_success_rate"] - row["paper_asr"])
    assert row["gap"] == (abs(row["delta"]) > 10) and row["status"] == "done"
  md = (tmp_path / "results.md").read_text()
  assert "| fgsm | untargeted | 6 |" in md and "| llc | targeted | 10 |" in md
  assert "90.4" in md and "7.7" in md

  def fail(*args, **kwargs):
    raise AssertionError("a finished attack was run again")

  _swap(monkeypatch, "fgsm", fail)
  _swap(monkeypatch, "llc", fail)
  again = runner.reproduce_attacks(config, tmp_path)
  assert [r["attack_success_rate"] for r in again["rows"]] == [
      r["attack_success_rate"] for r in summary["rows"]]


def test_reproduce_summary_keeps_attacks_finished_by_earlier_runs(checkpoint, tmp_path):
  runner.reproduce_attacks(_reproduce_config(checkpoint, ("llc",)), tmp_path)
  summary = runner.reproduce_attacks(_reproduce_config(checkpoint, ("fgsm",)), tmp_path)
  assert [(r["attack"], r["status"]) for r in summary["rows"]] == [
      ("fgsm", "done"), ("llc", "done (earlier run)")]  # Table I order
  llc = json.loads((tmp_path / "llc" / "results.json").read_text())
  assert summary["rows"][1]["attack_success_rate"] == llc["attack_success_rate"]
  # A finished run with other settings is not the same table: left out.
  other = _reproduce_config(checkpoint, ("fgsm",))
  other.n_examples.llc = N - 2
  assert [r["attack"] for r in runner.reproduce_attacks(other, tmp_path)["rows"]] == ["fgsm"]


def test_reproduce_checks_every_attack_first(checkpoint, tmp_path):
  config = _reproduce_config(checkpoint, ("fgsm", "square"))  # square: no table7 entry
  with pytest.raises(ValueError, match="cannot run 'square'"):
    runner.reproduce_attacks(config, tmp_path)
  assert not (tmp_path / "fgsm").exists()  # nothing ran
  config.continue_on_error = True
  summary = runner.reproduce_attacks(config, tmp_path)
  assert [r["status"][:8] for r in summary["rows"]] == ["done", "not run:"]


def test_summary_markdown_formatting():
  rows = [runner._Row("fgsm", "untargeted", "done",
                      {"n_examples": 200, "attack_success_rate": 79.5, "mean_l2_successful": 6.1,
                       "attack_time_s": 12.0}),
          runner._Row("uap", "untargeted", "done",
                      {"n_examples": 500, "attack_success_rate": 30.0,
                       "mean_l2_successful": None, "attack_time_s": 3.0}),
          runner._Row("om", "untargeted", "failed: RuntimeError: x", None)]
  table = runner.summary_rows(rows, "mnist")
  assert [r["gap"] for r in table] == [True, False, False]
  assert table[0]["delta"] == pytest.approx(79.5 - 90.4)
  md = runner.summary_markdown({
      "model": "m", "dataset": "mnist", "settings": "table7_mnist", "fallback_settings": "",
      "paper_column": "mnist", "candidate_seed": 100, "rows": table, "wall_time_s": 1.0,
      "device": {"kind": "cpu", "cpu_count": 2}})
  assert "| fgsm | untargeted | 200 | 79.5 | 90.4 | -10.9 **GAP** | 6.100 | 12.0 | done |" in md
  assert "| uap | untargeted | 500 | 30.0 | 24.2 | +5.8 | n/a | 3.0 | done |" in md
  assert "| om | untargeted | - | n/a | 100.0 | n/a | n/a | n/a | failed: RuntimeError: x |" in md
  assert "Flagged gaps: fgsm." in md


def test_reproduce_configs():
  mnist = experiment_config("reproduce_deepsec_mnist")
  assert tuple(mnist.attacks) == catalog.DEEPSEC_ATTACKS and mnist.settings == "table7_mnist"
  assert all(mnist.n_examples[a] >= 200 for a in mnist.attacks)
  assert mnist.n_examples.cw2 < mnist.n_examples.fgsm
  cifar = experiment_config("reproduce_deepsec_cifar10")
  assert cifar.settings == "table7_cifar10" and cifar.dataset == "cifar10"
  assert cifar.paper_column == "cifar10" and cifar.model == "deepsec_resnet20"
  for name in catalog.DEEPSEC_ATTACKS:
    runner.resolve_attack(name, mnist.settings)
    runner.resolve_attack(name, cifar.settings)
  assert experiment_config("attack_default").attack == "fgsm"


def test_per_attack_batch_size_overrides_the_shared_one():
  for name in ("reproduce_deepsec_mnist", "attractors_mnist"):
    config = experiment_config(name)
    config.batch_size = 50
    assert runner.attack_config(config, "om").batch_size == 1  # the MNIST configs' CPU choice
    assert runner.attack_config(config, "cw2").batch_size == 50
    config.batch_sizes.om = None
    config.batch_sizes.cw2 = 25
    assert runner.attack_config(config, "om").batch_size == 50
    assert runner.attack_config(config, "cw2").batch_size == 25
    assert runner.attack_config(config, "hsj").batch_size == 50  # not one of the 18


def test_reproduce_cifar10_fails_clearly_without_data(tmp_path):
  config = experiment_config("reproduce_deepsec_cifar10")
  config.data_dir = str(tmp_path / "no_tfds")
  with pytest.raises(data.DatasetNotFoundError, match="cifar10"):
    runner.reproduce_attacks(config, tmp_path / "out")


def test_attack_binary(checkpoint, tmp_path):
  """The thin binary end to end, with config overrides (a subprocess keeps absl flags apart)."""
  workdir = tmp_path / "bin"
  cmd = [sys.executable, str(repo_root() / "experiments" / "attack.py"),
         f"--config={repo_root() / 'experiments' / 'configs' / 'attack_default.py'}",
         "--config.attack=rfgsm", "--config.model=", f"--config.weights={checkpoint}",
         "--config.dataset=digits", "--config.n_examples=5", "--config.candidate_pool=40",
         "--config.attack_kwargs={\"eps\": 0.2, \"alpha\": 0.1}", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["attack"] == "rfgsm" and results["n_examples"] == 5
  assert results["kwargs"] == {"eps": 0.2, "alpha": 0.1}


@pytest.mark.skipif(deepsec_weights("MNIST_raw.pt") is None or tfds_data_dir() is None,
                    reason="../shared MNIST weights or tfds data are absent")
def test_deepsec_mnist_handful(tmp_path):
  config = runner.default_config()
  config.update(dict(data_dir=tfds_data_dir(), split="test[:200]", n_examples=6,
                     candidate_pool=50, batch_size=6,
                     weights=str(deepsec_weights("MNIST_raw.pt"))))
  results = runner.run_attack(config, tmp_path)
  assert results["model"] == "deepsec_mnist" and results["weights_id"].startswith("sha256:")
  with np.load(tmp_path / "adversarial.npz") as f:
    assert f["x"].shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(f["success"], f["predicted"] != f["y"])

