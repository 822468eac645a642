r"""The injected-attractors experiment (seed 003): Tables I-VI, Figs. 5 and 7, ablations.

  python experiments/attractors.py --config=experiments/configs/attractors_mnist.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/attractors_mnist

Writes ``results.json``, ``results.md`` and ``figures/`` into ``--workdir``; the secret QIM key
goes to ``<workdir>.secret/`` unless ``--config.key_path`` says otherwise. Rerunning with the
same ``--workdir`` resumes; see :func:`advtrace._src.attractor_experiment.run`. This file is
intentionally kept short.
"""

import os
import sys

# Lets `python experiments/attractors.py` run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advtrace import attractors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (experiments/configs/attractors_*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerun with it to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  attractors.run_experiment(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
