"""The quickstart: train a small CNN on the bundled digits and write a short report, offline.

The report is a list of sections. A section is a function ``Context -> Section`` that returns a
title, Markdown text and the figures it wrote; :func:`run` calls each in order and joins them
into ``report.md``. New analyses (attacks, forensics) plug in by adding a section function to
the list passed to :func:`run`.

Outputs in ``workdir``::

  report.md        the report, figures embedded
  results.json     headline numbers and every section's results
  figures/*.png    the figures
  train/           the training run (checkpoints, its own results.json and results.md)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from advtrace._src import atomic
from advtrace._src import batching
from advtrace._src import training
from advtrace._src import xla
from advtrace._src.models import registry


def default_config() -> ml_collections.ConfigDict:
  """The quickstart config: ``train`` is a training config, the rest configures the report."""
  config = ml_collections.ConfigDict()
  train = training.default_config()
  train.dataset = "digits"
  train.model = "small_cnn"
  train.optimizer = "sgd"
  train.learning_rate = 0.05
  train.momentum = 0.9
  train.nesterov = True
  train.num_epochs = 10
  train.batch_size = 32
  train.log_every_steps = 0
  config.train = train
  config.num_grid_images = 32
  config.predict_batch_size = 500
  return config


@dataclasses.dataclass
class Context:
  """What report sections can use. Sections may add entries to ``extras`` for later sections.

  Attributes:
    config: the quickstart config.
    workdir: the output folder.
    model: the trained model.
    variables: its variables (best validation checkpoint).
    test_images, test_labels: the test set.
    train_results: the dict returned by :func:`advtrace.training.train_and_evaluate`.
    extras: free-form shared state between sections.
  """
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  model: nn.Module
  variables: Mapping[str, Any]
  test_images: np.ndarray
  test_labels: np.ndarray
  train_results: Mapping[str, Any]
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
    """The jitted eval-mode ``x -> logits`` of the trained model."""
    return xla.jit(registry.logits_fn(self.model, self.variables))

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Eval-mode logits of ``images``, computed in fixed-size batches (no retracing)."""
    return batching.map_batched(self.logits_fn, images, self.config.predict_batch_size)

  def save_figure(self, fig: Figure, name: str) -> str:
    """Saves ``fig`` atomically as ``figures/<name>.png``; returns the path relative to workdir."""
    return atomic.write_figure(self.workdir, fig, name)


class Section(NamedTuple):
  """One part of the report.

  Attributes:
    key: a short identifier; the section's ``results`` go under this key in results.json.
    title: the Markdown heading.
    markdown: the body, figures embedded with ``![caption](figures/<name>.png)``.
    figures: paths of the written figures, relative to the workdir.
    results: JSON-serialisable numbers for results.json.
  """
  key: str
  title: str
  markdown: str
  figures: tuple[str, ...] = ()
  results: Mapping[str, Any] = {}


SectionFn = Callable[[Context], Section]


def training_section(ctx: Context) -> Section:
  """Accuracy table and the training curve."""
  r = ctx.train_results
  history = r["history"]
  epochs = [h["epoch"] for h in history]
  fig = Figure(figsize=(8, 3))
  ax_loss, ax_acc = fig.subplots(1, 2)
  ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
  ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
  ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
  ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
  ax_acc.axvline(r["best_epoch"], color="gray", ls="--", label="best (kept)")
  ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
  for ax in (ax_loss, ax_acc):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  curve = ctx.save_figure(fig, "training_curve")
  eps = r["examples_per_sec"]
  markdown = "\n".join([
      f"`{r['model']}` trained on `{r['dataset']}` for {r['epochs']} epochs "
      f"({r['num_train']} train / {r['num_val']} validation / {r['num_test']} test images); "
      f"the checkpoint with the best validation accuracy (epoch {r['best_epoch']}) is kept.",
      "",
      "| metric | value |",
      "|---|---|",
      f"| test accuracy (best checkpoint) | {r['test_accuracy']:.4f} |",
      f"| best validation accuracy | {r['best_val_accuracy']:.4f} |",
      f"| training throughput (first step excluded) | "
      f"{'n/a' if eps is None else f'{eps:.0f} examples/s'} |",
      f"| training wall time | {r['wall_time_s']:.1f} s |",
      "",
      f"![Training curve]({curve})",
  ])
  results = {k: r[k] for k in ("test_accuracy", "best_val_accuracy", "best_epoch", "epochs",
                               "examples_per_sec", "wall_time_s")}
  return Section("training", "Training", markdown, (curve,), results)


