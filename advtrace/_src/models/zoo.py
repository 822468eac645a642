"""Model zoo at small-input scale (8x8, 28x28 and 32x32 images).

Every model follows the convention of :mod:`advtrace._src.models.registry`: a Flax module with
``__call__(x, train=False, *, start=None, stop=None)`` over NHWC images in [0, 1], returning
logits, and a class attribute ``stages`` naming its stages in execution order. The staging logic
lives in one place, :func:`run_stages`.

Each stage that owns variables owns them under a top-level collection key equal to the stage name
(``variables['params']['stage1']`` holds every parameter of stage ``stage1``). The variables of a
split model's head are therefore the entries keyed by ``stages[:i + 1]``.

Small-input adaptations (following ``shared/notes/attribution.md`` section 4.2 and
``shared/notes/tracing.md`` section 2.2):

- ResNets are the CIFAR variants: a 3x3 stride-1 stem and no stem max-pool.
- VGG and AlexNet use 3x3 convolutions and 2x2 max-pools throughout, and end in a small classifier.
- ``min_size``: ResNets, VGGs and AlexNet zero-pad images smaller than ``min_size`` (32 by default)
  symmetrically up to ``min_size`` inside their first stage. MNIST digits (28x28) thus follow the
  same path as CIFAR-10 images, and VGG's five 2x2 pools do not underflow (28 -> 14 -> 7 -> 3 -> 1
  -> 0 without padding). Zero is the MNIST background, so the padding adds no edge. Pass
  ``min_size=0`` to disable it.
- VGG heads apply a global average pool before the classifier; at 32x32 the last feature map is
  1x1, so this equals the usual flatten.

BatchNorm uses PyTorch's defaults (momentum 0.9 for the running average, epsilon 1e-5) and batch
statistics when ``train=True`` (pass ``mutable=['batch_stats']``). Dropout is active only when
``train=True`` and then needs a ``'dropout'`` PRNG key. Convolutions use He-normal (fan-out)
initialisation, as torchvision does for VGG and ResNet; without it the 13 BatchNorm-free
convolutions of VGG16 shrink the signal by about 2^13.

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
  https://arxiv.org/abs/1512.03385

  Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
  ICLR 2015. https://arxiv.org/abs/1409.1556

  Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional Neural
  Networks", NeurIPS 2012.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from advtrace._src.models import layers
from advtrace._src.models.registry import register

Stage = tuple[str, Callable[[jax.Array], jax.Array]]

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def run_stages(
    stages: Sequence[Stage],
    x: jax.Array,
    start: str | None = None,
    stop: str | None = None,
) -> jax.Array:
  """Runs the named stages strictly after ``start`` up to and including ``stop``.

  Args:
    stages: ``(name, fn)`` pairs in execution order; each ``fn`` maps an activation to the next.
    x: the model input when ``start`` is None, else the activation right after stage ``start``.
    start: run from the stage after this one; None runs from the first stage.
    stop: stop after this stage and return its activation; None runs to the last stage.

  Returns:
    The activation after ``stop`` (the logits when ``stop`` is None). If ``start == stop``, ``x``
    is returned unchanged.

  Raises:
    ValueError: if ``start`` or ``stop`` is not a stage name, if ``stop`` comes before ``start``,
      or if stage names repeat.
  """
  names = [name for name, _ in stages]
  if len(set(names)) != len(names):
    raise ValueError(f"stage names must be unique, got {names}.")

  def index(name, arg):
    if name not in names:
      raise ValueError(f"Unknown {arg} stage {name!r}. Valid stages, in order: "
                       f"{', '.join(names)}.")
    return names.index(name)

  lo = 0 if start is None else index(start, "start") + 1
  hi = len(names) if stop is None else index(stop, "stop") + 1
  if hi < lo:
    raise ValueError(f"stop={stop!r} comes before start={start!r}; stages run in the order "
                     f"{', '.join(names)}.")
  for _, fn in stages[lo:hi]:
    x = fn(x)
  return x


def _pad_to(x: jax.Array, size: int) -> jax.Array:
  """Zero-pads the spatial axes of an NHWC batch symmetrically up to ``size`` (never crops)."""
  pad_h = max(size - x.shape[1], 0)
  pad_w = max(size - x.shape[2], 0)
  if not pad_h and not pad_w:
    return x
  return jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                     (0, 0)))


_max_pool = layers.max_pool_2x2


def _global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def _batch_norm(**kwargs) -> nn.BatchNorm:
  return nn.BatchNorm(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, **kwargs)


class _StagedModule(nn.Module):
  """Base class: subclasses define ``stages`` and ``_stage_fns(train)``; ``__call__`` is shared."""

  stages = ()

  def _stage_fns(self, train: bool) -> list[Stage]:
    raise NotImplementedError

  def _check_config(self) -> None:
    for field in ("num_classes", "width"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(self).__name__}.{field} must be a positive int, got {value!r}.")

  def __call__(
      self,
      x: jax.Array,
      train: bool = False,
      *,
      start: str | None = None,
      stop: str | None = None,
  ) -> jax.Array:
    """Runs the stages after ``start`` through ``stop`` (the whole model by default).

    Args:
      x: NHWC images in [0, 1] when ``start`` is None, else the activation after ``start``.
      train: training mode (batch statistics, dropout).
      start: see :func:`run_stages`.
      stop: see :func:`run_stages`.

    Returns:
      Logits of shape ``[batch, num_classes]``, or the activation after ``stop``.
    """
    if start is None and jnp.ndim(x) != 4:
      raise ValueError(
          f"{type(self).__name__} expects NHWC images (batch, height, width, channels), got "
          f"shape {jnp.shape(x)}. Add a batch axis with x[None] for a single image.")
    fns = self._stage_fns(train)
    assert tuple(name for name, _ in fns) == tuple(self.stages), "stages out of sync"
    return run_stages(fns, x, start, stop)


def _conv(features: int, kernel: int = 3, strides: int = 1, use_bias: bool = True,
          name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                 use_bias=use_bias, kernel_init=_conv_init, name=name)


# ------------------------------------------------------------------------------------------------
# Small CNN
# ------------------------------------------------------------------------------------------------


@register("small_cnn")
class SmallCNN(_StagedModule):
  """A small, fast CNN for quick starts and tests.

  conv3x3(width) -> ReLU -> [maxpool 2] -> conv3x3(2 width) -> ReLU -> [maxpool 2] -> flatten
  -> dense(4 width) -> ReLU -> dense(num_classes). Each max-pool runs only while the feature map
  is at least 8 pixels high and wide, so 8x8 inputs pool once (8 -> 4) and 28x28 or 32x32 inputs
  twice.

  Attributes:
    num_classes: number of output logits.
    width: channels of the first convolution (default 16: 16, 32 channels and a 64-unit layer).
  """

  num_classes: int = 10
  width: int = 16

  stages = ("conv1", "conv2", "flatten", "fc1", "logits")

  def setup(self):
    self._check_config()
    self.conv1 = _conv(self.width)
    self.conv2 = _conv(2 * self.width)
    self.fc1 = nn.Dense(4 * self.width)
    self.logits = nn.Dense(self.num_classes)

  def _stage_fns(self, train):
    del train

    def conv_block(conv):
      def fn(x):
        x = nn.relu(conv(x))
        return _max_pool(x) if min(x.shape[1:3]) >= 8 else x
      return fn

    return [
        ("conv1", conv_block(self.conv1)),
        ("conv2", conv_block(self.conv2)),
        ("flatten", _flatten),
        ("fc1", lambda x: nn.relu(self.fc1(x))),
        ("logits", self.logits),
    ]


# ------------------------------------------------------------------------------------------------
# ResNets (CIFAR variants)
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
  """Two 3x3 conv + BN layers with an identity or 1x1 conv + BN projection shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    y = _conv(self.features, 3, self.strides, use_bias=False)(x)
    y = nn.relu(_batch_norm()(y, use_running_average=ura))
    y = _conv(self.features, 3, 1, use_bias=False)(y)
    y = _batch_norm()(y, use_running_average=ura)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.strides, use_bias=False, name="shortcut_conv")(x)
      x = _batch_norm(name="shortcut_bn")(x, use_running_average=ura)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (4x expansion) conv + BN layers with a projection shortcut."""

  features: int
  strides: int = 1
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    out = self.expansion * self.features
    y = _conv(self.features, 1, 1, use_bias=False)(x)
    y = nn.relu(_batch_norm()(y, use_running_average=ura))
    y = _conv(self.features, 3, self.strides, use_bias=False)(y)
    y = nn.relu(_batch_norm()(y, use_running_average=ura))
    y = _conv(out, 1, 1, use_bias=False)(y)
    y = _batch_norm()(y, use_running_average=ura)
    if self.strides != 1 or x.shape[-1] != out:
      x = _conv(out, 1, self.strides, use_bias=False, name="shortcut_conv")(x)
      x = _batch_norm(name="shortcut_bn")(x, use_running_average=ura)
    return nn.relu(y + x)


class _ResNetStem(nn.Module):
  features: int
  min_size: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _pad_to(x, self.min_size)
    x = _conv(self.features, 3, 1, use_bias=False)(x)
    return nn.relu(_batch_norm()(x, use_running_average=not train))


class _ResNetStage(nn.Module):
  block: type[nn.Module]
  features: int
  num_blocks: int
  strides: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      x = self.block(self.features, self.strides if i == 0 else 1, name=f"block{i + 1}")(x, train)
    return x


class _ResNet(_StagedModule):
  """CIFAR-style ResNet: 3x3 stride-1 stem, four stages, global average pool, dense."""

  stages = ("stem", "stage1", "stage2", "stage3", "stage4", "pool", "logits")
  block = BasicBlock

  def setup(self):
    self._check_config()
    if len(self.stage_sizes) != 4 or any(int(n) < 1 for n in self.stage_sizes):
      raise ValueError(f"{type(self).__name__}.stage_sizes must be 4 positive block counts, got "
                       f"{self.stage_sizes!r}.")
    self.stem = _ResNetStem(self.width, self.min_size)
    kw = dict(block=self.block)
    self.stage1 = _ResNetStage(features=self.width, num_blocks=self.stage_sizes[0], strides=1,
                               **kw)
    self.stage2 = _ResNetStage(features=2 * self.width, num_blocks=self.stage_sizes[1], strides=2,
                               **kw)
    self.stage3 = _ResNetStage(features=4 * self.width, num_blocks=self.stage_sizes[2], strides=2,
                               **kw)
    self.stage4 = _ResNetStage(features=8 * self.width, num_blocks=self.stage_sizes[3], strides=2,
                               **kw)
    self.logits = nn.Dense(self.num_classes)

  def _stage_fns(self, train):
    return [
        ("stem", lambda x: self.stem(x, train)),
        ("stage1", lambda x: self.stage1(x, train)),
        ("stage2", lambda x: self.stage2(x, train)),
        ("stage3", lambda x: self.stage3(x, train)),
        ("stage4", lambda x: self.stage4(x, train)),
        ("pool", _global_avg_pool),
        ("logits", self.logits),
    ]


@register("resnet18")
class ResNet18(_ResNet):
  """ResNet-18, CIFAR variant (11.17M parameters for 10 classes at the default width).

  Stem conv3x3(width, stride 1) + BN + ReLU; four stages of BasicBlocks with width x (1, 2, 4, 8)
  channels and strides (1, 2, 2, 2); global average pool; dense. The stem plus ``stage1`` is the
  per-copy head of the tracing paper (149,824 parameters).

  Attributes:
    num_classes: number of output logits.
    width: channels of the stem and of ``stage1`` (64 in the paper).
    stage_sizes: BasicBlocks per stage.
    min_size: smaller inputs are zero-padded up to this size (0 disables it).
  """

  num_classes: int = 10
  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  min_size: int = 32

  block = BasicBlock


@register("resnet50")
class ResNet50(_ResNet):
  """ResNet-50, CIFAR variant (23.5M parameters for 10 classes at the default width).

  As :class:`ResNet18` but with Bottleneck blocks (expansion 4), [3, 4, 6, 3] per stage, and
  stride on the 3x3 convolution.

  Attributes:
    num_classes: number of output logits.
    width: bottleneck channels of ``stage1`` (64; its output has 4 x width channels).
    stage_sizes: Bottleneck blocks per stage.
    min_size: smaller inputs are zero-padded up to this size (0 disables it).
  """

  num_classes: int = 10
  width: int = 64
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  min_size: int = 32

  block = Bottleneck


# ------------------------------------------------------------------------------------------------
# VGG
# ------------------------------------------------------------------------------------------------

_VGG16_BLOCKS = ((1, 1), (2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8))  # channels in units of width


class _VGGBlock(nn.Module):
  """Convolutions (each 3x3 + optional BN + ReLU) followed by a 2x2 max-pool."""

  features: Sequence[int]
  use_bn: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for f in self.features:
      x = _conv(f)(x)
      if self.use_bn:
        x = _batch_norm()(x, use_running_average=not train)
      x = nn.relu(x)
    return _max_pool(x)


class _VGGFeatures(_StagedModule):
  """The five convolutional blocks shared by VGG16 and VGG16-BN."""

  def _setup_blocks(self, use_bn: bool) -> None:
    self._check_config()
    w = self.width
    blocks = [_VGGBlock(tuple(m * w for m in cfg), use_bn) for cfg in _VGG16_BLOCKS]
    self.block1, self.block2, self.block3, self.block4, self.block5 = blocks

  def _block_fns(self, train: bool) -> list[Stage]:
    return [
        ("block1", lambda x: self.block1(_pad_to(x, self.min_size), train)),
        ("block2", lambda x: self.block2(x, train)),
        ("block3", lambda x: self.block3(x, train)),
        ("block4", lambda x: self.block4(x, train)),
        ("block5", lambda x: self.block5(x, train)),
        ("pool", _global_avg_pool),
    ]


@register("vgg16_bn")
class VGG16BN(_VGGFeatures):
  """VGG16 with BatchNorm, CIFAR variant: 13 conv3x3 + BN + ReLU layers, then dense(num_classes).

  Blocks of width x [1, 1 | 2, 2 | 4, 4, 4 | 8, 8, 8 | 8, 8, 8] channels, each ending in a 2x2
  max-pool (32 -> 1), then a global average pool and one dense layer, as in the tracing paper.
  ``block1`` is the tracing paper's per-copy head (38,976 parameters).

  Attributes:
    num_classes: number of output logits.
    width: channels of ``block1`` (64).
    min_size: smaller inputs are zero-padded up to this size (0 disables it).
  """

  num_classes: int = 10
  width: int = 64
  min_size: int = 32

  stages = ("block1", "block2", "block3", "block4", "block5", "pool", "logits")

  def setup(self):
    self._setup_blocks(use_bn=True)
    self.logits = nn.Dense(self.num_classes)

  def _stage_fns(self, train):
    return self._block_fns(train) + [("logits", self.logits)]


@register("vgg16")
class VGG16(_VGGFeatures):
  """VGG16 without BatchNorm, CIFAR variant, for the attack-attribution paper.

  The 13 conv3x3 + ReLU layers of :class:`VGG16BN`, a global average pool, then the small-input
  classifier dropout -> dense(8 width) -> ReLU -> dropout -> dense(8 width) -> ReLU ->
  dense(num_classes) (512-unit layers at the default width).

  Attributes:
    num_classes: number of output logits.
    width: channels of ``block1`` (64).
    dropout_rate: dropout before each hidden dense layer when ``train=True``.
    min_size: smaller inputs are zero-padded up to this size (0 disables it).
  """

  num_classes: int = 10
  width: int = 64
  dropout_rate: float = 0.5
  min_size: int = 32

  stages = ("block1", "block2", "block3", "block4", "block5", "pool", "fc1", "fc2", "logits")

  def setup(self):
    self._setup_blocks(use_bn=False)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.fc1 = nn.Dense(8 * self.width)
    self.fc2 = nn.Dense(8 * self.width)
    self.logits = nn.Dense(self.num_classes)

  def _stage_fns(self, train):
    def fc(dense):
      return lambda x: nn.relu(dense(self.dropout(x, deterministic=not train)))

    return self._block_fns(train) + [
        ("fc1", fc(self.fc1)),
        ("fc2", fc(self.fc2)),
        ("logits", self.logits),
    ]


# ------------------------------------------------------------------------------------------------
# AlexNet
# ------------------------------------------------------------------------------------------------


@register("alexnet")
class AlexNet(_StagedModule):
  """AlexNet adapted to 32x32 inputs, for the attack-attribution paper.

  The paper (Dotter et al. 2021) trains AlexNet from scratch on CIFAR-10 and MNIST but gives no
  adaptation. We follow ``shared/notes/attribution.md`` section 4.2: torchvision's five
  convolutions (64-192-384-256-256 channels) all made 3x3 stride 1 (+ ReLU), a 2x2 max-pool after
  conv1, conv2 and conv5 (32 -> 16 -> 8 -> 4), flatten (4 x 4 x 256), then torchvision's
  classifier shrunk to 512 units: dropout -> dense 512 -> ReLU -> dropout -> dense 512 -> ReLU ->
  dense(num_classes). No local response normalisation, as in torchvision.

  Attributes:
    num_classes: number of output logits.
    width: channels of conv1; the others are width x (3, 6, 4, 4) and the hidden layers 8 width.
    dropout_rate: dropout before each hidden dense layer when ``train=True``.
    min_size: smaller inputs are zero-padded up to this size (0 disables it).
  """

  num_classes: int = 10
  width: int = 64
  dropout_rate: float = 0.5
  min_size: int = 32

  stages = ("conv1", "conv2", "conv3", "conv4", "conv5", "flatten", "fc1", "fc2", "logits")

  def setup(self):
    self._check_config()
    w = self.width
    self.conv1 = _conv(w)
    self.conv2 = _conv(3 * w)
    self.conv3 = _conv(6 * w)
    self.conv4 = _conv(4 * w)
    self.conv5 = _conv(4 * w)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.fc1 = nn.Dense(8 * w)
    self.fc2 = nn.Dense(8 * w)
    self.logits = nn.Dense(self.num_classes)

  def _stage_fns(self, train):
    def fc(dense):
      return lambda x: nn.relu(dense(self.dropout(x, deterministic=not train)))

    return [
        ("conv1", lambda x: _max_pool(nn.relu(self.conv1(_pad_to(x, self.min_size))))),
        ("conv2", lambda x: _max_pool(nn.relu(self.conv2(x)))),
        ("conv3", lambda x: nn.relu(self.conv3(x))),
        ("conv4", lambda x: nn.relu(self.conv4(x))),
        ("conv5", lambda x: _max_pool(nn.relu(self.conv5(x)))),
        ("flatten", _flatten),
        ("fc1", fc(self.fc1)),
        ("fc2", fc(self.fc2)),
        ("logits", self.logits),
    ]
