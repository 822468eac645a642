"""Imports the released DEEPSEC raw-model weights (legacy ``torch.save`` files) into Flax.

The files are read by the restricted, torch-free reader in ``third_party/deepsec``; they are not
shipped with advtrace. Get them from the DEEPSEC repository (``RawModels/MNIST/model/MNIST_raw.pt``
and ``RawModels/CIFAR10/model/CIFAR10_raw.pt``).

Conversions (PyTorch NCHW -> Flax NHWC): conv weights OIHW -> HWIO; linear weights (out, in) ->
(in, out); BatchNorm ``weight``/``bias`` -> params ``scale``/``bias`` and ``running_mean``/
``running_var`` -> batch_stats ``mean``/``var``; ``num_batches_tracked`` is dropped. The MNIST
model flattens in NCHW order, so ``fc1`` needs no column permutation.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from advtrace._src import checks
from advtrace._src.models import registry
from advtrace._src.weights import check_variables
from third_party.deepsec import legacy_torch

# sha256 of the files as released in DEEPSEC (unchanged since commit 20281e9).
KNOWN_SHA256 = {
    "e04a324e60b10db2d0c09b8719f8535ba3a8a3b91ef2cf29f0458704f4857c38": "MNIST_raw.pt",
    "60e6798c68f2ad41007d284d282134c16195fc0ba86e2e7a4a7d3fbd61e91527": "CIFAR10_raw.pt",
}

INPUT_SHAPES = {
    "deepsec_mnist": (1, 28, 28, 1),
    "deepsec_resnet20": (1, 32, 32, 3),
}

_BN_LEAVES = {"running_mean": "mean", "running_var": "var"}


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 digest of a file."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def check_sha256(path: str | os.PathLike) -> str:
  """Returns the file's sha256 and warns (does not fail) if it is not a released DEEPSEC file.

  An unknown digest is allowed because users may load retrained weights in the same format.
  """
  digest = sha256_file(path)
  if digest not in KNOWN_SHA256:
    warnings.warn(
        f"{os.fspath(path)} has sha256 {digest}, which is not one of the released DEEPSEC "
        f"files ({', '.join(f'{v}: {k}' for k, v in KNOWN_SHA256.items())}). Proceeding: the "
        "weights are still checked against the model's shapes.", stacklevel=2)
  return digest


def detect_model(state_dict: Mapping[str, Any]) -> str:
  """Names the registered model that a DEEPSEC state dict belongs to, from its keys."""
  if "conv32.0.weight" in state_dict:
    return "deepsec_mnist"
  if "layer1.0.conv1.weight" in state_dict:
    return "deepsec_resnet20"
  raise ValueError(
      "unrecognised DEEPSEC state dict: expected the MNISTConvNet keys (conv32.0.weight, ...) "
      f"or the resnet20_cifar keys (layer1.0.conv1.weight, ...), got {list(state_dict)[:6]}...")


def _flax_path(torch_key: str) -> tuple[str, ...]:
  """Maps a PyTorch key to its Flax path (leaf still in PyTorch terms).

  Examples: ``conv32.0.weight`` -> ``conv32/conv_0/weight``; ``bn1.running_var`` ->
  ``stem/bn1/running_var``; ``layer2.0.downsample.1.bias`` -> ``layer2/block_0/downsample_bn/bias``.
  """
  key = re.sub(r"^(conv32|conv64)\.(\d+)\.", r"\1.conv_\2.", torch_key)
  key = re.sub(r"^(conv1|bn1)\.", r"stem.\1.", key)
  key = re.sub(r"^(layer\d)\.(\d+)\.", r"\1.block_\2.", key)
  key = key.replace("downsample.0.", "downsample_conv.").replace("downsample.1.", "downsample_bn.")
  return tuple(key.split("."))


def deepsec_to_flax(state_dict: Mapping[str, np.ndarray], model_name: str,
                    num_classes: int = 10) -> dict[str, Any]:
  """Converts a DEEPSEC PyTorch state dict into Flax variables for ``model_name``.

  Args:
    state_dict: name -> array in PyTorch layout, e.g. from
      ``third_party.deepsec.legacy_torch.load_state_dict``.
    model_name: ``'deepsec_mnist'`` or ``'deepsec_resnet20'``.
    num_classes: the number of output classes of the target model.

  Returns:
    ``{'params': ...}`` (plus ``'batch_stats'`` for the ResNet) of float32 NumPy arrays.

  Raises:
    ValueError: on an unknown model name, or when the converted tree does not match a freshly
      initialised model (missing, unexpected or wrongly shaped weights).
  """
  checks.check_choice(model_name, INPUT_SHAPES, "DEEPSEC model name")
  variables: dict[str, Any] = {}
  for name, value in state_dict.items():
    *scope, leaf = _flax_path(name)
    value = np.asarray(value)
    if leaf == "num_batches_tracked":
      continue
    if leaf in _BN_LEAVES:
      collection, leaf = "batch_stats", _BN_LEAVES[leaf]
    elif leaf == "weight":
      collection = "params"
      if value.ndim == 4:
        leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
      elif value.ndim == 2:
        leaf, value = "kernel", value.T  # (out, in) -> (in, out).
      else:
        leaf = "scale"  # BatchNorm weight.
    elif leaf == "bias":
      collection = "params"
    else:
      raise ValueError(f"unexpected state-dict entry {name!r} for {model_name}")
    node = variables.setdefault(collection, {})
    for part in scope:
      node = node.setdefault(part, {})
    if leaf in node:
      raise ValueError(f"state-dict entry {name!r} maps onto an already filled Flax leaf")
    node[leaf] = np.ascontiguousarray(value, dtype=np.float32)

  model = registry.get_model(model_name, num_classes=num_classes)
  check_variables(model, variables, INPUT_SHAPES[model_name], what="DEEPSEC weights")
  return variables


def load_deepsec(path: str | os.PathLike, model_name: str | None = None,
                 num_classes: int = 10) -> tuple[str, dict[str, Any]]:
  """Loads a DEEPSEC raw-model ``.pt`` file as Flax variables, without torch.

  Args:
    path: ``MNIST_raw.pt`` or ``CIFAR10_raw.pt`` from the DEEPSEC repository (or a retrained
      file in the same legacy format).
    model_name: force the target model; by default it is detected from the state-dict keys.
    num_classes: the number of output classes.

  Returns:
    ``(model_name, variables)``, ready for ``registry.get_model(model_name).apply``.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if the file is malformed or unsafe (``LegacyTorchError``), or its weights do
      not fit the model.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"DEEPSEC weights file {os.fspath(path)!r} not found. advtrace does not ship the "
        "weights: download RawModels/MNIST/model/MNIST_raw.pt or "
        "RawModels/CIFAR10/model/CIFAR10_raw.pt from https://github.com/ryderling/DEEPSEC "
        "and pass its path (a shared copy may sit in ../shared/weights/deepsec/).")
  check_sha256(path)
  state_dict = legacy_torch.load_state_dict(path)
  if model_name is None:
    model_name = detect_model(state_dict)
  return model_name, deepsec_to_flax(state_dict, model_name, num_classes)
