r"""One two-thread process against two single-thread processes side by side, on 2 CPU cores.

Long reproduction runs (CW2, EAD, OM, SPSA at Table VII settings) are throughput-bound on a
2-core machine. This script measures whether two independent runs, each pinned to one core with
a single XLA thread, get more done than one run that uses both cores. It times the attack
step's primitive (one forward and backward pass of the CE loss on the DEEPSEC MNIST CNN, then a
clipped update, as in every gradient attack) at one batch size, in three child processes:

1. one process on cores 0 and 1 with XLA's default thread pool;
2. one process on core 0 with one XLA thread, alone;
3. two processes as in 2, on cores 0 and 1 at the same time.

It reports ms per step and the total images per second; the ratio of 3 to 1 is the gain of
running two attacks side by side. Run it on an otherwise idle machine::

  python benchmarks/parallel_streams.py --workdir=/tmp/parallel_streams

Needs only advtrace (no torch) and ``taskset``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from advtrace._src import xla  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Where results.json and results.md go.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps (after one compile step).")
_WEIGHTS = flags.DEFINE_string("weights", _common.default_weights(), "MNIST_raw.pt.")
_DATA_DIR = flags.DEFINE_string("data_dir", _common.default_data_dir(), "tfds data dir.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: time the step and print one JSON line.")
_RESULTS_MD = flags.DEFINE_string(
    "results_md", str(_common.REPO_ROOT / "docs" / "results" / "benchmarks.md"),
    "Markdown file the section is appended to ('' to skip).")

_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _time_steps() -> dict[str, float]:
  logits_fn = _common.load_victim(_WEIGHTS.value)
  x, y, _ = _common.first_correct(logits_fn, _DATA_DIR.value, _BATCH.value)
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss(v):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(v), y).sum()

  step = xla.jit(lambda v: jnp.clip(v + 1e-4 * jnp.sign(jax.grad(loss)(v)), 0.0, 1.0))
  step(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    x = step(x)
  x.block_until_ready()
  return {"ms_per_step": 1e3 * (time.perf_counter() - start) / _STEPS.value}


def _child(cores: str, one_thread: bool) -> subprocess.Popen:
  env = dict(os.environ)
  if one_thread:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_ONE_THREAD}".strip()
  argv = ["taskset", "-c", cores, sys.executable, os.path.abspath(__file__), "--worker",
          f"--batch_size={_BATCH.value}", f"--steps={_STEPS.value}",
          f"--weights={_WEIGHTS.value}", f"--data_dir={_DATA_DIR.value}"]
  return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)


def _collect(children: list[subprocess.Popen]) -> list[float]:
  times = []
  for child in children:
    out, _ = child.communicate()
    if child.returncode:
      raise RuntimeError(f"benchmark child {child.args} failed with exit code {child.returncode}")
    times.append(json.loads(out.strip().splitlines()[-1])["ms_per_step"])
  return times


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_time_steps()), flush=True)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  info = _common.machine_info()
  batch = _BATCH.value
  configs = [("one process, 2 cores, XLA default threads", [("0,1", False)]),
             ("one process, core 0, 1 XLA thread", [("0", True)]),
             ("two processes, cores 0 and 1, 1 XLA thread each", [("0", True), ("1", True)])]
  rows, results = [], {}
  for name, spec in configs:
    times = _collect([_child(cores, one) for cores, one in spec])
    images_per_s = sum(1e3 * batch / t for t in times)
    results[name] = {"ms_per_step": times, "images_per_s": images_per_s}
    rows.append([name, " / ".join(f"{t:.1f}" for t in times), f"{images_per_s:.0f}"])
  base = results[configs[0][0]]["images_per_s"]
  gain = results[configs[2][0]]["images_per_s"] / base
  results.update(batch_size=batch, steps=_STEPS.value, gain_two_streams=gain, machine=info)
  table = _common.markdown_table(["setting", "ms per step", "images/s (total)"], rows)
  section = (f"## Two single-thread runs side by side vs one two-thread run (batch {batch})\n\n"
             f"{_common.machine_lines(info, 'parallel streams')}\n"
             f"- Command: `{_common.command_line()}`\n\n{table}\n\n"
             f"Two single-thread processes do **{gain:.2f}x** the work of one two-thread "
             "process.\n")
  _common.write_outputs(_WORKDIR.value, results, section, _RESULTS_MD.value)


if __name__ == "__main__":
  app.run(main)
