r"""What the host loop's gathering of active examples saves on OptMargin (DEEPSEC MNIST CNN, CPU).

OptMargin evaluates 20 noisy copies per example and step, and with early abort the examples of
a batch finish their rounds at different steps. The host loop (``advtrace._src.attacks.loop``)
gathers the examples still running into a smaller batch; buckets hold at least
``_MIN_BUCKET_ROWS`` model inputs, so one OptMargin example (20 inputs) is a bucket of its own.
This script runs the same OptMargin call on one batch with and without gathering (the latter by
raising ``_MIN_BUCKET_ROWS`` past the batch) and reports the wall time of each, the iterations,
and how far the outputs differ. A third run attacks each example on its own, to show how far
the batch shape alone moves an example's trajectory (float rounding differs per shape, and
early abort turns a rounding difference into a different stopping step). First it times one
step per batch size (1, 2, 4, ... examples), which shows whether a smaller batch is cheaper::

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c 1 python benchmarks/gathering.py --workdir=/tmp/gathering

Needs only advtrace (no torch). The step timing compiles the step for every batch shape the
runs use, so their wall times leave that compile out.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from advtrace import attacks  # noqa: E402
from advtrace._src.attacks import base  # noqa: E402
from advtrace._src.attacks import loop  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Where results.json and results.md go.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 5, "Correctly classified test images (one batch).")
_ITERATIONS = flags.DEFINE_integer("max_iterations", 400, "Adam steps per round (Table VII 10000).")
_ROUNDS = flags.DEFINE_integer("binary_search_steps", 3, "Rounds of the search (Table VII: 4).")
_WEIGHTS = flags.DEFINE_string("weights", _common.default_weights(), "MNIST_raw.pt.")
_DATA_DIR = flags.DEFINE_string("data_dir", _common.default_data_dir(), "tfds data dir.")
_LABEL = flags.DEFINE_string("label", "OptMargin, one pinned core", "Label of the section.")
_RESULTS_MD = flags.DEFINE_string("results_md", str(_common.RESULTS_MD),
                                  "Markdown file the section is appended to ('' to skip).")


def _run(logits_fn, x, y, keys, min_bucket_rows: int):
  saved = loop._MIN_BUCKET_ROWS  # pylint: disable=protected-access
  loop._MIN_BUCKET_ROWS = min_bucket_rows  # pylint: disable=protected-access
  try:
    t0 = time.perf_counter()
    out = attacks.optmargin(logits_fn, x, y, keys, max_iterations=_ITERATIONS.value,
                            binary_search_steps=_ROUNDS.value, loop_mode="host")
    x_adv = np.asarray(out.x_adv)
    return time.perf_counter() - t0, x_adv, jax.tree.map(np.asarray, out.info)
  finally:
    loop._MIN_BUCKET_ROWS = saved  # pylint: disable=protected-access


def _step_ms(logits_fn, x, y, keys, steps: int = 150) -> float:
  """Milliseconds per step of one OptMargin round without early abort (compile excluded)."""
  kwargs = dict(binary_search_steps=1, abort_early=False, loop_mode="host")
  attacks.optmargin(logits_fn, x, y, keys, max_iterations=2, **kwargs).x_adv.block_until_ready()
  t0 = time.perf_counter()
  attacks.optmargin(logits_fn, x, y, keys, max_iterations=steps, **kwargs
                    ).x_adv.block_until_ready()
  return 1e3 * (time.perf_counter() - t0) / steps


def main(argv):
  del argv
  info = _common.machine_info()
  logits_fn = _common.load_victim(_WEIGHTS.value)
  x, y, _ = _common.first_correct(logits_fn, _DATA_DIR.value, _NUM_IMAGES.value)
  n = len(y)
  keys = base.example_keys(jax.random.key(0), n)  # as in a batched call, so alone runs match
  sizes = sorted({2**k for k in range(n.bit_length()) if 2**k < n} | {n})
  step_ms = {b: _step_ms(logits_fn, x[:b], y[:b], keys[:b]) for b in sizes}
  never = 10**9
  runs = {"no gathering": _run(logits_fn, x, y, keys, never),
          "gathering": _run(logits_fn, x, y, keys, loop._MIN_BUCKET_ROWS)}  # pylint: disable=protected-access
  alone = [_run(logits_fn, x[i:i + 1], y[i:i + 1], keys[i:i + 1], never) for i in range(n)]
  runs["each example alone"] = (sum(r[0] for r in alone),
                                np.concatenate([r[1] for r in alone]),
                                jax.tree.map(lambda *v: np.concatenate(v), *[r[2] for r in alone]))
  ref_x, ref_info = runs["no gathering"][1], runs["no gathering"][2]
  results = {"machine": info, "command": _common.command_line(), "num_images": n,
             "max_iterations": _ITERATIONS.value, "binary_search_steps": _ROUNDS.value,
             "step_ms_by_batch": step_ms, "runs": {}}
  rows = []
  for name, (seconds, x_adv, out) in runs.items():
    diff = float(np.abs(x_adv - ref_x).max())
    same_iters = int(np.sum(out.iterations == ref_info.iterations))
    results["runs"][name] = {"seconds": seconds, "iterations": out.iterations.tolist(),
                             "success": out.success.tolist(), "l2": out.l2.tolist(),
                             "max_abs_diff_vs_no_gathering": diff,
                             "same_iterations_as_no_gathering": same_iters}
    rows.append([name, seconds, " ".join(str(int(i)) for i in out.iterations),
                 f"{100 * out.success.mean():.0f}%", float(out.l2[out.success].mean()),
                 f"{same_iters}/{n}", diff])
  step_table = _common.markdown_table(
      ["examples in the batch", "ms per step", "ms per example and step"],
      [[b, ms, ms / b] for b, ms in step_ms.items()])
  table = _common.markdown_table(
      ["run", "wall s (step already compiled)", "iterations per example", "ASR", "mean L2",
       "same iterations as no gathering", "max abs diff of x_adv vs no gathering"], rows)
  section = (f"## Host-loop gathering on OptMargin, DEEPSEC MNIST CNN, CPU ({_LABEL.value})\n\n"
             + _common.machine_lines(info, _LABEL.value) + "\n"
             + f"- Command: `{results['command']}`\n"
             + f"- Data: first {n} correctly classified MNIST test images, one batch; OptMargin "
             f"Table VII settings but {_ROUNDS.value} rounds of at most {_ITERATIONS.value} "
             "steps (early abort every tenth of that)\n\n" + step_table + "\n\n" + table)
  _common.write_outputs(_WORKDIR.value, results, section, _RESULTS_MD.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
