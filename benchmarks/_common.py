"""Shared pieces of the benchmark scripts: victim model, data, timing, machine info, outputs.

Timing follows ``shared/notes/conventions.md`` section 2.10: the first batch (compile plus
warm-up) is timed on its own and excluded from the steady-state throughput; every batch has the
same padded shape, so nothing retraces after the first; peers run in the same process on the
same weights and data.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace import data as adv_data
from advtrace import models as adv_models
from advtrace._src import atomic
from advtrace._src import batching

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO_ROOT / "docs" / "results" / "benchmarks.md"


def default_weights() -> str:
  return str(REPO_ROOT.parent / "shared" / "weights" / "deepsec" / "MNIST_raw.pt")


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "tensorflow_datasets")


def load_victim(weights: str) -> adv_models.LogitsFn:
  """The DEEPSEC MNIST CNN with the released weights, as an advtrace ``logits_fn``."""
  name, variables = adv_models.load_deepsec(weights)
  if name != "deepsec_mnist":
    raise ValueError(f"{weights} holds {name} weights; these benchmarks need MNIST_raw.pt.")
  return adv_models.logits_fn(adv_models.get_model(name), variables)


def first_correct(logits_fn, data_dir: str, number: int, batch_size: int = 500):
  """The first ``number`` MNIST test images (in tfds order) the model classifies correctly."""
  ds = adv_data.load("mnist", "test", data_dir)
  logits = batching.map_batched(jax.jit(logits_fn), ds.images, batch_size)
  correct = np.flatnonzero(np.argmax(logits, axis=-1) == ds.labels)
  if number > len(correct):
    raise ValueError(f"asked for {number} images, only {len(correct)} are classified correctly")
  idx = correct[:number]
  return ds.images[idx], ds.labels[idx].astype(np.int32), float(len(correct) / len(ds.labels))


def make_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[batching.Batch]:
  """Fixed-shape batches (the last padded with repeats of a real row); at least two of them."""
  batches = list(batching.padded_batches(x, y, batch_size))
  if len(batches) < 2:
    raise ValueError(f"need at least 2 batches to separate compile time from throughput; got "
                     f"{len(x)} images with batch_size {batch_size}: lower --batch_size or raise "
                     "--num_images.")
  return batches


class Timing(NamedTuple):
  """Wall-clock of one framework on one attack."""
  first_batch_s: float  # compile (JAX) or warm-up (torch) plus one batch
  steady_s: float  # median over repeats of the time for batches 2..n
  steady_all_s: list[float]  # every repeat
  steady_images: int  # real (unpadded) images in batches 2..n
  images_per_s: float
  compile_s: float  # first_batch_s minus one steady-state batch

  def as_dict(self) -> dict[str, Any]:
    return self._asdict()


def time_batches(run_batch: Callable[[batching.Batch], Any], batches: Sequence[batching.Batch],
                 repeats: int = 1) -> tuple[Timing, list[Any]]:
  """Times ``run_batch`` (which must return synced, host-side results) over ``batches``.

  Returns the timing and the per-batch results of the first pass.
  """
  t0 = time.perf_counter()
  outs = [run_batch(batches[0])]
  first = time.perf_counter() - t0
  steady_all = []
  for r in range(repeats):
    t0 = time.perf_counter()
    for b in batches[1:]:
      out = run_batch(b)
      if r == 0:
        outs.append(out)
    steady_all.append(time.perf_counter() - t0)
  steady = statistics.median(steady_all)
  images = int(sum(int(b.mask.sum()) for b in batches[1:]))
  per_batch = steady / (len(batches) - 1)
  timing = Timing(first, steady, steady_all, images, images / steady, max(first - per_batch, 0.0))
  return timing, outs


def machine_info() -> dict[str, Any]:
  """CPU model, visible cores, load average and library versions, for the results table."""
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  info = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "cpu": cpu,
      "cores_usable": usable,
      "cores_total": os.cpu_count(),
      "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "jax_device": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
  }
  return info


def command_line() -> str:
  return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])




def write_text(path: str | os.PathLike, text: str) -> None:
  atomic.write_text(Path(path), text.rstrip("\n") + "\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic.write_text(Path(path), json.dumps(obj, indent=2, default=float) + "\n")


def append_markdown(path: str | os.PathLike, section: str) -> None:
  """Appends ``section`` to the Markdown file at ``path`` (atomic rewrite)."""
  path = Path(path)
  old = path.read_text() if path.exists() else "# Benchmarks\n"
  atomic.write_text(path, old.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")


def write_outputs(workdir: str | os.PathLike, results: Any, markdown: str,
                  results_md: str | os.PathLike | None) -> None:
  """Writes ``results.json`` and ``results.md`` into ``workdir``, appends the Markdown section to
  ``results_md`` (unless empty) and prints it."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_json(workdir / "results.json", results)
  write_text(workdir / "results.md", markdown)
  if results_md:
    append_markdown(results_md, markdown)
  print(markdown)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def machine_lines(info: dict[str, Any], label: str) -> str:
  return (f"- Label: **{label}**\n"
          f"- Date: {info['date']}\n"
          f"- Machine: {info['cpu']}, {info['cores_usable']} usable of {info['cores_total']} "
          f"cores, load average {info['loadavg_1_5_15']} at start\n"
          + (f"- Accelerator: {info['jax_device']}\n" if info["jax_backend"] != "cpu" else "")
          + f"- Software: Python {info['python']}, jax {info['jax']} ({info['jax_backend']})"
          + (f", torch {info['torch']} ({info.get('torch_device', 'cpu')}), torchattacks "
             f"{info['torchattacks']}"
             if "torch" in info else "")
          + (f", XLA_FLAGS={info['xla_flags']!r}" if info["xla_flags"] else "")
          + (f", OMP_WAIT_POLICY={info['omp_wait_policy']}" if info["omp_wait_policy"] else ""))


