"""Why OptMargin (OM) gets past W on MNIST: four measurements on the experiment's own OM run.

  TFDS_DATA_DIR=../shared/tensorflow_datasets PYTHONPATH=. \
      python docs/results/attractors_om_diagnosis.py [max_rerun]

Reads the workdirs of the documented commands (`workdirs/attractors_mnist`, its key, and
`workdirs/reproduce_deepsec_mnist` for OM on C, if that has run). While OM on M is still
running, its finished batches are read from the run's shared pool. Prints one JSON object:

1. ``outputs``: OM's examples on M, how many fool C itself, how many are flagged, and the
   median statistics of W (max, min, SD) on the undetected ones; beside them the same
   statistics' 1st/50th/99th percentiles on the clean test images.
2. ``gradients``: the gradient of OM's loss (the margin of log M summed over the 20 copies
   x + u_j), split into the path through W (C held fixed) and through C (W held fixed): the
   norm of the sum over copies and its coherence ||sum_j g_j|| / sum_j ||g_j||, at the clean
   candidates and at OM's successful outputs; and the coherence of the gradient of w_y (the
   true class's correlation) for each QIM step alone. The offsets come from a fixed key
   (``SEED``), not the run's.
3. ``without_offsets``: OM rerun on M on its successful examples (at most ``max_rerun``,
   default 16) with ``noise_count=1``, i.e. without the 19 noisy copies, the other Table VII
   settings unchanged. This is the causal test: the same optimiser without the copies.
4. ``om_on_c``: OM's outputs on C (the key-known attacker of ablation (c)) judged on M.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import atomic
from advtrace._src import attractor_experiment
from advtrace._src import attractors
from advtrace._src import qim
from advtrace._src import work_pool
from advtrace._src.attacks import losses
from advtrace._src.attacks import optmargin
from advtrace._src.attacks import runner
from advtrace._src.attacks import settings
from experiments.configs import attractors_mnist

WORKDIR = "workdirs/attractors_mnist"
VICTIM = "workdirs/reproduce_deepsec_mnist"
OM_SETTINGS = settings.get_settings("table7_mnist", "om")
NOISE_COUNT = OM_SETTINGS["noise_count"]
W_STATISTICS = ("max_w", "min_w", "std_w")
SEED = 12345  # the offsets and OM keys of this script, not the run's


def _om_on_m(n):
  folder = os.path.join(WORKDIR, "attractor", "om")
  path = os.path.join(folder, "adversarial.npz")
  if os.path.exists(path):
    saved = atomic.read_npz(path)
    return saved["x_adv"], saved["success"].astype(bool), np.arange(len(saved["y"]))
  done = work_pool.WorkPool(folder, n, 1).gather(("x_adv", "success", "positions"))
  return done["x_adv"], done["success"].astype(bool), done["positions"]


def _outputs(setup, x_adv, success, y):
  w = setup.decoder(x_adv[success])
  stats = np.asarray(attractors.w_statistics(w))
  flagged = np.asarray(attractors.detect(w, setup.cals[0])[0])
  fools_c = np.argmax(np.asarray(setup.classifier(x_adv[success])), -1) != y[success]
  undetected = (dict(zip(W_STATISTICS, np.median(stats[~flagged], 0).tolist(), strict=True))
                if (~flagged).any() else None)
  return {
      "n_examples": int(len(success)), "n_adversarial_on_m": int(success.sum()),
      "n_flagged_at_5pct": int(flagged.sum()), "n_fooling_c_itself": int(fools_c.sum()),
      "w_statistics_undetected_median": undetected}


def _clean_percentiles(setup):
  clean = np.percentile(np.asarray(attractors.w_statistics(setup.w_test)), [1, 50, 99], axis=0)
  return {k: clean[:, i].tolist() for i, k in enumerate(W_STATISTICS)}


def _gradient_split(setup, x, y):
  messages, cfg, classifier = setup.secret.messages, setup.cfg, setup.classifier

  def loss(z, label, path):
    c = jax.nn.softmax(classifier(z[None]), -1)[0]
    w = qim.decode(z[None], messages, cfg)[0]
    c = jax.lax.stop_gradient(c) if path == "W" else c
    w = jax.lax.stop_gradient(w) if path == "C" else w
    return losses.margin(attractors.combine(c, w), label, False)

  def coherence(g):
    g = g.reshape(NOISE_COUNT, -1)
    return jnp.linalg.norm(g.sum(0)) / jnp.maximum(jnp.linalg.norm(g, axis=1).sum(), 1e-30)

  @jax.jit
  def one(xi, yi, key):
    offsets = optmargin.noise_vectors(key, xi.shape, NOISE_COUNT, OM_SETTINGS["noise_mag"])
    copies = jnp.clip(xi[None] + offsets, 0, 1)
    out = {}
    for path in ("W", "C"):
      g = jax.vmap(jax.grad(loss), (0, None, None))(copies, yi, path)
      out[f"{path}_sum_norm"] = jnp.linalg.norm(g.sum(0))
      out[f"{path}_coherence"] = coherence(g)
    for s, step in enumerate(cfg.steps):  # w_y of one lattice alone
      one_scale = cfg._replace(steps=(step,), scale_weights=(1.0,))
      w_y = lambda z, s=s, c=one_scale: qim.decode(z[None], messages[:, s:s + 1], c)[0, yi]
      out[f"w_y_step{step:g}_coherence"] = coherence(jax.vmap(jax.grad(w_y))(copies))
    return out

  keys = jax.random.split(jax.random.key(SEED), len(y))
  rows = [one(x[i], y[i], keys[i]) for i in range(len(y))]
  return {k: float(np.median([float(r[k]) for r in rows])) for k in rows[0]}


def _without_offsets(setup, x, y):
  kwargs = {**OM_SETTINGS, "noise_count": 1}
  keys = jax.random.split(jax.random.key(SEED), len(y))
  x_adv = np.asarray(optmargin.optmargin(setup.m_logits, x, y, keys, **kwargs).x_adv)
  success = setup.predictions(x_adv) != y
  return _outputs(setup, x_adv, success, y) | {"settings": kwargs}


def _om_on_c(setup, adv):
  fools_m = adv["success"].astype(bool) & (setup.predictions(adv["x_adv"]) != adv["y"])
  flagged = np.asarray(attractors.detect(setup.decoder(adv["x_adv"]), setup.cals[0])[0])
  return {"n_examples": int(len(fools_m)), "n_fooling_m": int(fools_m.sum()),
          "n_flagged_at_5pct_among_those": int((flagged & fools_m).sum())}


def _candidates(setup, config):
  """OM's candidates (images, labels), as the runner draws them."""
  indices, _ = runner.candidates(runner.attack_config(config, "om"), setup.context)
  ds = setup.context.dataset
  return ds.images[indices], ds.labels[indices]


