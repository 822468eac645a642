r"""Host-stepped vs fused (``lax.while_loop``) attack loops on the DEEPSEC MNIST CNN.

``advtrace._src.attacks.loop.run`` drives every iterative attack either as a Python loop over a
jitted per-step function (``loop_mode="host"``) or as one jitted ``lax.while_loop``
(``"fused"``); ``"auto"`` picks host on CPU and fused on a GPU. This script is the measurement
behind that default: for PGD and CW-L2 (a gradient per step) and HopSkipJump (forward passes
only, in nested ``lax.while_loop`` searches) it reports, per mode, the compile time (first batch
minus one steady batch) and the steady-state images/s over batches 2..n, plus the time of a bare
``jax.grad`` step (one forward and backward pass of the CE loss, the lower bound of one attack
step). On XLA:CPU a gradient inside a ``lax.while_loop`` runs several times slower than the same
jitted step driven from Python, while forward passes do not slow down; so the query attacks keep
their inner searches inside ``lax.while_loop`` on every backend. On an H100 the fused loop is
the faster one (1.7x for PGD, 3x for CW-L2; ``docs/results/benchmarks.md``).

Full run, on an otherwise idle machine::

  taskset -c 0,1 python benchmarks/loop_modes.py --workdir=/tmp/loop_modes

Smoke run::

  python benchmarks/loop_modes.py --workdir=/tmp/loop_smoke --num_images=50 --batch_size=25 \
    --pgd_steps=5 --cw_steps=5 --hsj_steps=2 --label=smoke

Needs only advtrace (no torch).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from advtrace import attacks  # noqa: E402
from advtrace._src.attacks import cw as cw_lib  # noqa: E402

MODES = ("host", "fused")
ATTACKS = ("pgd", "cw", "hsj")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where results.json and results.md go.",
                               required=True)
_WEIGHTS = flags.DEFINE_string("weights", _common.default_weights(), "DEEPSEC MNIST_raw.pt.")
_DATA_DIR = flags.DEFINE_string("data_dir", _common.default_data_dir(), "tfds data dir.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 500, "Correctly classified test images.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 100, "Batch size.")
_ATTACKS = flags.DEFINE_list("attacks", list(ATTACKS), f"Subset of {', '.join(ATTACKS)}.")
_MODES = flags.DEFINE_list("modes", list(MODES), "Loop modes to compare.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 40, "PGD iterations (eps 0.3, step 0.01).")
_CW_STEPS = flags.DEFINE_integer("cw_steps", 100, "CW-L2 Adam steps (1 binary step, c 1).")
_HSJ_STEPS = flags.DEFINE_integer("hsj_steps", 10, "HopSkipJump L2 boundary-walk iterations.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Steady-state passes per mode (median taken).")
_GRAD_REPEATS = flags.DEFINE_integer("grad_repeats", 10, "Timed calls of the bare grad step.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_MODEL = flags.DEFINE_enum("model_variant", "flax", list(_common.MODEL_VARIANTS),
                           "The victim as shipped (flax) or a what-if lax variant (same weights).")
_LABEL = flags.DEFINE_string("label", "full run", "Label of the results section.")
_RESULTS_MD = flags.DEFINE_string("results_md", str(_common.RESULTS_MD),
                                  "Markdown file the table is appended to ('' to skip).")


def _attack(name: str, logits_fn, mode: str):
  if name == "pgd":
    return functools.partial(attacks.pgd, logits_fn, eps=0.3, step_size=0.01,
                             num_steps=_PGD_STEPS.value, random_start=True, loop_mode=mode)
  if name == "cw":
    fn = functools.partial(cw_lib.cw_l2, logits_fn, initial_const=1.0, kappa=0.0,
                           learning_rate=0.01, binary_search_steps=1,
                           max_iterations=_CW_STEPS.value, abort_early=False, loop_mode=mode)
    return lambda x, y, key: fn(x, y)
  if name == "hsj":
    return functools.partial(attacks.hop_skip_jump, logits_fn, norm="l2",
                             num_iterations=_HSJ_STEPS.value, loop_mode=mode)
  raise ValueError(name)


def _steps(name: str) -> int:
  return {"pgd": _PGD_STEPS, "cw": _CW_STEPS, "hsj": _HSJ_STEPS}[name].value


def bare_grad_ms(logits_fn, batch) -> float:
  """Median ms of one jitted input gradient of the summed CE loss (the per-step lower bound)."""
  x, y = jnp.asarray(batch.x), jnp.asarray(batch.y)
  grad = jax.jit(jax.grad(
      lambda x, y: optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), y).sum()))
  grad(x, y).block_until_ready()
  times = []
  for _ in range(_GRAD_REPEATS.value):
    t0 = time.perf_counter()
    grad(x, y).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main(argv):
  del argv
  for value, valid, name in ((_ATTACKS.value, ATTACKS, "attacks"), (_MODES.value, MODES, "modes")):
    if set(value) - set(valid):
      raise app.UsageError(f"unknown --{name} {sorted(set(value) - set(valid))}; "
                           f"valid: {', '.join(valid)}")
  info = _common.machine_info()
  logits_fn = _common.load_victim(_WEIGHTS.value)
  x, y, _ = _common.first_correct(logits_fn, _DATA_DIR.value, _NUM_IMAGES.value)
  if _MODEL.value != "flax":
    variant = _common.model_variant(_WEIGHTS.value, _MODEL.value)
    _common.check_variant(variant, logits_fn, x[:_BATCH_SIZE.value])
    logits_fn = variant
  batches = _common.make_batches(x, y, _BATCH_SIZE.value)
  root = jax.random.key(_SEED.value)
  keys = {id(b): jax.random.fold_in(root, i) for i, b in enumerate(batches)}
  dev = {id(b): (jnp.asarray(b.x), jnp.asarray(b.y)) for b in batches}
  grad_ms = bare_grad_ms(logits_fn, batches[0])
  logging.info("bare grad step: %.1f ms per batch of %d", grad_ms, _BATCH_SIZE.value)

  results = []
  for name in ATTACKS:
    if name not in _ATTACKS.value:
      continue
    finals = {}
    for mode in _MODES.value:
      atk = _attack(name, logits_fn, mode)

      def run_batch(b, atk=atk):
        out = jax.block_until_ready(atk(*dev[id(b)], keys[id(b)]))
        return (np.asarray(out.x_adv), np.asarray(out.info.success))

      logging.info("%s, loop_mode=%s", name, mode)
      timing, outs = _common.time_batches(run_batch, batches, _REPEATS.value)
      finals[mode] = outs
      per_step = 1e3 * timing.steady_s / (len(batches) - 1) / _steps(name)
      asr = float(np.concatenate([o[1][b.mask] for o, b in zip(outs, batches, strict=True)])
                  .mean())
      results.append({"attack": name, "steps": _steps(name), "loop_mode": mode,
                      "timing": timing.as_dict(), "ms_per_step": per_step,
                      "step_over_bare_grad": per_step / grad_ms, "asr": asr})
      logging.info("%s", results[-1])
    if len(finals) == 2:  # the two drivers must compute the same thing
      diff = max(float(np.abs(a[0] - b[0]).max())
                 for a, b in zip(finals["host"], finals["fused"], strict=True))
      for r in results[-2:]:
        r["max_abs_diff_host_vs_fused"] = diff

  out = {"machine": info, "command": _common.command_line(), "label": _LABEL.value,
         "num_images": len(x), "batch_size": _BATCH_SIZE.value, "model_variant": _MODEL.value,
         "bare_grad_ms_per_batch": grad_ms, "results": results}
  _common.write_outputs(_WORKDIR.value, out, _markdown(info, results, grad_ms, len(x)),
                        _RESULTS_MD.value)


def _markdown(info, results, grad_ms, n_images) -> str:
  header = ["Attack", "Steps", "loop_mode", "img/s", "compile s", "ms/step (batch)",
            "step / bare grad", "ASR", "max abs diff host vs fused"]
  rows = [[r["attack"], r["steps"], r["loop_mode"], r["timing"]["images_per_s"],
           r["timing"]["compile_s"], r["ms_per_step"], r["step_over_bare_grad"],
           f"{r['asr']:.1%}", r.get("max_abs_diff_host_vs_fused", "")] for r in results]
  backend = jax.default_backend().upper()
  text = [f"## Loop driver modes, DEEPSEC MNIST CNN, {backend} ({_LABEL.value})", ""]
  if not _LABEL.value.startswith("full run"):
    text += [f"> **{_LABEL.value}: not a full run of advtrace as shipped** (reduced sizes, a "
             "loaded machine or a what-if variant: see the command).", ""]
  text += [_common.machine_lines(info, _LABEL.value),
           f"- Command: `{_common.command_line()}`",
           f"- Data: first {n_images} correctly classified MNIST test images, batch size "
           f"{_BATCH_SIZE.value}; model {_MODEL.value!r}; PGD Linf eps 0.3, step 0.01, random "
           "start; CW-L2 c 1, kappa 0, lr 0.01, 1 binary step, no early abort; HopSkipJump L2 "
           "with its default queries (forward passes only)",
           f"- Bare `jax.jit(jax.grad(CE))` step: {grad_ms:.1f} ms per batch (median of "
           f"{_GRAD_REPEATS.value})",
           "- img/s: steady state over batches 2..n; compile s = first batch minus one steady "
           "batch", "",
           _common.markdown_table(header, rows), ""]
  return "\n".join(text)


if __name__ == "__main__":
  app.run(main)
