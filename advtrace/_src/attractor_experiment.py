r"""The injected-attractors experiment: the paper's Tables I-VI, Figs. 5 and 7, and ablations.

:func:`run` builds the attractor model :math:`M` (eq. 2) around a victim :math:`C`, calibrates
the detector on held-out clean data, attacks :math:`C`, :math:`M` and the integrated model
:math:`M_{(d,r)}` with the catalogue attacks on DEEPSEC's candidates, and writes into its
workdir ``results.json``, ``results.md`` and ``figures/``. Every attack run goes through the
resumable runner (``advtrace._src.attacks.runner``) in its own subfolder, and every analysis is
saved when done, so an interrupted run continues where it stopped.

Workdir layout: ``victim/<attack>`` (attacks on C; ``config.victim_workdir`` may point to an
``experiments/reproduce_attacks.py`` workdir with the same settings to reuse its runs),
``attractor/<attack>`` (on M), ``integrated/<attack>`` (on :math:`M_{(d,r)}`),
``ablation_weighted_sum/<attack>`` and ``ablation_other_key/<attack>``, ``clean_w.npz`` (W on
the calibration and test images), ``fig5.json``, ``fig7.json``.

The secret key lives outside the workdir (``config.key_path``, by default ``<workdir>.secret/``)
as a mode-0600 file; results name it by its fingerprint only.

References:
  Zhang, Chang, Lee, "Detection and Recovery of Adversarial Attacks with Injected Attractors",
  2020. https://arxiv.org/abs/2003.02732
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure
from sklearn import metrics

from advtrace._src import atomic
from advtrace._src import attractor_analysis as analysis
from advtrace._src import attractors
from advtrace._src import batching
from advtrace._src import data
from advtrace._src import qim
from advtrace._src import xla
from advtrace._src.attacks import catalog
from advtrace._src.attacks import runner

# Paper numbers (%), attractors.md §3. None: "n/a" in the paper.
# Table I: (c) ASR on C, (d) ASR on M, (e) detection rate, (f) recovery rate, (g) overall ASR.
PAPER_TABLE1 = {
    "mnist": {
        "fgsm": (90.4, 0.3, 100.0, 100.0, 0.0), "rfgsm": (65.6, 0.1, 100.0, 100.0, 0.0),
        "bim": (100.0, 4.2, 100.0, 100.0, 0.0), "pgd": (100.0, 7.1, 100.0, 100.0, 0.0),
        "umifgsm": (100.0, 3.4, 100.0, 100.0, 0.0), "uap": (24.2, 0.3, 66.7, 100.0, 0.1),
        "deepfool": (100.0, 25.5, 100.0, 100.0, 0.0), "om": (100.0, 97.0, 87.6, 100.0, 12.0),
        "bpda": (100.0, 7.0, 100.0, 100.0, 0.0), "spsa": (96.8, 20.1, 100.0, 100.0, 0.0),
        "llc": (7.7, 0.0, None, None, 0.0), "rllc": (1.6, 0.0, None, None, 0.0),
        "illc": (77.5, 0.0, None, None, 0.0), "tmifgsm": (91.6, 1.0, 100.0, 100.0, 0.0),
        "jsma": (74.1, 5.1, 90.2, 93.5, 0.5), "blb": (100.0, 6.4, 100.0, 100.0, 0.0),
        "cw2": (100.0, 11.6, 100.0, 100.0, 0.0), "ead": (98.9, 6.2, 98.4, 100.0, 0.1)},
    "cifar10": {
        "fgsm": (88.7, 53.5, 100.0, 99.8, 0.0), "rfgsm": (99.6, 62.7, 100.0, 100.0, 0.0),
        "bim": (100.0, 86.8, 99.9, 99.8, 0.0), "pgd": (100.0, 94.6, 100.0, 100.0, 0.0),
        "umifgsm": (100.0, 100.0, 91.7, 98.1, 8.3), "uap": (93.1, 87.0, 94.4, 10.9, 4.9),
        "deepfool": (100.0, 99.5, 98.1, 99.1, 1.9), "om": (100.0, 100.0, 81.9, 93.8, 18.1),
        "bpda": (100.0, 92.1, 100.0, 100.0, 0.0), "spsa": (90.2, 77.7, 100.0, 81.0, 0.0),
        "llc": (13.2, 5.4, 98.1, 30.2, 0.1), "rllc": (27.6, 16.0, 100.0, 27.7, 0.0),
        "illc": (100.0, 93.7, 97.0, 55.7, 2.8), "tmifgsm": (100.0, 100.0, 89.6, 22.7, 10.4),
        "jsma": (100.0, 100.0, 92.9, 10.9, 7.1), "blb": (100.0, 100.0, 99.8, 61.6, 0.2),
        "cw2": (100.0, 100.0, 99.7, 97.8, 0.3), "ead": (100.0, 77.5, 97.2, 95.4, 2.2)},
}
# Table IV with Table III's AUC: (TPR at 5% FPR, TPR at 0.5% FPR, overall ASR at 0.5%, AUC).
PAPER_TABLE4 = {
    "mnist": {
        "fgsm": (100, 100, 0.0, 100.0), "rfgsm": (100, 100, 0.0, 100.0),
        "bim": (100, 100, 0.0, 100.0), "pgd": (100, 100, 0.0, 100.0),
        "umifgsm": (100, 100, 0.0, 100.0), "uap": (66.7, 66.7, 0.1, 83.3),
        "deepfool": (100, 100, 0.0, 100.0), "om": (87.6, 85.6, 14.0, 92.8),
        "bpda": (100, 100, 0.0, 100.0), "spsa": (100, 100, 0.0, 100.0),
        "llc": (None, None, 0.0, None), "rllc": (None, None, 0.0, None),
        "illc": (None, None, 0.0, None), "tmifgsm": (100, 100, 0.0, 100.0),
        "jsma": (90.2, 88.2, 0.6, 93.2), "blb": (100, 100, 0.0, 100.0),
        "cw2": (100, 100, 0.0, 100.0), "ead": (98.4, 98.4, 0.1, 99.3)},
    "cifar10": {
        "fgsm": (100, 100, 0.0, 99.9), "rfgsm": (100, 100, 0.0, 100.0),
        "bim": (99.9, 99.9, 0.1, 100.0), "pgd": (100, 99.9, 0.1, 100.0),
        "umifgsm": (91.7, 86.3, 13.7, 97.7), "uap": (94.4, 93.6, 5.6, 97.2),
        "deepfool": (98.1, 98.0, 2.0, 98.6), "om": (81.9, 81.1, 18.9, 88.3),
        "bpda": (100, 99.9, 0.1, 100.0), "spsa": (100, 100, 0.0, 100.0),
        "llc": (98.1, 98.1, 0.1, 99.9), "rllc": (100, 98.1, 0.3, 100.0),
        "illc": (97.0, 90.7, 8.7, 97.8), "tmifgsm": (89.6, 81.1, 18.9, 95.2),
        "jsma": (92.9, 90.1, 9.9, 97.2), "blb": (99.8, 99.6, 0.4, 99.9),
        "cw2": (99.7, 99.7, 0.3, 99.8), "ead": (97.2, 97.2, 2.2, 98.3)},
}
# Table V: ASR on C and on the integrated model M_(d,r).
PAPER_TABLE5 = {
    "mnist": {
        "fgsm": (90.4, 0.7), "rfgsm": (65.6, 0.0), "bim": (100, 0.7), "pgd": (100, 0.0),
        "umifgsm": (100, 0.7), "uap": (24.2, 15.6), "deepfool": (100.0, 1.9),
        "om": (100.0, 17.5), "bpda": (100.0, 0.0), "spsa": (96.8, 0.8), "llc": (7.7, 0.0),
        "rllc": (1.6, 0.0), "illc": (77.5, 0.0), "tmifgsm": (91.6, 1.1), "jsma": (74.1, 3.1),
        "blb": (100.0, 0.6), "cw2": (100.0, 1.9), "ead": (98.9, 3.2)},
    "cifar10": {
        "fgsm": (88.7, 5.6), "rfgsm": (99.6, 6.5), "bim": (100.0, 5.7), "pgd": (100.0, 7.1),
        "umifgsm": (100.0, 6.0), "uap": (93.1, 39.3), "deepfool": (100.0, 1.7),
        "om": (100.0, 24.9), "bpda": (100.0, 7.0), "spsa": (90.2, 10.1), "llc": (13.2, 2.2),
        "rllc": (27.6, 4.0), "illc": (100.0, 7.6), "tmifgsm": (100.0, 29.6),
        "jsma": (100.0, 15.0), "blb": (100.0, 7.1), "cw2": (100.0, 10.8), "ead": (100.0, 9.6)},
}
PAPER_TABLE2 = {"mnist": (98.1, 98.0), "cifar10": (90.1, 90.0)}  # clean accuracy C, M
PAPER_TABLE6 = {"cifar10": {"C": (0.11, 0.11, 0.14), "M_dr": (4.81, 0.39, 0.27)}}  # BLB CW2 EAD
UNBOUNDED_ATTACKS = ("blb", "cw2", "ead")
STAGES = ("fig5", "fig7", "table1", "integrated", "ablations")


# ----------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
  """The config of :func:`run`: :func:`runner.default_reproduce_config`'s fields plus

  - ``key_path``: the secret key file (created if missing); default
    ``<workdir>.secret/qim_key.npz``.
  - ``key_seed``: derive a new key from this seed (reproducible, but then the seed is the
    secret); None: from OS entropy.
  - ``qim``: ``steps``, ``scale_weights``, ``a2``, ``toward_message``, ``in_range``
    (``qim.QIMConfig``).
  - ``target_fprs``: the detector's operating points (paper: 5% and 0.5%).
  - ``calibration_split``, ``calibration_fraction``, ``calibration_seed``: the held-out clean
    images for F_d (D9: DEEPSEC's validation split, 10% of train, shuffle seed 100).
  - ``victim_workdir``: where the attacks on C run (empty: ``<workdir>/victim``).
  - ``stages``: which of ``STAGES`` to run (Table II and the calibration always run).
  - ``integrated_attacks``, ``ablation_attacks``: the attacks of Table V and of the ablations.
  - ``fig5_examples``, ``fig7_examples``, ``fig7_directions``, ``fig7_radii``: analysis sizes.
  """
  config = runner.default_reproduce_config()
  config.key_path = ml_collections.config_dict.placeholder(str)
  config.key_seed = ml_collections.config_dict.placeholder(int)
  defaults = qim.QIMConfig()
  config.qim = ml_collections.ConfigDict({
      "steps": defaults.steps, "scale_weights": defaults.scale_weights, "a2": defaults.a2,
      "toward_message": defaults.toward_message, "in_range": defaults.in_range})
  config.target_fprs = (0.05, 0.005)
  config.calibration_split = "train"
  config.calibration_fraction = 0.1
  config.calibration_seed = 100
  config.victim_workdir = ""
  config.stages = STAGES
  config.integrated_attacks = catalog.DEEPSEC_ATTACKS
  config.ablation_attacks = ("fgsm", "pgd", "deepfool", "cw2")
  config.fig5_examples = 10000
  config.fig7_examples = 200
  config.fig7_directions = 1000
  # D11 proposes {0.5, 1, 2}; on the DEEPSEC CNN no random direction of those lengths changes
  # the label (H = 0.98 at all three), so larger radii are scanned too.
  config.fig7_radii = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
  return config


def qim_config(config: ml_collections.ConfigDict) -> qim.QIMConfig:
  c = config.qim
  return qim.QIMConfig(tuple(map(float, c.steps)), tuple(map(float, c.scale_weights)),
                       float(c.a2), bool(c.toward_message), bool(c.in_range))


def default_key_path(workdir: str) -> str:
  workdir = os.path.abspath(workdir).rstrip(os.sep)
  return os.path.join(workdir + ".secret", "qim_key.npz")


def _load_or_create_key(path: str, seed: int | None, num_messages: int, shape,
                        cfg: qim.QIMConfig) -> qim.SecretKey:
  """The key at ``path``, created first if missing. Creation holds the folder's lock, so runs
  started together on one workdir create one key and all use it."""
  folder = os.path.dirname(path)
  os.makedirs(folder, mode=0o700, exist_ok=True)
  with atomic.workdir_lock(folder):
    if not os.path.exists(path):
      seed = secrets.randbits(63) if seed is None else int(seed)
      created = qim.new_secret_key(jax.random.key(seed), num_messages, tuple(shape), cfg)
      qim.save_secret_key(path, created)
      logging.info("Created a QIM key (fingerprint %s) at %s.", created.fingerprint(), path)
  secret = qim.load_secret_key(path)
  expected = (num_messages, len(cfg.steps)) + tuple(shape)
  if secret.messages.shape != expected:
    raise ValueError(f"The key in {path} has shape {secret.messages.shape}, this experiment "
                     f"needs {expected} (classes, step sizes, image shape); use another "
                     "key_path.")
  return secret


# ----------------------------------------------------------------------------- evaluation


class _Setup:
  """Everything the stages share: C, the key, M, W on clean data and the calibrations."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.cfg = qim_config(config)
    self.context = runner.load_context(config)
    ds = self.context.dataset
    self.key_path = config.key_path or default_key_path(workdir)
    self.secret = _load_or_create_key(self.key_path, config.key_seed, ds.num_classes,
                                      ds.images.shape[1:], self.cfg)
    self.classifier = self.context.logits_fn
    self.decoder = xla.jit(attractors.decoder_fn(self.secret, self.cfg))
    self.m_logits = attractors.attractor_logits_fn(self.classifier, self.secret, self.cfg)
    self.m_jit = xla.jit(self.m_logits)
    self.batch = int(config.eval_batch_size)
    self._check_fingerprint()
    self.w_cal, self.w_test, self.m_test_logits = self._clean_outputs()
    self.cals = [attractors.calibrate(self.w_cal, fpr) for fpr in config.target_fprs]
    # The score's standardisation (calibration-set mean and SD) is the same for every target FPR.
    self.test_scores = np.asarray(attractors.detection_score(self.w_test, self.cals[0]))
    self.test_fprs = [100.0 * float(np.mean(np.asarray(attractors.detect(self.w_test, c)[0])))
                      for c in self.cals]

  def _check_fingerprint(self):
    c = self.config
    fp = json.loads(json.dumps({
        "model": self.context.model, "weights": self.context.weights_id,
        "dataset": self.context.dataset.name, "split": c.split, "qim": self.cfg._asdict(),
        "key": self.secret.fingerprint(), "settings": c.settings,
        "target_fprs": list(c.target_fprs), "calibration": [
            c.calibration_split, c.calibration_fraction, c.calibration_seed],
        "candidate_seed": c.candidate_seed, "seed": c.seed}, default=atomic.json_default))
    os.makedirs(self.workdir, exist_ok=True)
    runner.check_fingerprint(os.path.join(self.workdir, "experiment_config.json"), fp,
                             "an attractor experiment with other settings")

  def _clean_outputs(self):
    path = os.path.join(self.workdir, "clean_w.npz")
    if os.path.exists(path):
      saved = atomic.read_npz(path)
      return saved["w_calibration"], saved["w_test"], saved["m_test_logits"]
    c = self.config
    train = data.load(c.dataset, c.calibration_split, c.data_dir)
    _, held_out = data.deepsec_split(train, c.calibration_fraction, c.calibration_seed)
    w_cal = batching.map_batched(self.decoder, held_out.images, self.batch)
    images = self.context.dataset.images
    w_test = batching.map_batched(self.decoder, images, self.batch)
    m_test = batching.map_batched(self.m_jit, images, self.batch)
    atomic.write_npz(path, {"w_calibration": w_cal, "w_test": w_test, "m_test_logits": m_test})
    return w_cal, w_test, m_test

  def wrapped(self, logits_fn, name: str,
              test_logits: np.ndarray | None = None) -> runner.Context:
    """C's context with another attacked model (candidates and their order stay C's).

    ``test_logits``: the model's logits on the test split, if already computed.
    """
    if test_logits is None:
      test_logits = batching.map_batched(xla.jit(logits_fn), self.context.dataset.images,
                                         self.batch)
    return self.context._replace(
        logits_fn=logits_fn, model=f"{self.context.model}+{name}",
        weights_id=f"{self.context.weights_id}+{name}:{self.secret.fingerprint()}:"
                   f"{json.dumps(self.cfg._asdict())}",
        target_logits=test_logits)

  def predictions(self, x: np.ndarray) -> np.ndarray:
    return np.argmax(batching.map_batched(self.m_jit, x, self.batch), -1)

  def forensics(self, x_adv: np.ndarray, y: np.ndarray, success: np.ndarray) -> dict[str, Any]:
    """Detection, recovery and AUC of F_d / F_r on adversarial outputs (paper §VI-A)."""
    w = batching.map_batched(self.decoder, x_adv, self.batch)
    n = len(y)
    out: dict[str, Any] = {"n_examples": n, "n_success": int(success.sum()),
                           "attack_success_rate": 100.0 * float(success.mean())}
    recovered = np.asarray(attractors.recover(w))
    for cal, test_fpr in zip(self.cals, self.test_fprs, strict=True):
      tag = _fpr_tag(cal.target_fpr)
      flagged = np.asarray(attractors.detect(w, cal)[0])
      hit = flagged & success
      tpr = 100.0 * hit.sum() / success.sum() if success.any() else None
      out[f"detection_rate_{tag}"] = tpr
      out[f"recovery_rate_{tag}"] = (100.0 * float(np.mean(recovered[hit] == y[hit]))
                                     if hit.any() else None)
      out[f"overall_asr_{tag}"] = (out["attack_success_rate"] * (1.0 - (tpr or 0.0) / 100.0))
      out[f"flagged_all_{tag}"] = 100.0 * float(flagged.mean())
      out[f"fpr_test_{tag}"] = test_fpr
    scores = np.asarray(attractors.detection_score(w, self.cals[0]))[success]
    out["auc"] = (100.0 * float(metrics.roc_auc_score(
        np.r_[np.zeros(len(self.test_scores)), np.ones(len(scores))],
        np.r_[self.test_scores, scores])) if len(scores) else None)
    return out


def _fpr_tag(fpr: float) -> str:
  return f"fpr{100 * fpr:g}".replace(".", "_")


def _success_on(predicted: np.ndarray, adv: Mapping[str, np.ndarray], targeted: bool):
  return predicted == adv["target"] if targeted else predicted != adv["y"]


def _load_adversarial(workdir: str) -> dict[str, np.ndarray]:
  return atomic.read_npz(os.path.join(workdir, "adversarial.npz"))


# ----------------------------------------------------------------------------- stages


def _table2(setup: _Setup) -> dict[str, Any]:
  labels = setup.context.dataset.labels
  acc_c = 100.0 * float(np.mean(np.argmax(setup.context.clean_logits, -1) == labels))
  acc_m = 100.0 * float(np.mean(np.argmax(setup.m_test_logits, -1) == labels))
  changed = int(np.sum(np.argmax(setup.context.clean_logits, -1)
                       != np.argmax(setup.m_test_logits, -1)))
  return {"n_test": int(len(labels)), "accuracy_c": acc_c, "accuracy_m": acc_m,
          "drop": acc_c - acc_m, "predictions_changed": changed}


def _calibration(setup: _Setup) -> list[dict[str, Any]]:
  rows = []
  for cal, test_fpr in zip(setup.cals, setup.test_fprs, strict=True):
    rows.append({"target_fpr": 100 * cal.target_fpr,
                 "calibration_fpr": 100 * cal.calibration_fpr,
                 "test_fpr": test_fpr, "n_calibration": len(setup.w_cal),
                 "n_test": len(setup.w_test), "tail": cal.tail, "upper": cal.upper,
                 "lower": cal.lower, "sigma0": cal.sigma0})
  return rows


def _cached(path: str, compute) -> dict[str, Any]:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  atomic.write_json(path, result)
  return result


def _summary(values: np.ndarray) -> dict[str, float]:
  return {"mean": float(np.mean(values)), "median": float(np.median(values)),
          "p5": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95))}