# ---------------------------------------------------------------------------------------------
# What-if variants of the DEEPSEC MNIST CNN, for the speed investigation only. Same weights and
# the same function as ``advtrace.models`` (checked by ``check_variant``); they differ only in
# how XLA:CPU gets to run the gradient.

_DN = ("NHWC", "HWIO", "NHWC")


def _conv_valid(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DN)


@jax.custom_vjp
def _conv_valid_explicit_vjp(x, w):
  return _conv_valid(x, w)


def _conv_fwd(x, w):
  return _conv_valid(x, w), (x, w)


def _conv_bwd(res, g):
  # The input gradient as a plain HWIO convolution with an explicitly flipped and transposed
  # kernel. JAX's own transpose rule swaps the kernel's feature dims instead (dim_labels
  # 01oi), which XLA:CPU runs on a slow path inside a while loop (see benchmarks/README.md).
  x, w = res
  kh, kw = w.shape[0] - 1, w.shape[1] - 1
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  gx = jax.lax.conv_general_dilated(g, w_t, (1, 1), ((kh, kh), (kw, kw)), dimension_numbers=_DN)
  gw = jax.vjp(lambda w: _conv_valid(x, w), w)[1](g)[0]
  return gx, gw


_conv_valid_explicit_vjp.defvjp(_conv_fwd, _conv_bwd)


def _pool_reduce_window(h):
  return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _pool_reshape(h):
  # Non-overlapping 2x2 windows on even sizes as a reshape: the gradient is a one-hot select
  # instead of reduce_window's index-tracking VJP. The one-hot is the first maximum in row-major
  # window order, as in PyTorch and reduce_window; a plain ``max`` would split the gradient over
  # ties, which are common here (uniform MNIST background gives equal post-ReLU values).
  n, hh, ww, c = h.shape
  win = h.reshape(n, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  win = win.reshape(n, hh // 2, ww // 2, c, 4)
  first_max = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(win), axis=-1), 4, dtype=h.dtype)
  return jnp.sum(win * first_max, axis=-1)


MODEL_VARIANTS = ("flax", "lax", "lax_reshape_pool", "lax_explicit_conv_vjp",
                  "lax_reshape_pool_explicit_conv_vjp")


def model_variant(weights: str, variant: str) -> adv_models.LogitsFn:
  """The DEEPSEC MNIST CNN as shipped (``flax``) or as a pure-lax what-if variant."""
  if variant == "flax":
    return load_victim(weights)
  if variant not in MODEL_VARIANTS:
    raise ValueError(f"unknown model variant {variant!r}; valid: {', '.join(MODEL_VARIANTS)}")
  _, variables = adv_models.load_deepsec(weights)
  p = jax.tree.map(jnp.asarray, variables["params"])
  conv = _conv_valid_explicit_vjp if "explicit_conv_vjp" in variant else _conv_valid
  pool = _pool_reshape if "reshape_pool" in variant else _pool_reduce_window

  def logits_fn(x):
    h = x
    for block in ("conv32", "conv64"):
      for layer in ("conv_0", "conv_2"):
        h = jax.nn.relu(conv(h, p[block][layer]["kernel"]) + p[block][layer]["bias"])
      h = pool(h)
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # NCHW flatten, as DEEPSEC
    h = jax.nn.relu(h @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    h = jax.nn.relu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    z = h @ p["fc3"]["kernel"] + p["fc3"]["bias"]
    return z - jnp.max(z, axis=-1, keepdims=True)

  return logits_fn


def check_variant(logits_fn, reference, x: np.ndarray, atol: float = 1e-4) -> float:
  """Max abs difference of logits and CE input-gradients between a variant and the reference."""
  import optax  # pylint: disable=g-import-not-at-top

  y = jnp.zeros((x.shape[0],), jnp.int32)

  def grad(f):
    return jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(f(x), y).sum())

  x = jnp.asarray(x)
  diff = max(float(jnp.abs(jax.jit(logits_fn)(x) - jax.jit(reference)(x)).max()),
             float(jnp.abs(jax.jit(grad(logits_fn))(x) - jax.jit(grad(reference))(x)).max()))
  if diff > atol:
    raise AssertionError(f"model variant differs from advtrace's model by {diff} > {atol}")
  return diff
