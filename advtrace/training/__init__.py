"""Training and evaluation loop, checkpoints and restore."""

from advtrace._src.training import TrainState  # noqa: I001  (one symbol per line, optax style)
from advtrace._src.training import create_train_state
from advtrace._src.training import default_config
from advtrace._src.training import eval_step
from advtrace._src.training import evaluate
from advtrace._src.training import fit
from advtrace._src.training import get_augment
from advtrace._src.training import identity_augment
from advtrace._src.training import load_metadata
from advtrace._src.training import make_optimizer
from advtrace._src.training import make_schedule
from advtrace._src.training import random_translate_flip
from advtrace._src.training import restore_model
from advtrace._src.training import restore_variables
from advtrace._src.training import results_markdown
from advtrace._src.training import train_and_evaluate
from advtrace._src.training import train_step
from advtrace._src.training import variables_of

__all__ = (
    "TrainState",
    "create_train_state",
    "default_config",
    "eval_step",
    "evaluate",
    "fit",
    "get_augment",
    "identity_augment",
    "load_metadata",
    "make_optimizer",
    "make_schedule",
    "random_translate_flip",
    "restore_model",
    "restore_variables",
    "results_markdown",
    "train_and_evaluate",
    "train_step",
    "variables_of",
)