def _fig5(setup: _Setup) -> dict[str, Any]:
  ds = setup.context.dataset
  n = min(int(setup.config.fig5_examples), len(ds.labels))
  parts = []
  for batch in batching.padded_batches(ds.images[:n], ds.labels[:n], 250):
    out = analysis.gradient_paths(setup.classifier, setup.secret.messages, setup.cfg, batch.x,
                                  batch.y)
    out = jax.tree.map(np.asarray, out)
    parts.append({k: v[batch.mask] for k, v in out.items()})
  values = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  fig = Figure(figsize=(10, 3.5))
  ax1, ax2 = fig.subplots(1, 2)
  ax1.hist(np.log10(values["w_l1"]), bins=50, color="tab:orange", label=r"$\|W(x)\|_1$")
  ax1.axvline(0.0, color="tab:blue", label=r"$\|C(x)\|_1 = 1$")
  ax1.set_xlabel("log10 L1 norm of the output")
  ax1.legend()
  for key, label in (("grad_j_via_c", "through C"), ("grad_j_via_w", "through W")):
    ax2.hist(np.log10(values[key] + 1e-12), bins=50, alpha=0.6, label=label)
  ax2.set_xlabel(r"log10 $\|\nabla_x J\|_1$, $J = -\log M_y$")
  ax2.legend()
  figure = atomic.write_figure(setup.workdir, fig, "fig5_magnitudes")
  return {"n_examples": n, "figure": figure,
          **{k: _summary(v) for k, v in values.items()},
          "fraction_w_path_dominates": float(np.mean(values["grad_j_via_w"]
                                                     > values["grad_j_via_c"]))}