def predictions_section(ctx: Context) -> Section:
  """A grid of test images with the model's predictions; mistakes in red."""
  n = min(int(ctx.config.num_grid_images), len(ctx.test_images))
  images, labels = ctx.test_images[:n], ctx.test_labels[:n]
  preds = np.argmax(ctx.logits(images), axis=-1)
  cols = 8
  rows = -(-n // cols)
  fig = Figure(figsize=(cols * 1.1, rows * 1.3))
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for i, ax in enumerate(axes):
    ax.axis("off")
    if i >= n:
      continue
    img = images[i]
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    wrong = preds[i] != labels[i]
    ax.set_title(f"pred {preds[i]}" + (f" (true {labels[i]})" if wrong else ""), fontsize=8,
                 color="red" if wrong else "black")
  fig.tight_layout()
  grid = ctx.save_figure(fig, "predictions")
  correct = int(np.sum(preds == labels))
  markdown = (f"Predictions on the first {n} test images ({correct}/{n} correct; mistakes in "
              f"red with the true label).\n\n![Test predictions]({grid})")
  return Section("predictions", "Predictions", markdown, (grid,),
                 {"num_images": n, "num_correct": correct})


DEFAULT_SECTIONS: tuple[SectionFn, ...] = (training_section, predictions_section)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    sections: Sequence[SectionFn] = DEFAULT_SECTIONS,
) -> dict[str, Any]:
  """Trains the model of ``config.train``, then writes ``report.md`` and ``results.json``.

  Training goes to ``<workdir>/train`` and resumes there if interrupted.

  Args:
    config: see :func:`default_config`.
    workdir: the output folder.
    sections: report section functions, in order.

  Returns:
    The dict written to ``results.json``: ``test_accuracy``, ``wall_time_s``, and each
    section's results under its key.
  """
  from advtrace import data  # Imported lazily: tfds is slow to import.

  t0 = time.perf_counter()
  workdir = pathlib.Path(workdir)
  train_results = training.train_and_evaluate(config.train, workdir / "train")
  model, variables, _ = training.restore_model(workdir / "train")
  test = data.load(config.train.dataset, split="test", data_dir=config.train.data_dir)
  ctx = Context(config=config, workdir=workdir, model=model, variables=variables,
                test_images=np.asarray(test.images), test_labels=np.asarray(test.labels),
                train_results=train_results)
  parts = []
  for section in sections:
    logging.info("Quickstart report section: %s", getattr(section, "__name__", section))
    parts.append(section(ctx))
  keys = [p.key for p in parts]
  if len(set(keys)) != len(keys):
    raise ValueError(f"Report section keys must be unique, got {keys}.")

  results = {
      "test_accuracy": train_results["test_accuracy"],
      "wall_time_s": time.perf_counter() - t0,
      "sections": {p.key: dict(p.results) for p in parts},
      "figures": [f for p in parts for f in p.figures],
  }
  report = [
      "# advtrace quickstart report",
      "",
      f"Reproduce with `python experiments/quickstart.py --workdir={workdir}`. "
      f"Model `{config.train.model}` on `{config.train.dataset}`; "
      f"total wall time {results['wall_time_s']:.1f} s on {jax.devices()[0].platform.upper()}.",
      "",
  ]
  for part in parts:
    report += [f"## {part.title}", "", part.markdown.rstrip(), ""]
  atomic.write_text(workdir / "report.md", "\n".join(report))
  atomic.write_json(workdir / "results.json", results, sort_keys=True)
  logging.info("Quickstart done in %.1f s: test accuracy %.4f. Report: %s",
               results["wall_time_s"], results["test_accuracy"], workdir / "report.md")
  return results
