r"""Runs one named attack (advtrace._src.attacks.catalog) on a model and dataset.

  python experiments/attack.py --config=experiments/configs/attack_default.py \
      --config.attack=pgd --config.data_dir=../shared/tensorflow_datasets \
      --workdir=/tmp/attack_pgd

Any config field can be overridden (``--config.settings=deepsec_code_mnist``,
``--config.attack_kwargs='{"eps": 0.2}'``, ``--config.n_examples=200``). Rerunning with the same
``--workdir`` resumes after the last finished batch. Writes ``adversarial.npz``,
``results.json`` and ``results.md`` into ``--workdir``; see
:func:`advtrace._src.attacks.runner.run_attack`. This file is intentionally kept short.
"""

import os
import sys

# Lets `python experiments/attack.py` run from a source checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from advtrace._src.attacks import runner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Attack config file (experiments/configs/attack_*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder: adversarial.npz, results.json, results.md.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("JAX devices: %s", jax.devices())
  runner.run_attack(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
