r"""Evaluates a registered model's clean accuracy on a dataset split.

Command (the DEEPSEC MNIST model on the full MNIST test set)::

  python experiments/evaluate.py --weights=../shared/weights/deepsec/MNIST_raw.pt \
    --dataset=mnist --data_dir=../shared/tensorflow_datasets --workdir=/tmp/eval_mnist

Expected runtime: about 15 s on 2 CPU cores (most of it decoding the 10,000 PNG images).
Expected result: accuracy 99.34% (9,934 / 10,000), the figure a NumPy forward pass of
``MNIST_raw.pt`` gives.

``--weights`` takes a DEEPSEC ``.pt`` file or the workdir of an ``advtrace.training`` run
(or ``<workdir>/checkpoints/best/<epoch>``); ``--model`` is then optional. Writes
``results.json`` (``accuracy`` in percent), ``results.md`` and, with ``--dump_logits``,
``logits.npy`` (in dataset order) into ``--workdir``.
"""

from __future__ import annotations

import os
import sys

# Lets `python experiments/evaluate.py` run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from advtrace._src import evaluation  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Registered model name (optional with --weights).")
_DATASET = flags.DEFINE_string("dataset", "mnist", "mnist, cifar10, digits, or a .npz path.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (default $TFDS_DATA_DIR).")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "DEEPSEC .pt file or advtrace training checkpoint; None: random init.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 500, "Examples per forward pass.")
_DUMP_LOGITS = flags.DEFINE_bool("dump_logits", False, "Also write logits.npy.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation seed when no --weights are given.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  evaluation.evaluate(
      _WORKDIR.value,
      dataset=_DATASET.value,
      model=_MODEL.value,
      weights=_WEIGHTS.value,
      split=_SPLIT.value,
      data_dir=_DATA_DIR.value,
      batch_size=_BATCH_SIZE.value,
      dump_logits=_DUMP_LOGITS.value,
      seed=_SEED.value,
  )


if __name__ == "__main__":
  app.run(main)
