"""D1/D3/D5 decision sweep: attacks on M for several QIM settings (the first N candidates).

  TFDS_DATA_DIR=../shared/tensorflow_datasets python docs/results/attractors_decision_sweep.py \
      100 '[{"steps":[128,3],"weights":[0.8,0.2],"a2":0.3,"toward":true}]' deepfool,bim,fgsm

Prints one JSON line per (variant, attack): clean accuracy of M (first 2,000 test images), ASR
on M, TPR at 5% FPR (thresholds from 3,000 images of DEEPSEC's validation split), recovery by
argmin W (and, for comparison, argmax W) among detected examples, and the number of changed
pixels of each successful example. One fixed evaluation key
(seed 12345) for every variant. Output of the runs: attractors_decision_sweep.jsonl.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import attractors as at
from advtrace._src import batching
from advtrace._src import data
from advtrace._src import qim
from advtrace._src import xla
from advtrace._src.attacks import runner


def main(n: int, variants: list[dict], attacks: list[str]) -> None:
  config = runner.default_config()
  config.data_dir = "../shared/tensorflow_datasets"
  config.n_examples = n
  ctx = runner.load_context(config)
  ds = ctx.dataset
  idx, pool_targets = runner.candidates(config, ctx)
  x, y = ds.images[idx], ds.labels[idx]
  _, val = data.deepsec_split(data.load("mnist", "train", config.data_dir), 0.1, 100)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(n))
  for v in variants:
    cfg = qim.QIMConfig(tuple(v["steps"]), tuple(v["weights"]), v["a2"], v["toward"],
                        v.get("in_range", False))
    secret = qim.new_secret_key(jax.random.key(12345), 10, (28, 28, 1), cfg)
    decoder = xla.jit(at.decoder_fn(secret, cfg))
    cal = at.calibrate(batching.map_batched(decoder, val.images[:3000], 500), 0.05)
    m = at.attractor_logits_fn(ctx.logits_fn, secret, cfg)
    m_test = batching.map_batched(xla.jit(m), ds.images, 500)
    acc = float(np.mean(np.argmax(m_test[:2000], -1) == ds.labels[:2000]))
    for name in attacks:
      spec, kwargs = runner.resolve_attack(name, "table7_mnist")
      call = runner._call_kwargs(spec.fn, spec, runner._split_kwargs(spec.fn, kwargs), "auto")
      target = runner._targets(spec, ctx._replace(target_logits=m_test), idx, pool_targets, y)
      t0 = time.time()
      res = spec.fn(m, x, target, keys, **call)
      success = np.asarray(res.info.success)
      w = np.asarray(decoder(res.x_adv))
      flagged = np.asarray(at.detect(w, cal)[0])
      by_min, by_max = np.argmin(w, -1) == y, np.argmax(w, -1) == y
      hit = success & flagged
      l0 = np.sum(np.abs(np.asarray(res.x_adv) - x) > 1e-6, axis=(1, 2, 3))
      print(json.dumps(dict(
          variant=v, attack=name, n=n, acc_m=acc, asr_m=100 * success.mean(),
          tpr=100 * hit.sum() / max(success.sum(), 1), flagged_all=100 * flagged.mean(),
          rec_argmin=100 * by_min[hit].mean() if hit.any() else None,
          rec_argmin_all_flagged=100 * by_min[flagged].mean() if flagged.any() else None,
          rec_argmax_all_flagged=100 * by_max[flagged].mean() if flagged.any() else None,
          l0_successes=sorted(int(v) for v in l0[success]), secs=time.time() - t0)), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3].split(","))
