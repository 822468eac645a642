r"""Trains a model and evaluates its best checkpoint.

  python experiments/train.py --config=experiments/configs/train_digits_small_cnn.py \
      --workdir=/tmp/train_digits_small_cnn

Rerunning with the same ``--workdir`` resumes from the latest checkpoint. This file is
intentionally kept short: :func:`advtrace.training.train_and_evaluate` does the work.
"""

import os
import sys

# Lets the binary run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advtrace import training  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (experiments/configs/train_*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder: checkpoints, results.json, results.md.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data dir; overrides config.data_dir (default: $TFDS_DATA_DIR).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  config = _CONFIG.value
  if _DATA_DIR.value:
    config.data_dir = _DATA_DIR.value
  training.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
