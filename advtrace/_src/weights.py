"""Loading model weights: DEEPSEC ``.pt`` files, or orbax checkpoints of ``advtrace.training``."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Variables = Any  # {'params': ..., 'batch_stats': ...}

_COLLECTIONS = ("params", "batch_stats")


def variable_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Variables:
  """The variables of a fresh ``model`` as ``ShapeDtypeStruct`` leaves (nothing is computed).

  Raises:
    ValueError: if the model cannot take NHWC inputs of ``input_shape``.
  """
  try:
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
  except Exception as e:  # Any failure here means the model cannot take such inputs.
    raise ValueError(f"{type(model).__name__} cannot take inputs of shape {tuple(input_shape)} "
                     f"({type(e).__name__}: {e}); use a dataset the model was built for.") from e


def check_variables(model: nn.Module, variables: Variables, input_shape: tuple[int, ...],
                    *, what: str = "weights") -> None:
  """Checks that ``variables`` has exactly the leaves and shapes of a fresh ``model``.

  Args:
    model: the Flax module the variables are meant for.
    variables: the variables to check (``params`` and, if the model has BatchNorm,
      ``batch_stats``).
    input_shape: an NHWC input shape (batch axis included) to initialise the model with.
    what: a description of the variables for the error message.

  Raises:
    ValueError: listing missing, unexpected and wrongly shaped leaves.
  """
  expected = variable_shapes(model, input_shape)
  want = traverse_util.flatten_dict(
      {c: v for c, v in expected.items() if c in _COLLECTIONS}, sep="/")
  got = traverse_util.flatten_dict(
      {c: v for c, v in dict(variables).items() if c in _COLLECTIONS}, sep="/")
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = [f"{k}: got {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}"
           for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != want[k].shape]
  if missing or unexpected or wrong:
    def head(items):
      return "; ".join(items[:6]) + (f"; ... ({len(items)} in all)" if len(items) > 6 else "")
    problems = [f"{label}: {head(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if items]
    raise ValueError(
        f"{what} do not fit {type(model).__name__} (input {tuple(input_shape)}): "
        + " | ".join(problems) + ". Check that the weights belong to this model and dataset.")


def _split_step(path: str) -> tuple[str, int | None]:
  """``.../checkpoints/best/12`` -> (``.../checkpoints/best``, 12); other paths -> (path, None)."""
  path = os.path.normpath(os.path.abspath(path))
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) in ("best", "latest"):
    return os.path.dirname(path), int(base)
  return path, None


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The model metadata (``model``, ``num_classes``, ``model_kwargs``, ...) of a training run.

  Args:
    path: anything :func:`load_weights` accepts as an orbax checkpoint.
  """
  from advtrace._src import training  # Orbax is only needed for checkpoints.

  return training.load_metadata(_split_step(os.fspath(path))[0])


def load_weights(path: str | os.PathLike, model_name: str | None = None) -> tuple[str, Variables]:
  """Loads weights from a DEEPSEC ``.pt`` file or an orbax checkpoint of the training loop.

  Args:
    path: a legacy ``torch.save`` file from DEEPSEC (``MNIST_raw.pt``, ``CIFAR10_raw.pt``), or
      a checkpoint written by ``advtrace.training``: the training workdir or its
      ``checkpoints`` folder (best-validation epoch), ``checkpoints/best`` or
      ``checkpoints/latest`` (newest kept epoch there), or one epoch's directory such as
      ``checkpoints/best/12``.
    model_name: the registered model the weights are for. Detected from the file (DEEPSEC
      keys, or the run's ``model.json``); if given, it must agree.

  Returns:
    ``(model_name, variables)`` with ``variables = {'params': ..., 'batch_stats'?: ...}``.

  Raises:
    FileNotFoundError: if ``path`` does not exist or holds no checkpoint.
    ValueError: if the weights are malformed, unsafe, belong to another model, or do not fit
      the model.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    from advtrace._src import training  # Orbax is only needed for checkpoints.

    root, step = _split_step(path)
    saved_name = training.load_metadata(root)["model"]
    if model_name is not None and model_name != saved_name:
      raise ValueError(f"the checkpoint {path} holds a {saved_name!r} model, not {model_name!r}.")
    return saved_name, training.restore_variables(root, step)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"weights {path!r} not found: pass a DEEPSEC .pt file (e.g. "
        "../shared/weights/deepsec/MNIST_raw.pt) or the workdir of an advtrace training run "
        "(or its checkpoints/best/<epoch> directory).")
  from advtrace._src.models import deepsec_weights  # Avoids an import cycle.

  return deepsec_weights.load_deepsec(path, model_name)
