"""DEEPSEC's victim models in PyTorch: the independent reference for cross-checks and benchmarks.

Written from the model descriptions (``RawModels/MNISTConv.py`` and ``RawModels/ResNet.py``),
not from advtrace's Flax code, so that agreement between the two is evidence. The state-dict
keys match the released ``MNIST_raw.pt`` / ``CIFAR10_raw.pt``, which load with
``torch.load(path, weights_only=True)``. Needs the optional ``bench`` extra (torch); advtrace
itself never imports this module.

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MNISTConvNet(nn.Module):
  """``RawModels/MNISTConv.py`` ``MNISTConvNet`` (312,202 parameters). Input NCHW in [0, 1]."""

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

  def forward(self, x):
    # DEEPSEC uses .view; .reshape flattens in the same (C, H, W) order and also accepts the
    # non-contiguous float64 activations of the reference run.
    out = self.conv64(self.conv32(x)).reshape(-1, 4 * 4 * 64)
    out = self.dropout(F.relu(self.fc1(out)))
    out = self.fc3(F.relu(self.fc2(out)))
    return out - torch.max(out, dim=1, keepdim=True)[0]


class BasicBlock(nn.Module):

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(out + residual)


class ResNetCifar(nn.Module):
  """``RawModels/ResNet.py`` ``resnet20_cifar``. Input NCHW in [0, 1]."""

  def __init__(self):
    super().__init__()
    self.inplanes = 16
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=True)
    self.bn1 = nn.BatchNorm2d(16)
    self.layer1 = self._make_layer(16, 1)
    self.layer2 = self._make_layer(32, 2)
    self.layer3 = self._make_layer(64, 2)
    self.fc = nn.Linear(64, 10)

  def _make_layer(self, planes, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=True),
                                 nn.BatchNorm2d(planes))
    layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes
    layers += [BasicBlock(planes, planes) for _ in range(2)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = self.fc(x.mean(dim=(2, 3)))
    return x - torch.max(x, dim=1, keepdim=True)[0]
