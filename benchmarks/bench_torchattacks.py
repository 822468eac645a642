r"""advtrace vs torchattacks on the DEEPSEC MNIST CNN: throughput, compile time and sanity ASR.

Both libraries run in this one process, on the same device (CPU; or a GPU: JAX's default
backend and ``--torch_device=cuda``), on the same released weights
(``MNIST_raw.pt``: ``advtrace.models.load_deepsec`` and ``torch.load(weights_only=True)``), the
same images (the first ``--num_images`` correctly classified MNIST test images) and the same
padded batches of ``--batch_size``. For every attack the first batch is timed alone (JAX compile,
torch warm-up) and left out of the steady-state images/s; every later batch has the same shape,
so nothing retraces.

Full run (the numbers in ``docs/results/benchmarks.md``), on an otherwise idle machine::

  taskset -c 0,1 python benchmarks/bench_torchattacks.py --workdir=/tmp/bench_torchattacks

Smoke run (a minute on a busy machine)::

  python benchmarks/bench_torchattacks.py --workdir=/tmp/bench_smoke --num_images=50 \
    --batch_size=25 --pgd_steps=5 --bim_steps=5 --cw_steps=5 --deepfool_steps=5 \
    --grad_repeats=3 --label=smoke

Needs the ``bench`` extra (``pip install torch==2.13.0`` and ``pip install --no-deps
torchattacks``; see ``benchmarks/README.md``).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

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
from advtrace._src.attacks import base  # noqa: E402
from advtrace._src.attacks import cw as cw_lib  # noqa: E402
from advtrace._src.attacks import deepfool as deepfool_lib  # noqa: E402

ATTACKS = ("grad", "pgd", "bim", "cw", "deepfool")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where results.json and results.md go.",
                               required=True)
_WEIGHTS = flags.DEFINE_string("weights", _common.default_weights(), "DEEPSEC MNIST_raw.pt.")
_DATA_DIR = flags.DEFINE_string("data_dir", _common.default_data_dir(), "tfds data dir.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1000, "Correctly classified test images.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 100, "Batch size, equal for both libraries.")
_ATTACKS = flags.DEFINE_list("attacks", list(ATTACKS), f"Subset of {', '.join(ATTACKS)}.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                                  "Where torch runs. advtrace runs on JAX's default backend, so "
                                  "use cuda when JAX has a GPU (the side-by-side GPU numbers).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Steady-state passes per attack (median taken).")
_LOOP_MODE = flags.DEFINE_enum("loop_mode", "auto", ["auto", "host", "fused"],
                               "advtrace loop driver.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for both libraries' random starts.")
_MODEL = flags.DEFINE_enum("model_variant", "flax", list(_common.MODEL_VARIANTS),
                           "advtrace's victim as shipped (flax) or a what-if lax variant with the "
                           "same weights and outputs (speed investigation only).")
_LABEL = flags.DEFINE_string("label", "full run", "Label of the results section.")
_RESULTS_MD = flags.DEFINE_string("results_md", str(_common.RESULTS_MD),
                                  "Markdown file the table is appended to ('' to skip).")

_EPS = flags.DEFINE_float("eps", 0.3, "Linf radius for PGD and BIM.")
_PGD_STEP = flags.DEFINE_float("pgd_step_size", 0.01, "PGD step size.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 40, "PGD iterations.")
_BIM_STEP = flags.DEFINE_float("bim_step_size", 0.01, "BIM step size.")
_BIM_STEPS = flags.DEFINE_integer("bim_steps", 40, "BIM iterations.")
_CW_C = flags.DEFINE_float("cw_c", 1.0, "CW constant c (one value: torchattacks has no search).")
_CW_KAPPA = flags.DEFINE_float("cw_kappa", 0.0, "CW confidence kappa.")
_CW_LR = flags.DEFINE_float("cw_lr", 0.01, "CW Adam learning rate.")
_CW_STEPS = flags.DEFINE_integer("cw_steps", 100, "CW Adam steps.")
_DF_STEPS = flags.DEFINE_integer("deepfool_steps", 50, "DeepFool maximum iterations.")
_DF_OVERSHOOT = flags.DEFINE_float("deepfool_overshoot", 0.02, "DeepFool overshoot.")
_GRAD_REPEATS = flags.DEFINE_integer("grad_repeats", 20,
                                     "Timed calls of the fwd+bwd micro-benchmark.")


# ---------------------------------------------------------------------------------------------
# The attacks, one advtrace call and one torchattacks call each, with identical settings.


def _advtrace_attack(name: str, logits_fn) -> Callable:
  if name == "pgd":
    return functools.partial(attacks.pgd, logits_fn, eps=_EPS.value, step_size=_PGD_STEP.value,
                             num_steps=_PGD_STEPS.value, random_start=True,
                             loop_mode=_LOOP_MODE.value)
  if name == "bim":
    return functools.partial(attacks.bim, logits_fn, eps=_EPS.value, step_size=_BIM_STEP.value,
                             num_steps=_BIM_STEPS.value, loop_mode=_LOOP_MODE.value)
  if name == "cw":
    return functools.partial(cw_lib.cw_l2, logits_fn, initial_const=_CW_C.value,
                             kappa=_CW_KAPPA.value, learning_rate=_CW_LR.value,
                             binary_search_steps=1, max_iterations=_CW_STEPS.value,
                             abort_early=False, loop_mode=_LOOP_MODE.value)
  if name == "deepfool":
    return functools.partial(deepfool_lib.deepfool, logits_fn, norm="l2",
                             overshoot=_DF_OVERSHOOT.value, max_iter=_DF_STEPS.value,
                             loop_mode=_LOOP_MODE.value)
  raise ValueError(name)


def _torch_attack(name: str, model):
  import torchattacks  # pylint: disable=g-import-not-at-top

  if name == "pgd":
    return torchattacks.PGD(model, eps=_EPS.value, alpha=_PGD_STEP.value, steps=_PGD_STEPS.value,
                            random_start=True)
  if name == "bim":
    return torchattacks.BIM(model, eps=_EPS.value, alpha=_BIM_STEP.value, steps=_BIM_STEPS.value)
  if name == "cw":
    return torchattacks.CW(model, c=_CW_C.value, kappa=_CW_KAPPA.value, steps=_CW_STEPS.value,
                           lr=_CW_LR.value)
  if name == "deepfool":
    return torchattacks.DeepFool(model, steps=_DF_STEPS.value, overshoot=_DF_OVERSHOOT.value)
  raise ValueError(name)


def _settings(name: str) -> str:
  if name == "pgd":
    return (f"Linf eps {_EPS.value}, step {_PGD_STEP.value}, {_PGD_STEPS.value} steps, "
            "random start")
  if name == "bim":
    return f"Linf eps {_EPS.value}, step {_BIM_STEP.value}, {_BIM_STEPS.value} steps"
  if name == "cw":
    return (f"L2, c {_CW_C.value}, kappa {_CW_KAPPA.value}, Adam lr {_CW_LR.value}, "
            f"{_CW_STEPS.value} steps, 1 binary step")
  if name == "deepfool":
    return f"L2, {_DF_STEPS.value} steps max, overshoot {_DF_OVERSHOOT.value}"
  return ""


def _norms(x: np.ndarray, x_adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  d = (x_adv - x).reshape(len(x), -1)
  return np.sqrt(np.sum(d * d, axis=1)), np.max(np.abs(d), axis=1)


def _summary(x: np.ndarray, x_adv: np.ndarray, success: np.ndarray, work: float) -> dict:
  l2, linf = _norms(x, x_adv)
  ok = success.astype(bool)
  return {
      "asr": float(ok.mean()),
      "mean_l2_success": float(l2[ok].mean()) if ok.any() else float("nan"),
      "max_linf": float(linf.max()),
      "work_per_image": float(work),
  }


def _unpad(outs: list[tuple[np.ndarray, ...]], batches) -> tuple[np.ndarray, ...]:
  """Concatenates per-batch outputs over the real (unpadded) rows."""
  return tuple(np.concatenate([o[i][b.mask] for o, b in zip(outs, batches, strict=True)])
               for i in range(len(outs[0])))


def _to_torch(array: np.ndarray):
  """``array`` as a torch tensor on ``--torch_device``."""
  import torch  # pylint: disable=g-import-not-at-top

  return torch.from_numpy(np.ascontiguousarray(array)).to(_TORCH_DEVICE.value)


def _torch_sync():
  """Waits for queued GPU work, so that a timer stopped after it counts that work."""
  import torch  # pylint: disable=g-import-not-at-top

  if _TORCH_DEVICE.value == "cuda":
    torch.cuda.synchronize()


def run_attack(name: str, logits_fn, torch_model, counting, batches, keys) -> dict[str, Any]:
  """Times one attack in both libraries over the same batches."""
  import _torch_deepsec  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  adv = _advtrace_attack(name, logits_fn)
  jax_batches = {id(b): (jnp.asarray(b.x), jnp.asarray(b.y), k)
                 for b, k in zip(batches, keys, strict=True)}

  def run_adv(b):
    xb, yb, kb = jax_batches[id(b)]
    out = adv(xb, yb, kb) if name == "pgd" else adv(xb, yb)
    out = jax.block_until_ready(out)
    return np.asarray(out.x_adv), np.asarray(out.info.success), np.asarray(out.info.queries)

  logging.info("%s: advtrace", name)
  t_adv, outs_adv = _common.time_batches(run_adv, batches, _REPEATS.value)

  # torchattacks CW masks the label logit by multiplying with zero, which picks the wrong class
  # when every logit is negative (DEEPSEC returns logits - max <= 0; torchattacks issue #184).
  # Shifting all logits of an example by the same amount leaves the CW margin and its gradient
  # exactly unchanged and makes them positive.
  victim = _torch_deepsec.PositiveLogits(counting) if name == "cw" else counting
  tatk = _torch_attack(name, victim)
  torch.manual_seed(_SEED.value)
  torch_batches = {id(b): (_to_torch(b.x.transpose(0, 3, 1, 2)), _to_torch(b.y.astype(np.int64)))
                   for b in batches}
  rows = []

  def run_torch(b):
    xb, yb = torch_batches[id(b)]
    counting.reset()
    x_adv = tatk(xb, yb)
    rows.append(counting.rows / len(xb))
    return (x_adv.detach().cpu().numpy().transpose(0, 2, 3, 1),)  # .cpu() waits for the GPU

  logging.info("%s: torchattacks", name)
  t_torch, outs_torch = _common.time_batches(run_torch, batches, _REPEATS.value)

  x = np.concatenate([b.x[b.mask] for b in batches])
  y = np.concatenate([b.y[b.mask] for b in batches])
  xa, sa, qa = _unpad(outs_adv, batches)
  (xt,) = _unpad(outs_torch, batches)
  with torch.no_grad():
    pred_t = torch_model(_to_torch(xt.transpose(0, 3, 1, 2)))
  st = pred_t.argmax(1).cpu().numpy() != y
  return {
      "attack": name,
      "settings": _settings(name),
      "advtrace": {"timing": t_adv.as_dict(), **_summary(x, xa, sa, qa.mean())},
      "torchattacks": {"timing": t_torch.as_dict(),
                       **_summary(x, xt, st, statistics.mean(rows[:len(batches)]))},
      "ratio_advtrace_over_torch": t_adv.images_per_s / t_torch.images_per_s,
  }


# ---------------------------------------------------------------------------------------------
# The per-step primitive: fwd+bwd of the CE loss w.r.t. the input batch.


YNN_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _compiled(fn, args, options=None):
  """``fn`` jitted and compiled for ``args`` (with XLA debug ``options``), or None if refused."""
  lowered = jax.jit(fn).lower(*args)
  try:
    return lowered.compile(compiler_options=options) if options else lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (an option this XLA does not know)
    logging.warning("compile with %s failed: %s", options, e)
    return None


def grad_microbench(logits_fn, torch_model, batch) -> dict[str, Any]:
  """Median time of one input gradient of the summed CE loss on one batch, several ways.

  The ``lax_reshape_pool`` rows use a pure-lax copy of the same model (same weights, checked)
  whose max-pool is a reshape and a max; ``ynn dots only`` compiles with YNNPACK restricted to
  dots (convolutions go to XLA's Eigen path).
  """
  import torch  # pylint: disable=g-import-not-at-top

  xj, yj = jnp.asarray(batch.x), jnp.asarray(batch.y)

  def batched_grad(f):
    return jax.grad(
        lambda x, y: optax.softmax_cross_entropy_with_integer_labels(f(x), y).sum())

  def single_loss(x, y):  # what the attacks differentiate: one example, vmapped
    return optax.softmax_cross_entropy_with_integer_labels(base.single_logits(logits_fn, x), y)

  reshape_pool = _common.model_variant(_WEIGHTS.value, "lax_reshape_pool")
  _common.check_variant(reshape_pool, logits_fn, batch.x)
  compiled = {
      "jax grad (as shipped)": _compiled(batched_grad(logits_fn), (xj, yj)),
      "jax vmap(grad(single)) (as attacks do)": _compiled(jax.vmap(jax.grad(single_loss)),
                                                          (xj, yj)),
      "jax grad, ynn dots only": _compiled(batched_grad(logits_fn), (xj, yj), YNN_DOTS_ONLY),
      "jax grad, reshape pool": _compiled(batched_grad(reshape_pool), (xj, yj)),
      "jax grad, reshape pool + ynn dots only": _compiled(batched_grad(reshape_pool), (xj, yj),
                                                          YNN_DOTS_ONLY),
  }
  fwd = _compiled(logits_fn, (xj,))
  fns = {k: functools.partial(lambda c: c(xj, yj).block_until_ready(), c)
         for k, c in compiled.items() if c is not None}
  fns["jax forward (as shipped)"] = lambda: fwd(xj).block_until_ready()
  xt = _to_torch(batch.x.transpose(0, 3, 1, 2))
  yt = _to_torch(batch.y.astype(np.int64))
  ce = torch.nn.CrossEntropyLoss(reduction="sum")

  def torch_grad():
    a = xt.clone().requires_grad_(True)
    grad = torch.autograd.grad(ce(torch_model(a), yt), a)[0]
    _torch_sync()
    return grad

  def torch_fwd():
    with torch.no_grad():
      logits = torch_model(xt)
    _torch_sync()
    return logits

  fns["torch autograd"] = torch_grad
  fns["torch forward"] = torch_fwd
  first = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  times = {name: [] for name in fns}
  for _ in range(_GRAD_REPEATS.value):  # interleaved, so load changes hit every variant alike
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: {"first_s": first[name], "median_ms": 1e3 * statistics.median(t),
                 "min_ms": 1e3 * min(t)} for name, t in times.items()}


# ---------------------------------------------------------------------------------------------


def _markdown(info, results, grad, n_images, accuracy) -> str:
  b = _BATCH_SIZE.value
  header = ["Attack", "Settings", "advtrace img/s", "torchattacks img/s", "ratio adv/torch",
            "advtrace compile s", "torch 1st batch s", "ASR adv", "ASR torch",
            "mean L2 adv", "mean L2 torch", "adv queries/img", "torch fwd/img"]
  rows = []
  for r in results:
    a, t = r["advtrace"], r["torchattacks"]
    rows.append([r["attack"], r["settings"], a["timing"]["images_per_s"],
                 t["timing"]["images_per_s"], r["ratio_advtrace_over_torch"],
                 a["timing"]["compile_s"], t["timing"]["first_batch_s"],
                 f"{a['asr']:.1%}", f"{t['asr']:.1%}", a["mean_l2_success"],
                 t["mean_l2_success"], a["work_per_image"], t["work_per_image"]])
  title = ("advtrace vs torchattacks, DEEPSEC MNIST CNN, "
           + ("CPU" if _TORCH_DEVICE.value == "cpu" == jax.default_backend()
              else f"advtrace on {jax.default_backend()}, torch on {_TORCH_DEVICE.value}"))
  text = [f"## {title} ({_LABEL.value})", ""]
  if not _LABEL.value.startswith("full run"):
    text += [f"> **{_LABEL.value}: not a full run of advtrace as shipped** (reduced sizes, a "
             "loaded machine or a what-if variant: see the command).", ""]
  text += [_common.machine_lines(info, _LABEL.value),
           f"- Command: `{_common.command_line()}`",
           f"- Data: first {n_images} correctly classified MNIST test images (clean accuracy "
           f"{accuracy:.2%}), batch size {b} for both, torch threads {_TORCH_THREADS.value}, "
           f"advtrace loop_mode {_LOOP_MODE.value!r}, advtrace model {_MODEL.value!r}, "
           f"{_REPEATS.value} steady-state pass(es) "
           "(median)",
           "- img/s: steady state over batches 2..n (first batch excluded); compile s = first "
           "batch minus one steady batch; ASR on each library's own model; mean L2 over "
           "successful images; adv queries/img = advtrace `info.queries`; torch fwd/img = rows "
           "torchattacks sent through the model per image", ""]
  if results:
    text += [_common.markdown_table(header, rows), ""]
  if grad:
    g_rows = [[k, v["median_ms"], v["min_ms"], v["first_s"]] for k, v in grad.items()]
    text += [f"Per-step primitive on one batch of {b} (CE loss, gradient w.r.t. the input):", "",
             _common.markdown_table(["Function", "median ms", "min ms", "first call s"], g_rows),
             ""]
  return "\n".join(text)


def main(argv):
  del argv
  import _torch_deepsec  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top

  unknown = set(_ATTACKS.value) - set(ATTACKS)
  if unknown:
    raise app.UsageError(f"unknown --attacks {sorted(unknown)}; valid: {', '.join(ATTACKS)}")
  torch.set_num_threads(_TORCH_THREADS.value)
  info = _common.machine_info()
  info.update(torch=torch.__version__, torchattacks=torchattacks.__version__,
              torch_threads=torch.get_num_threads(), torch_device=_TORCH_DEVICE.value)
  if _TORCH_DEVICE.value == "cuda":
    if not torch.cuda.is_available():
      raise app.UsageError("--torch_device=cuda, but torch sees no CUDA device.")
    info["torch_gpu"] = torch.cuda.get_device_name()
  logging.info("machine: %s", info)

  logits_fn = _common.load_victim(_WEIGHTS.value)
  torch_model = _torch_deepsec.load_mnist_raw(_WEIGHTS.value).to(_TORCH_DEVICE.value)
  counting = _torch_deepsec.CountingModel(torch_model).eval()
  x, y, accuracy = _common.first_correct(logits_fn, _DATA_DIR.value, _NUM_IMAGES.value)
  with torch.no_grad():
    tpred = torch_model(_to_torch(x.transpose(0, 3, 1, 2)))
  agree = float((tpred.argmax(1).cpu().numpy() == y).mean())
  if agree < 1.0:
    logging.warning("torch model classifies %.2f%% of the selected images correctly", 100 * agree)
  batches = _common.make_batches(x, y, _BATCH_SIZE.value)
  shipped = logits_fn
  if _MODEL.value != "flax":
    logits_fn = _common.model_variant(_WEIGHTS.value, _MODEL.value)
    _common.check_variant(logits_fn, shipped, batches[0].x)
  root = jax.random.key(_SEED.value)
  keys = [jax.random.fold_in(root, i) for i in range(len(batches))]

  grad = None
  if "grad" in _ATTACKS.value:
    grad = grad_microbench(shipped, torch_model, batches[0])
    logging.info("grad: %s", grad)
  results = []
  for name in ATTACKS[1:]:
    if name in _ATTACKS.value:
      r = run_attack(name, logits_fn, torch_model, counting, batches, keys)
      logging.info("%s: %s", name, r)
      results.append(r)

  out = {"machine": info, "command": _common.command_line(), "label": _LABEL.value,
         "num_images": len(x), "batch_size": _BATCH_SIZE.value, "clean_accuracy": accuracy,
         "model_variant": _MODEL.value,
         "torch_agrees_on_selection": agree, "results": results, "grad_microbench": grad}
  _common.write_outputs(_WORKDIR.value, out, _markdown(info, results, grad, len(x), accuracy),
                        _RESULTS_MD.value)


if __name__ == "__main__":
  app.run(main)