def main(max_rerun: int) -> None:
  config = attractors_mnist.get_config()
  config.data_dir = os.environ.get("TFDS_DATA_DIR", "../shared/tensorflow_datasets")
  config.victim_workdir = VICTIM
  setup = attractor_experiment._Setup(config, WORKDIR)
  x_all, y_all = _candidates(setup, config)
  x_adv, success, positions = _om_on_m(len(y_all))
  x, y = x_all[positions], y_all[positions]
  on_c = os.path.join(VICTIM, "om", "adversarial.npz")
  rerun = np.flatnonzero(success)[:max_rerun]
  disagreeing = int(np.sum((setup.predictions(x_adv) != y) != success))
  print(json.dumps({
      "saved_success_flags_disagreeing_with_m": disagreeing,
      "w_statistics_clean_test_p1_p50_p99": _clean_percentiles(setup),
      "outputs": _outputs(setup, x_adv, success, y),
      "gradients": {"at_clean_candidates": _gradient_split(setup, x, y),
                    "at_successful_outputs": _gradient_split(setup, x_adv[success], y[success])},
      "without_offsets": _without_offsets(setup, x[rerun], y[rerun]),
      "om_on_c": (_om_on_c(setup, atomic.read_npz(on_c)) if os.path.exists(on_c)
                  else f"not measured: {on_c} does not exist yet")}, indent=1))


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