def _fig7(setup: _Setup) -> dict[str, Any]:
  config, ds = setup.config, setup.context.dataset
  n = min(int(config.fig7_examples), len(ds.labels))
  x, y = ds.images[:n], ds.labels[:n]
  parts = [analysis.nearest_attractors(b.x, setup.secret.messages, setup.cfg)
           for b in batching.padded_batches(x, None, 50)]
  x_w = np.concatenate([np.asarray(p[0]) for p in parts])[:n]
  t = np.concatenate([np.asarray(p[1]) for p in parts])[:n]
  models = {"M": setup.m_logits, "C": setup.classifier}
  out: dict[str, Any] = {"n_examples": n, "directions": int(config.fig7_directions),
                         "attractor_l2": _summary(np.linalg.norm((x_w - x).reshape(n, -1), axis=1))}
  soft = {k: np.asarray(analysis.soft_label_cosine(f, jnp.asarray(x), jnp.asarray(x_w),
                                                   jnp.asarray(t))) for k, f in models.items()}
  out["soft_label"] = {k: {**_summary(v), "fraction_above_0.8": float(np.mean(v > 0.8))}
                       for k, v in soft.items()}
  x_local = np.asarray(analysis.local_attractors(jnp.asarray(x), setup.secret.messages,
                                                 setup.cfg, jnp.asarray(t)))
  out["local_attractor_l2"] = _summary(np.linalg.norm((x_local - x).reshape(n, -1), axis=1))
  soft_local = {k: np.asarray(analysis.soft_label_cosine(
      f, jnp.asarray(x), jnp.asarray(x_local), jnp.asarray(t))) for k, f in models.items()}
  out["soft_label_local"] = {k: {**_summary(v), "fraction_above_0.8": float(np.mean(v > 0.8))}
                             for k, v in soft_local.items()}
  # D11: the sphere radius at which the clean label keeps ~90% of the sphere (on M).
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(int(config.seed)),
                                                 jnp.arange(n))
  probe = slice(0, min(n, 50))
  h_y = {}
  for r in config.fig7_radii:
    res = _density(setup.m_logits, x[probe], x_w[probe], t[probe], y[probe], keys[probe], r, 200)
    h_y[float(r)] = float(np.mean(res["h_y"]))
  radius = min(h_y, key=lambda r: abs(h_y[r] - 0.9))
  out["radius_selection"] = {"h_y_on_M": h_y, "chosen": radius}
  density = {k: _density(f, x, x_w, t, y, keys, radius, int(config.fig7_directions))
             for k, f in models.items()}
  out["local_density"] = {
      k: {**_summary(v["cosine"]), "fraction_in_basin_eps_0.9": float(np.mean(v["cosine"] >= 0.1)),
          "mean_h_t": float(np.mean(v["h_t"])), "mean_h_y": float(np.mean(v["h_y"]))}
      for k, v in density.items()}
  fig = Figure(figsize=(10, 3.5))
  ax1, ax2 = fig.subplots(1, 2)
  for k in models:
    ax1.hist(soft[k], bins=40, range=(-1, 1), alpha=0.6, label=f"{k}, nearest attractor")
    ax1.hist(soft_local[k], bins=40, range=(-1, 1), alpha=0.6, label=f"{k}, finest lattice")
    ax2.hist(density[k]["cosine"], bins=40, range=(-1, 1), alpha=0.6, label=k)
  ax1.set_xlabel(r"cos($x_w - x$, $-\nabla_x J$), soft-label loss")
  ax2.set_xlabel(rf"cos($x_w - x$, $\nabla_x H_\delta$), $\delta$ = {radius:g}")
  ax1.legend()
  ax2.legend()
  out["figure"] = atomic.write_figure(setup.workdir, fig, "fig7_cosines")
  return out


