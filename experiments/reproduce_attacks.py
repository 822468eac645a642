r"""Runs a list of named attacks on one model and tabulates them beside seed-003 Table I.

  python experiments/reproduce_attacks.py \
      --config=experiments/configs/reproduce_deepsec_mnist.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/reproduce_mnist

Each attack runs in ``<workdir>/<attack>/``; rerunning with the same ``--workdir`` skips finished
attacks and resumes an interrupted one. Writes the summary ``results.json`` and ``results.md``
into ``--workdir``; see :func:`advtrace._src.attacks.runner.reproduce_attacks`. This file is
intentionally kept short.
"""

import os
import sys

# Lets `python experiments/reproduce_attacks.py` run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advtrace._src.attacks import runner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Reproduction config (experiments/configs/reproduce_*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: one subfolder per attack.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  runner.reproduce_attacks(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
