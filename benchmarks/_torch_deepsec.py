"""PyTorch helpers for the peer benchmarks: load the DEEPSEC MNIST CNN, count model queries.

The model itself is ``third_party.deepsec.torch_reference.MNISTConvNet``, shared with the
torch cross-check test. Never imported by advtrace.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from third_party.deepsec.torch_reference import MNISTConvNet


class NHWCWrapper(nn.Module):
  """Takes NHWC images (advtrace's layout) and feeds them to an NCHW model.

  Only used for cross-checks; the benchmarks hand torchattacks NCHW tensors directly.
  """

  def __init__(self, model: nn.Module):
    super().__init__()
    self.model = model

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.model(x.permute(0, 3, 1, 2))


class CountingModel(nn.Module):
  """Counts forward calls and forwarded rows (the work a torch attack actually did)."""

  def __init__(self, model: nn.Module):
    super().__init__()
    self.model = model
    self.calls = 0
    self.rows = 0

  def reset(self) -> None:
    self.calls = 0
    self.rows = 0

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    self.calls += 1
    self.rows += int(x.shape[0])
    return self.model(x)


class PositiveLogits(nn.Module):
  """Shifts each example's logits so that all are >= 1 (``z - min(z) + 1``).

  torchattacks' CW masks the label logit by multiplying it with zero, which picks the wrong
  class when every logit is negative (DEEPSEC's models return ``logits - max <= 0``;
  torchattacks issue #184). A per-example shift leaves the CW margin, and its gradient, exactly
  unchanged.
  """

  def __init__(self, model: nn.Module):
    super().__init__()
    self.model = model

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    z = self.model(x)
    return z - z.min(dim=1, keepdim=True)[0].detach() + 1.0


def load_mnist_raw(path: str | os.PathLike) -> MNISTConvNet:
  """Loads the released ``MNIST_raw.pt`` (a legacy ``torch.save`` of a state dict), eval mode.

  ``weights_only=True`` restricts unpickling to tensors and plain containers; the file's storages
  are tagged ``cuda:0``, so they are mapped to the CPU.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"DEEPSEC weights {os.fspath(path)!r} not found; pass --weights with the path of "
        "RawModels/MNIST/model/MNIST_raw.pt (a shared copy may be in ../shared/weights/deepsec/).")
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  model = MNISTConvNet()
  model.load_state_dict(state_dict)
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  return model
