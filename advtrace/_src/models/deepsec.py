"""The DEEPSEC raw victim models: the MNIST CNN and the CIFAR-10 ResNet-20.

Both are ports of the PyTorch models of DEEPSEC (``RawModels/MNISTConv.py`` and
``RawModels/ResNet.py``), laid out so that :mod:`advtrace._src.models.deepsec_weights` can import
the released weights. They take NHWC float images in [0, 1] (no mean/std normalisation) and,
like DEEPSEC's current code, return ``logits - max(logits)``: softmax, argmax and logit
differences are unchanged, but gradients of single logits (JSMA's Jacobian) are not.
``shift_by_max=False`` gives the raw logits of DEEPSEC's first release (commit ``20281e9``), with
which JSMA reproduces seed-003's MNIST number (docs/results/attacks_deepsec_mnist.md).

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from advtrace._src.models import layers
from advtrace._src.models.registry import register
from advtrace._src.models.zoo import run_stages

# PyTorch's default Conv2d/Linear init: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# DEEPSEC's ResNet init: N(0, 2 / (k * k * out_channels)) for every conv.
_resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1; 'SAME' would pad (0, 1) for stride 2.


def _torch_bias_init(fan_in: int) -> Callable:
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(fan_in),
                  name=name)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class _ShiftedOutput:
  """The shared output rule of both DEEPSEC models (see the module docstring)."""

  shift_by_max: bool

  def _output(self, logits: jax.Array) -> jax.Array:
    if not self.shift_by_max:
      return logits
    return logits - jnp.max(logits, axis=-1, keepdims=True)


class _ConvPool(nn.Module):
  """Two VALID 3x3 convs with bias and ReLU, then a 2x2 max-pool (``conv32`` / ``conv64``)."""

  features: int

  @nn.compact
  def __call__(self, x):
    for name in ("conv_0", "conv_2"):  # PyTorch Sequential indices 0 and 2.
      x = nn.Conv(self.features, (3, 3), padding="VALID", kernel_init=_torch_kernel_init,
                  bias_init=_torch_bias_init(9 * x.shape[-1]), name=name)(x)
      x = nn.relu(x)
    return layers.max_pool_2x2(x)


@register("deepsec_mnist")
class DeepSecMNISTCNN(_ShiftedOutput, nn.Module):
  """DEEPSEC's ``MNISTConvNet``: 4 conv + 3 FC layers (312,202 parameters).

  Stages (each owns ``variables['params'][stage]``): ``conv32`` (two VALID 3x3 convs with 32
  channels, ReLU, 2x2 max-pool: 12x12x32), ``conv64`` (the same with 64 channels: 4x4x64),
  ``fc1`` (flatten, 1024 -> 200, ReLU, dropout 0.5 when ``train``), ``fc2`` (200 -> 200, ReLU),
  ``fc3`` (200 -> classes, minus the max).

  ``fc1`` flattens in channel-major (C, H, W) order, exactly like PyTorch's NCHW flatten, so
  the released ``fc1.weight`` imports with a plain transpose (no column permutation). Training
  mode needs a ``'dropout'`` PRNG key.
  """

  num_classes: int = 10
  shift_by_max: bool = True
  stages = ("conv32", "conv64", "fc1", "fc2", "fc3")

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: str | None = None,
               stop: str | None = None):

    def fc1(h):
      h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # NCHW flatten.
      h = nn.relu(_torch_dense(200, h.shape[-1], "fc1")(h))
      return nn.Dropout(0.5, deterministic=not train)(h)  # Dropout2d on (N, 200): element-wise.

    stages = (
        ("conv32", lambda h: _ConvPool(32, name="conv32")(h)),
        ("conv64", lambda h: _ConvPool(64, name="conv64")(h)),
        ("fc1", fc1),
        ("fc2", lambda h: nn.relu(_torch_dense(200, h.shape[-1], "fc2")(h))),
        ("fc3", lambda h: self._output(_torch_dense(self.num_classes, h.shape[-1], "fc3")(h))),
    )
    return run_stages(stages, x, start, stop)


class _BasicBlock(nn.Module):
  """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus a shortcut, then ReLU."""

  features: int
  stride: int = 1
  project: bool = False  # 1x1 conv (with bias) + BN shortcut, as in DEEPSEC's `downsample`.

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = (self.stride, self.stride)
    h = nn.Conv(self.features, (3, 3), s, padding=_PAD1, use_bias=False,
                kernel_init=_resnet_conv_init, name="conv1")(x)
    h = nn.relu(_batch_norm(train, "bn1")(h))
    h = nn.Conv(self.features, (3, 3), padding=_PAD1, use_bias=False,
                kernel_init=_resnet_conv_init, name="conv2")(h)
    h = _batch_norm(train, "bn2")(h)
    if self.project:
      x = nn.Conv(self.features, (1, 1), s, padding="VALID", kernel_init=_resnet_conv_init,
                  bias_init=_torch_bias_init(x.shape[-1]), name="downsample_conv")(x)
      x = _batch_norm(train, "downsample_bn")(x)
    return nn.relu(h + x)


class _ResNetStem(nn.Module):
  """3x3 conv (pad 1, with bias) -> BN -> ReLU."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), padding=_PAD1, kernel_init=_resnet_conv_init,
                bias_init=_torch_bias_init(9 * x.shape[-1]), name="conv1")(x)
    return nn.relu(_batch_norm(train, "bn1")(x))


class _ResNetLayer(nn.Module):
  """Three BasicBlocks; the first strides and projects its shortcut when ``stride > 1``."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j in range(3):
      stride = self.stride if j == 0 else 1
      x = _BasicBlock(self.features, stride, project=stride != 1, name=f"block_{j}")(x, train)
    return x


@register("deepsec_resnet20")
class DeepSecResNet20(_ShiftedOutput, nn.Module):
  """DEEPSEC's ``resnet20_cifar``: ``ResNet_Cifar(BasicBlock, [3, 3, 3])`` (272,586 parameters).

  Stages (each owns ``variables[collection][stage]``): ``stem`` (3x3 conv with bias, BN, ReLU:
  32x32x16), ``layer1`` (3 blocks, 16 channels), ``layer2`` (3 blocks, 32 channels, the first
  with stride 2 and a 1x1-conv + BN projection shortcut), ``layer3`` (the same with 64
  channels: 8x8x64), ``pool`` (global average: 64), ``fc`` (64 -> classes, minus the max).

  Every 3x3 conv pads (1, 1) on both sides like PyTorch; BatchNorm uses eps 1e-5 and Flax
  momentum 0.9 (PyTorch momentum 0.1). With ``train=False`` BatchNorm uses its running stats;
  with ``train=True`` pass ``mutable=['batch_stats']`` to ``apply``.
  """

  num_classes: int = 10
  shift_by_max: bool = True
  stages = ("stem", "layer1", "layer2", "layer3", "pool", "fc")

  @nn.compact
  def __call__(self, x, train: bool = False, *, start: str | None = None,
               stop: str | None = None):
    stages = (
        ("stem", lambda h: _ResNetStem(name="stem")(h, train)),
        ("layer1", lambda h: _ResNetLayer(16, 1, name="layer1")(h, train)),
        ("layer2", lambda h: _ResNetLayer(32, 2, name="layer2")(h, train)),
        ("layer3", lambda h: _ResNetLayer(64, 2, name="layer3")(h, train)),
        ("pool", lambda h: jnp.mean(h, axis=(1, 2))),
        ("fc", lambda h: self._output(_torch_dense(self.num_classes, h.shape[-1], "fc")(h))),
    )
    return run_stages(stages, x, start, stop)
