"""Clean-accuracy evaluation of a registered model on a dataset split."""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from advtrace._src import atomic
from advtrace._src import batching
from advtrace._src import checks
from advtrace._src import data
from advtrace._src import weights as weights_lib
from advtrace._src import xla
from advtrace._src.models import deepsec_weights
from advtrace._src.models import registry


def _check_deepsec_input(model: str, input_shape: tuple[int, ...], dataset: str) -> None:
  expected = deepsec_weights.INPUT_SHAPES.get(model)
  if expected is not None and tuple(expected[1:]) != tuple(input_shape[1:]):
    size = lambda shape: "x".join(map(str, shape[1:]))
    raise ValueError(f"{model} takes {size(expected)} images (HxWxC), but {dataset} has "
                     f"{size(input_shape)} images.")


def _markdown(results: dict[str, Any]) -> str:
  weights_name = os.path.basename(results["weights"]) if results["weights"] else "(random init)"
  return (
      "| model | dataset | split | examples | accuracy (%) | weights |\n"
      "|---|---|---|---:|---:|---|\n"
      f"| {results['model']} | {results['dataset']} | {results['split']} | "
      f"{results['n_examples']} | {results['accuracy']:.2f} | {weights_name} |\n")


def evaluate(
    workdir: str | os.PathLike,
    *,
    dataset: str,
    model: str | None = None,
    weights: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    batch_size: int = 500,
    dump_logits: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
  """Measures the clean accuracy of a model and writes the results into ``workdir``.

  Args:
    workdir: output directory (created if missing).
    dataset: ``'mnist'``, ``'cifar10'``, ``'digits'`` or the path of a ``.npz`` file (see
      ``advtrace.data.load``).
    model: a registered model name. May be omitted when ``weights`` names it (DEEPSEC files and
      training checkpoints both do); if given, it must agree with the weights.
    weights: a DEEPSEC ``.pt`` file or an ``advtrace.training`` checkpoint (see
      ``advtrace.models.load_weights``). None evaluates a randomly initialised model (``seed``).
    split: the dataset split.
    data_dir: the tfds data dir (default ``$TFDS_DATA_DIR``).
    batch_size: examples per forward pass; the last batch is padded, so there is one compile.
    dump_logits: also write ``logits.npy`` (float32, ``[n_examples, num_classes]``, in the
      dataset's order).
    seed: the initialisation seed when ``weights`` is None.

  Returns:
    The dict written to ``<workdir>/results.json``, with keys: ``model``, ``dataset``, ``split``,
    ``n_examples``, ``n_correct``, ``accuracy`` (in **percent**, 100 * n_correct / n_examples),
    ``num_classes``, ``weights`` (absolute path or None), ``weights_sha256`` (of a ``.pt`` file;
    None for checkpoints and random init), ``batch_size``, ``backend``, ``wall_time_s`` (the
    whole call: loading, compiling and inference) and ``logits_file`` (or None). A Markdown
    table goes to ``results.md``. All files are written atomically.

  Raises:
    ValueError: unknown model or dataset, bad flags, or weights that do not fit the model.
    FileNotFoundError: missing weights, data dir or dataset.
  """
  start_time = time.perf_counter()
  checks.check_positive(batch_size, "batch_size", allow_zero=False)
  if model is None and weights is None:
    raise ValueError("pass a model name (--model), weights (--weights), or both.")
  if model is not None:
    checks.check_choice(model, registry.list_models(), "model name")
  if weights is not None and not os.path.exists(weights):
    raise FileNotFoundError(
        f"weights {weights!r} not found: pass a DEEPSEC .pt file or the workdir of an "
        "advtrace training run.")

  ds = data.load(dataset, split, data_dir)
  checks.check_images(ds.images, f"{ds.name} images")
  checks.check_labels(ds.labels, ds.num_classes, f"{ds.name} labels", size=len(ds.images))
  input_shape = (1, *ds.images.shape[1:])

  model_kwargs: dict[str, Any] = {}
  num_classes = ds.num_classes
  sha256 = None
  if weights is None:
    _check_deepsec_input(model, input_shape, ds.name)
    net = registry.get_model(model, num_classes=num_classes)
    weights_lib.variable_shapes(net, input_shape)  # A clear error for unsuitable inputs.
    logging.warning("No weights given: evaluating a randomly initialised %s (seed %d).",
                    model, seed)
    variables = registry.init_variables(net, jax.random.key(seed), input_shape)
  else:
    model, variables = weights_lib.load_weights(weights, model)
    _check_deepsec_input(model, input_shape, ds.name)
    if os.path.isdir(weights):
      metadata = weights_lib.checkpoint_metadata(weights)
      model_kwargs = dict(metadata.get("model_kwargs") or {})
      num_classes = int(metadata.get("num_classes", num_classes))
    else:
      sha256 = deepsec_weights.sha256_file(weights)
    net = registry.get_model(model, num_classes=num_classes, **model_kwargs)
    weights_lib.check_variables(net, variables, input_shape, what=f"weights {weights!r}")
  if num_classes != ds.num_classes:
    raise ValueError(f"{model} from {weights} has {num_classes} outputs but {ds.name} has "
                     f"{ds.num_classes} classes.")

  apply = xla.jit(lambda v, x: net.apply(v, x, train=False))
  variables = jax.device_put(variables)
  logits = batching.map_batched(lambda x: apply(variables, x), ds.images, int(batch_size))
  n_correct = int(np.sum(np.argmax(logits, axis=-1) == ds.labels))

  os.makedirs(workdir, exist_ok=True)
  logits_file = None
  if dump_logits:
    logits_file = os.path.join(os.path.abspath(workdir), "logits.npy")
    buffer = io.BytesIO()
    np.save(buffer, logits.astype(np.float32))
    atomic.write_bytes(logits_file, buffer.getvalue())
  results = {
      "model": model,
      "dataset": ds.name,
      "split": split,
      "n_examples": len(ds.labels),
      "n_correct": n_correct,
      "accuracy": 100.0 * n_correct / len(ds.labels),
      "num_classes": num_classes,
      "weights": None if weights is None else os.path.abspath(weights),
      "weights_sha256": sha256,
      "batch_size": int(batch_size),
      "backend": jax.default_backend(),
      "wall_time_s": time.perf_counter() - start_time,
      "logits_file": logits_file,
  }
  atomic.write_bytes(os.path.join(workdir, "results.json"),
               (json.dumps(results, indent=2) + "\n").encode())
  atomic.write_bytes(os.path.join(workdir, "results.md"), _markdown(results).encode())
  logging.info("%s on %s/%s: accuracy %.2f%% (%d/%d)", model, ds.name, split,
               results["accuracy"], n_correct, len(ds.labels))
  return results