def _density(logits_fn, x, x_w, t, y, keys, radius, directions) -> dict[str, np.ndarray]:
  parts = []
  for start in range(0, len(x), 8):
    sl = slice(start, start + 8)
    res = analysis.density_cosine(logits_fn, jnp.asarray(x[sl]), jnp.asarray(x_w[sl]),
                                  jnp.asarray(t[sl]), jnp.asarray(y[sl]), keys[sl],
                                  float(radius), directions)
    parts.append({k: np.asarray(v) for k, v in res.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _run_attack(setup: _Setup, name: str, folder: str, context: runner.Context) -> dict | None:
  config = setup.config
  spec, kwargs = runner.resolve_attack(name, config.settings, config.attack_kwargs,
                                       config.fallback_settings)
  sub = runner.attack_config(config, name)
  return runner.run_resolved(sub, folder, spec, kwargs, context)


def _victim_folder(setup: _Setup, name: str) -> str:
  root = setup.config.victim_workdir or os.path.join(setup.workdir, "victim")
  return os.path.join(root, name)


def _table1_row(setup: _Setup, name: str, m_context: runner.Context) -> dict[str, Any]:
  folder = os.path.join(setup.workdir, "attractor", name)
  on_m = _run_attack(setup, name, folder, m_context)
  victim = _run_attack(setup, name, _victim_folder(setup, name), setup.context)
  adv = _load_adversarial(folder)
  row = {"attack": name, "threat": catalog.get(name).threat,
         "asr_c": victim["attack_success_rate"], "n_c": victim["n_examples"],
         **setup.forensics(adv["x_adv"], adv["y"], adv["success"].astype(bool)),
         "mean_l2_successful_m": on_m["mean_l2_successful"],
         "attack_time_s_m": on_m["attack_time_s"]}
  return row


def _integrated_row(setup: _Setup, name: str, context: runner.Context,
                    table1: Mapping[str, Any]) -> dict[str, Any]:
  result = _run_attack(setup, name, os.path.join(setup.workdir, "integrated", name), context)
  victim = _run_attack(setup, name, _victim_folder(setup, name), setup.context)
  return {"attack": name, "asr_c": victim["attack_success_rate"], "n_c": victim["n_examples"],
          "asr_integrated": result["attack_success_rate"], "n_examples": result["n_examples"],
          "mean_l2_successful_c": victim["mean_l2_successful"],
          "mean_l2_successful_integrated": result["mean_l2_successful"],
          "mean_l2_successful_m": (table1.get(name) or {}).get("mean_l2_successful_m")}


def _ablation_rows(setup: _Setup, name: str, weighted: runner.Context,
                   other: runner.Context) -> dict[str, Any]:
  targeted = catalog.get(name).threat == "targeted"
  rows = {}
  # (a) The weighted-sum model of eq. (1): attacked white-box; success on it, detection by W.
  folder = os.path.join(setup.workdir, "ablation_weighted_sum", name)
  _run_attack(setup, name, folder, weighted)
  adv = _load_adversarial(folder)
  rows["a_weighted_sum"] = setup.forensics(adv["x_adv"], adv["y"], adv["success"].astype(bool))
  # (b) The construction with the attacker's own key; the examples then meet the real M and W.
  folder = os.path.join(setup.workdir, "ablation_other_key", name)
  _run_attack(setup, name, folder, other)
  adv = _load_adversarial(folder)
  success = _success_on(setup.predictions(adv["x_adv"]), adv, targeted)
  rows["b_other_key"] = {**setup.forensics(adv["x_adv"], adv["y"], success),
                         "asr_on_attacker_model": 100.0 * float(adv["success"].mean())}
  # (c) The attacker knows the key and attacks C = M - W directly (the runs on C).
  folder = _victim_folder(setup, name)
  _run_attack(setup, name, folder, setup.context)
  adv = _load_adversarial(folder)
  success = _success_on(setup.predictions(adv["x_adv"]), adv, targeted)
  rows["c_key_known"] = {**setup.forensics(adv["x_adv"], adv["y"], success),
                         "asr_on_c": 100.0 * float(adv["success"].mean())}
  return rows


# ----------------------------------------------------------------------------- driver


def _stage_attacks(setup: _Setup, listed, subfolders) -> list[tuple[str, bool]]:
  """``(name, listed)`` in Table I order: the listed attacks, and every other attack that earlier
  runs finished on C and in all ``<workdir>/<subfolder>/<name>``, so tables made in pieces stay
  whole."""
  def folders(name):
    return [_victim_folder(setup, name)] + [os.path.join(setup.workdir, sub, name)
                                            for sub in subfolders]

  names = set(listed) | set(runner.finished_elsewhere(listed, folders))
  return [(n, n in listed) for n in sorted(names, key=runner.table_order)]


def _row_or_skip(listed: bool, make_row, setup: _Setup, name: str, *args):
  """``make_row(setup, name, *args)``; an earlier run's attack made with other settings is left
  out of the tables, not fatal."""
  try:
    return make_row(setup, name, *args)
  except ValueError as e:
    if listed:
      raise
    logging.warning("%s: earlier runs left out of the tables: %s", name, e)
    return None


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs the injected-attractors experiment; see the module docstring.

  Args:
    config: see :func:`default_config`.
    workdir: the output folder; rerunning with the same one resumes.

  Returns:
    The dict written to ``results.json``.
  """
  t0 = time.perf_counter()
  workdir = os.path.abspath(os.fspath(workdir))
  unknown = set(config.stages) - set(STAGES)
  if unknown:
    raise ValueError(f"Unknown stages {sorted(unknown)}; choose from {STAGES}.")
  for field in ("attacks", "integrated_attacks", "ablation_attacks"):
    for name in config[field]:
      catalog.get(name)  # unknown names fail here, before any work
  setup = _Setup(config, workdir)
  column = str(config.paper_column)
  results: dict[str, Any] = {
      "model": setup.context.model, "weights": setup.context.weights,
      "dataset": setup.context.dataset.name, "settings": config.settings,
      "qim": setup.cfg._asdict(), "key_fingerprint": setup.secret.fingerprint(),
      "paper_column": column, "candidate_seed": int(config.candidate_seed),
      "table2": _table2(setup), "calibration": _calibration(setup),
  }

  def save():
    results["wall_time_s"] = time.perf_counter() - t0
    results["device"] = runner.device_info()
    atomic.write_json(os.path.join(workdir, "results.json"), results)
    atomic.write_text(os.path.join(workdir, "results.md"), results_markdown(results))

  save()
  logging.info("Clean accuracy C %.2f%%, M %.2f%%; test FPR %s.",
               results["table2"]["accuracy_c"], results["table2"]["accuracy_m"],
               [round(r["test_fpr"], 2) for r in results["calibration"]])
  if "fig5" in config.stages:
    results["fig5"] = _cached(os.path.join(workdir, "fig5.json"), lambda: _fig5(setup))
    save()
  if "fig7" in config.stages:
    results["fig7"] = _cached(os.path.join(workdir, "fig7.json"), lambda: _fig7(setup))
    save()
  table1: dict[str, Any] = {}
  if "table1" in config.stages:
    m_context = setup.wrapped(setup.m_logits, "attractors", setup.m_test_logits)
    results["table1"] = []
    for name, listed in _stage_attacks(setup, config.attacks, ["attractor"]):
      row = _row_or_skip(listed, _table1_row, setup, name, m_context)
      if row is not None:
        table1[name] = row
        results["table1"].append(row)
        save()
  if "integrated" in config.stages:
    context = setup.wrapped(attractors.integrated_logits_fn(
        setup.classifier, setup.secret, setup.cals[0], setup.cfg), "integrated")
    results["table5"] = []
    for name, listed in _stage_attacks(setup, config.integrated_attacks, ["integrated"]):
      row = _row_or_skip(listed, _integrated_row, setup, name, context, table1)
      if row is not None:
        results["table5"].append(row)
        save()
  if "ablations" in config.stages:
    other_path = os.path.join(os.path.dirname(setup.key_path), "attacker_key.npz")
    seed = None if config.key_seed is None else int(config.key_seed) + 1
    other_key = _load_or_create_key(other_path, seed, len(setup.secret.messages),
                                    setup.context.dataset.images.shape[1:], setup.cfg)
    if other_key.fingerprint() == setup.secret.fingerprint():
      raise ValueError(f"{other_path} holds the defender's own key; delete it.")
    weighted = setup.wrapped(attractors.weighted_sum_logits_fn(
        setup.classifier, setup.secret, setup.cfg), "weighted_sum")
    other = setup.wrapped(attractors.attractor_logits_fn(setup.classifier, other_key, setup.cfg),
                          f"attractors_other_key:{other_key.fingerprint()}")
    results["ablations"] = {}
    ablation_folders = ["ablation_weighted_sum", "ablation_other_key"]
    for name, listed in _stage_attacks(setup, config.ablation_attacks, ablation_folders):
      rows = _row_or_skip(listed, _ablation_rows, setup, name, weighted, other)
      if rows is not None:
        results["ablations"][name] = rows
        save()
  save()
  return results


# ----------------------------------------------------------------------------- report


def _f(value, spec=".1f") -> str:
  return "n/a" if value is None else format(value, spec)


def _paper(table: Mapping, column: str, name: str, index: int):
  row = table.get(column, {}).get(name)
  return None if row is None else row[index]


def results_markdown(results: Mapping[str, Any]) -> str:
  """The human-readable report of :func:`run`, with the paper's numbers beside ours."""
  col = results["paper_column"]
  t2 = results["table2"]
  p2 = PAPER_TABLE2.get(col, (None, None))
  tags = [(_fpr_tag(r["target_fpr"] / 100), r["target_fpr"]) for r in results["calibration"]]
  lines = [
      f"# Injected attractors: {results['model']} on {results['dataset']}", "",
      f"Settings `{results['settings']}`; QIM {results['qim']}; key fingerprint "
      f"`{results['key_fingerprint']}` (the key itself is stored apart and never published). "
      "Paper numbers in brackets (seed-003, attractors.md §3).", "",
      "## Table II: clean accuracy", "",
      "| model | ours (%) | paper (%) |", "|---|---:|---:|",
      f"| C | {t2['accuracy_c']:.2f} | {_f(p2[0])} |",
      f"| M | {t2['accuracy_m']:.2f} | {_f(p2[1])} |",
      f"| drop (pt) | {t2['drop']:.2f} | {_f(None if p2[0] is None else p2[0] - p2[1])} |", "",
      f"{t2['n_test']} test images; {t2['predictions_changed']} predictions differ between C "
      "and M.", "",
      "## Detector calibration (D7, D9)", "",
      "| target FPR (%) | FPR on calibration set (%) | FPR on test set (%) | n calibration "
      "| U | L | sigma0 |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results["calibration"]:
    lines.append(f"| {r['target_fpr']:g} | {r['calibration_fpr']:.2f} | {r['test_fpr']:.2f} | "
                 f"{r['n_calibration']} | {r['upper']:.6g} | {r['lower']:.6g} | "
                 f"{r['sigma0']:.3g} |")
  if "table1" in results:
    tag5 = tags[0][0]
    lines += ["", f"## Table I: forensic setting, FPR {tags[0][1]:g}%", "",
              "(c) ASR on C, (d) ASR on M, (e) detection rate among successful examples on M, "
              "(f) recovery rate among detected, (g) overall ASR = (d) x (1 - (e)).", "",
              "| attack | n | (c) | (d) | (e) | (f) | **(g)** | (g) paper | (g) within 5 pt |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["table1"]:
      p = [_paper(PAPER_TABLE1, col, r["attack"], i) for i in range(5)]
      g = r[f"overall_asr_{tag5}"]
      ok = "n/a" if p[4] is None else ("yes" if g <= p[4] + 5.0 else "**no**")
      lines.append(
          f"| {r['attack']} | {r['n_examples']} | {r['asr_c']:.1f} [{_f(p[0])}] | "
          f"{r['attack_success_rate']:.1f} [{_f(p[1])}] | "
          f"{_f(r[f'detection_rate_{tag5}'])} [{_f(p[2])}] | "
          f"{_f(r[f'recovery_rate_{tag5}'])} [{_f(p[3])}] | **{g:.1f}** | {_f(p[4])} | {ok} |")
    lines += ["", "## Tables III and IV: TPR, FPR and AUC", "",
              "| attack | " + " | ".join(f"TPR@{v:g}% | FPR test@{v:g}% | OASR@{v:g}%"
                                         for _, v in tags)
              + " | AUC | paper TPR 5 / 0.5 | paper OASR@0.5 | paper AUC |",
              "|---|" + "---:|" * (3 * len(tags) + 4)]
    for r in results["table1"]:
      cells = []
      for tag, _ in tags:
        cells += [_f(r[f"detection_rate_{tag}"]), _f(r[f"fpr_test_{tag}"], ".2f"),
                  _f(r[f"overall_asr_{tag}"])]
      p = [_paper(PAPER_TABLE4, col, r["attack"], i) for i in range(4)]
      lines.append(f"| {r['attack']} | " + " | ".join(cells) + f" | {_f(r['auc'])} | "
                   f"{_f(p[0])} / {_f(p[1])} | {_f(p[2])} | {_f(p[3])} |")
  if "table5" in results:
    lines += ["", "## Table V: integrated setting (ASR, %)", "",
              "| attack | n | C | M_(d,r) | paper C | paper M_(d,r) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results["table5"]:
      p = [_paper(PAPER_TABLE5, col, r["attack"], i) for i in range(2)]
      lines.append(f"| {r['attack']} | {r['n_examples']} | {r['asr_c']:.1f} | "
                   f"{r['asr_integrated']:.1f} | {_f(p[0])} | {_f(p[1])} |")
    unbounded = [r for r in results["table5"] if r["attack"] in UNBOUNDED_ATTACKS]
    if unbounded:
      lines += ["", "## Table VI: mean L2 of successful unbounded attacks ([0, 1] scale)", "",
                "| attack | C | M | M_(d,r) |", "|---|---:|---:|---:|"]
      for r in unbounded:
        lines.append(f"| {r['attack']} | {_f(r['mean_l2_successful_c'], '.3f')} | "
                     f"{_f(r['mean_l2_successful_m'], '.3f')} | "
                     f"{_f(r['mean_l2_successful_integrated'], '.3f')} |")
  if "ablations" in results:
    tag5 = tags[0][0]
    lines += ["", "## Ablations (not in the paper), FPR 5%", "",
              "(a) the weighted-sum model of eq. (1) attacked white-box; (b) an attacker with "
              "the construction but another key, examples judged on the real M; (c) an "
              "attacker who knows the key and attacks C directly, judged on M.", "",
              "| attack | ablation | ASR on the served model (%) | detection rate (%) | "
              "overall ASR (%) |", "|---|---|---:|---:|---:|"]
    for name, rows in results["ablations"].items():
      for label, r in rows.items():
        lines.append(f"| {name} | {label} | {r['attack_success_rate']:.1f} | "
                     f"{_f(r[f'detection_rate_{tag5}'])} | {r[f'overall_asr_{tag5}']:.1f} |")
  for key, title in (("fig5", "Fig. 5: magnitudes on clean test images"),
                     ("fig7", "Fig. 7: cosine to the nearest attractor")):
    if key in results:
      body = {k: v for k, v in results[key].items() if k != "figure"}
      lines += ["", f"## {title}", "", f"![{key}]({results[key]['figure']})", "", "```",
                json.dumps(body, indent=1), "```"]
  lines += ["", f"Device: {results['device']['kind']} ({results['device']['cpu_count']} CPU "
            f"cores). Wall time of the last invocation: {results['wall_time_s']:.0f} s."]
  return "\n".join(lines) + "\n"
