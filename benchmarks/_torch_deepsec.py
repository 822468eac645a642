"""DEEPSEC's MNIST CNN in PyTorch, for the peer benchmarks only (never imported by advtrace).

Written from ``shared/notes/deepsec.md`` section 1.1 (``RawModels/MNISTConv.py``, class
``MNISTConvNet``): 4 VALID 3x3 convs with bias and ReLU, two 2x2 max-pools, NCHW flatten, three
linear layers, dropout (identity at eval) and ``logits - max(logits)``. The state-dict keys match
the released ``MNIST_raw.pt``, so the file loads with ``torch.load(..., weights_only=True)``.

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F


class MNISTConvNet(nn.Module):
  """DEEPSEC ``MNISTConvNet`` (312,202 parameters). Input NCHW float in [0, 1]."""

  def __init__(self):
    super().__init__()
    self.conv32 = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
                                nn.MaxPool2d(2))
    self.conv64 = nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
                                nn.MaxPool2d(2))
    self.fc1 = nn.Linear(4 * 4 * 64, 200)
    self.dropout = nn.Dropout(p=0.5)
    self.fc2 = nn.Linear(200, 200)
    self.fc3 = nn.Linear(200, 10)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv64(self.conv32(x)).reshape(-1, 4 * 4 * 64)
    out = self.dropout(F.relu(self.fc1(out)))
    out = self.fc3(F.relu(self.fc2(out)))
    return out - torch.max(out, dim=1, keepdim=True)[0]


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
