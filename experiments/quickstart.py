"""Quickstart: trains a small CNN on the bundled digits (offline) and writes a short report.

  python experiments/quickstart.py --workdir=/tmp/advtrace_quickstart

Writes ``report.md``, ``results.json`` and ``figures/*.png`` into ``--workdir``. Settings can be
overridden, e.g. ``--config.train.num_epochs=2``. Intentionally kept short: the library function
``advtrace._src.quickstart.run`` does the work.
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

from advtrace._src import quickstart  # noqa: E402

_CONFIG = config_flags.DEFINE_config_dict(
    "config", quickstart.default_config(), "Quickstart settings.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder for the report.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  quickstart.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
