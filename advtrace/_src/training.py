"""A generic, jitted optax training and evaluation loop with resumable orbax checkpoints.

The loop reproduces the DEEPSEC training recipes (``RawModels/train_mnist.py`` and
``RawModels/train_cifar10.py``): a 90/10 train/validation split, SGD with Nesterov momentum and
L2 weight decay or Adam with a piecewise-constant schedule, optional random translation and
horizontal flips, and keeping the checkpoint with the best validation accuracy.

Layout of a workdir written by :func:`train_and_evaluate`::

  <workdir>/checkpoints/model.json      model name, num_classes, input shape (for restore)
  <workdir>/checkpoints/best/<epoch>/   {'params', 'batch_stats'} of the best validation epoch
  <workdir>/checkpoints/latest/<epoch>/ full train state + progress, for resumption
  <workdir>/results.json, results.md    final metrics

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from advtrace._src import atomic
from advtrace._src import batching
from advtrace._src import checks
from advtrace._src import xla
from advtrace._src.models import registry

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
Variables = Mapping[str, Any]

_CHECKPOINT_DIR = "checkpoints"
_METADATA_FILE = "model.json"


def default_config() -> ml_collections.ConfigDict:
  """The full training config schema with defaults; experiment configs override fields.

  Returns:
    A ConfigDict with these fields:
      dataset: a name known to ``advtrace.data.load`` ('mnist', 'cifar10', 'digits') or an .npz.
      data_dir: tfds data dir; None uses ``TFDS_DATA_DIR`` / the data module's default.
      valid_fraction, split_seed: the DEEPSEC train/validation split.
      max_train_examples: use only the first N training examples after the split (0 = all).
      model, model_kwargs: a registered model name and extra constructor arguments.
      optimizer: 'sgd' (momentum, nesterov) or 'adam'; learning_rate; weight_decay (L2 added to
        the gradient before the optimizer, as torch's ``weight_decay``).
      lr_schedule: 'constant' or 'piecewise'; lr_boundaries_epochs are 0-based epoch indices
        after which the learning rate is multiplied by the matching lr_scales entry;
        lr_floor is a lower bound on the learning rate.
      augment: 'none' or 'translate_flip'; translate: maximum shift as a fraction of the size.
      num_epochs, batch_size, eval_batch_size, seed, log_every_steps.
      keep_latest: how many latest checkpoints to keep (the best one is always kept).
  """
  config = ml_collections.ConfigDict()
  config.dataset = "digits"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.valid_fraction = 0.1
  config.split_seed = 100
  config.max_train_examples = 0
  config.model = "small_cnn"
  config.model_kwargs = ml_collections.ConfigDict()
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 0.0
  config.lr_schedule = "constant"
  config.lr_boundaries_epochs = ()
  config.lr_scales = ()
  config.lr_floor = 0.0
  config.augment = "none"
  config.translate = 0.1
  config.num_epochs = 10
  config.batch_size = 100
  config.eval_batch_size = 500
  config.seed = 100
  config.log_every_steps = 200
  config.keep_latest = 1
  return config


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. ``batch_stats`` is ``{}`` for models without BN."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  key: jax.Array


def variables_of(state: TrainState) -> dict[str, Any]:
  """The Flax variables (``params`` and, if any, ``batch_stats``) of a train state."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    input_shape: tuple[int, ...],
) -> TrainState:
  """Initialises a model and its optimizer.

  Args:
    model: a Flax module called as ``model(x, train=...)``.
    tx: the optimizer.
    key: a typed PRNG key; split into the init key and the per-step training key.
    input_shape: the shape of one example, (H, W, C).

  Returns:
    The initial train state at step 0.
  """
  return _create_train_state(model, tx, key, tuple(input_shape))


@functools.partial(xla.jit, static_argnums=(0, 1, 3))
def _create_train_state(model, tx, key, input_shape):
  # Jitted: eager Flax init compiles every op separately, which takes seconds.
  init_key, train_key = jax.random.split(key)
  variables = registry.init_variables(model, init_key, (1, *input_shape))
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      key=train_key)


# ----------------------------------------------------------------------------- augmentation


def identity_augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """No augmentation (DEEPSEC MNIST)."""
  del key
  return x


def _translate_flip_one(key: jax.Array, image: jax.Array, translate: float, flip: bool):
  h, w, _ = image.shape
  max_dy, max_dx = translate * h, translate * w
  pad_y, pad_x = int(np.floor(max_dy + 0.5)), int(np.floor(max_dx + 0.5))
  k_dx, k_dy, k_flip = jax.random.split(key, 3)
  # torchvision RandomAffine: shift = round(uniform(-max, max)) pixels, zero fill.
  dx = jnp.round(jax.random.uniform(k_dx, minval=-max_dx, maxval=max_dx)).astype(jnp.int32)
  dy = jnp.round(jax.random.uniform(k_dy, minval=-max_dy, maxval=max_dy)).astype(jnp.int32)
  padded = jnp.pad(image, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)))
  shifted = jax.lax.dynamic_slice(padded, (pad_y - dy, pad_x - dx, 0), image.shape)
  if not flip:
    return shifted
  return jnp.where(jax.random.bernoulli(k_flip), shifted[:, ::-1], shifted)


def random_translate_flip(
    key: jax.Array, x: jax.Array, *, translate: float = 0.1, flip: bool = True
) -> jax.Array:
  """Random integer translation with zero fill, then a random horizontal flip (per example).

  The pure-JAX equivalent of DEEPSEC CIFAR-10's torchvision transform
  ``Compose([RandomAffine(degrees=0, translate=(0.1, 0.1)), RandomHorizontalFlip()])``: each
  image is shifted by ``round(U(-translate * size, translate * size))`` pixels along each axis
  (positive ``dx`` moves content right), vacated pixels are 0, and it is mirrored left-right with
  probability 1/2.

  Args:
    key: a typed PRNG key; example ``i`` uses ``fold_in(key, i)``.
    x: images, NHWC.
    translate: the maximum shift as a fraction of the height/width.
    flip: whether to apply random horizontal flips.

  Returns:
    Augmented images with the shape and dtype of ``x``; values stay within the range of ``x``
    and 0.
  """
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(x.shape[0]))
  one = functools.partial(_translate_flip_one, translate=translate, flip=flip)
  return jax.vmap(one)(keys, x)


@functools.lru_cache(maxsize=None)  # The same function object lets jit reuse compilations.
def get_augment(name: str, translate: float = 0.1) -> AugmentFn:
  """Returns the augmentation ``(key, x) -> x`` called ``name`` ('none' or 'translate_flip')."""
  checks.check_choice(name, ("none", "translate_flip"), "augmentation")
  if name == "none":
    return identity_augment
  return functools.partial(random_translate_flip, translate=translate)


# ----------------------------------------------------------------------------- optimizers


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of ``config`` in optimizer steps.

  For 'piecewise', the rate is multiplied by ``lr_scales[i]`` once 0-based epoch
  ``lr_boundaries_epochs[i]`` has finished, i.e. from step ``(e + 1) * steps_per_epoch`` on.
  This is when DEEPSEC's ``adjust_learning_rate(epoch)`` runs (after each epoch), so with
  boundaries (80, 120, 160, 180) the first 81 epochs use the initial rate.

  Args:
    config: a training config (see :func:`default_config`).
    steps_per_epoch: optimizer steps per epoch.

  Returns:
    An optax schedule ``step -> learning rate``.
  """
  checks.check_choice(config.lr_schedule, ("constant", "piecewise"), "lr_schedule")
  checks.check_positive(config.learning_rate, "learning_rate", allow_zero=False)
  checks.check_positive(config.lr_floor, "lr_floor")
  if config.lr_schedule == "constant":
    schedule = optax.constant_schedule(config.learning_rate)
  else:
    boundaries, scales = tuple(config.lr_boundaries_epochs), tuple(config.lr_scales)
    if len(boundaries) != len(scales):
      raise ValueError(
          f"lr_boundaries_epochs {boundaries} and lr_scales {scales} must have the same length.")
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate,
        {(int(e) + 1) * steps_per_epoch: float(s) for e, s in zip(boundaries, scales, strict=True)})
  if config.lr_floor > 0:
    # Equals DEEPSEC's per-epoch max(lr * scale, floor) because every scale is <= 1.
    base, floor = schedule, config.lr_floor
    schedule = lambda step: jnp.maximum(base(step), floor)
  return schedule


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer of ``config``.

  Weight decay is added to the gradient before the optimizer (torch's ``weight_decay``), so SGD
  is ``chain(add_decayed_weights(wd), sgd(lr, momentum, nesterov))`` as in DEEPSEC MNIST.

  Returns:
    ``(tx, schedule)``.
  """
  checks.check_choice(config.optimizer, ("sgd", "adam"), "optimizer")
  checks.check_positive(config.weight_decay, "weight_decay")
  schedule = make_schedule(config, steps_per_epoch)
  if config.optimizer == "sgd":
    base = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  else:
    base = optax.adam(schedule)
  if config.weight_decay:
    return optax.chain(optax.add_decayed_weights(config.weight_decay), base), schedule
  return base, schedule


_OPTIMIZER_FIELDS = ("optimizer", "learning_rate", "momentum", "nesterov", "weight_decay",
                     "lr_schedule", "lr_boundaries_epochs", "lr_scales", "lr_floor")


def _cached_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """make_optimizer, returning the same ``tx`` object for equal settings (no recompiles)."""
  values = tuple((k, tuple(config[k]) if k in ("lr_boundaries_epochs", "lr_scales")
                  else config[k]) for k in _OPTIMIZER_FIELDS)
  return _optimizer_from_values(values, steps_per_epoch)


@functools.lru_cache(maxsize=32)
def _optimizer_from_values(values, steps_per_epoch):
  return make_optimizer(ml_collections.ConfigDict(dict(values)), steps_per_epoch)


# ----------------------------------------------------------------------------- steps


def _masked_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  weights = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(ce * weights),
      "correct": jnp.sum(correct * weights),
      "count": jnp.sum(weights),
  }


@functools.partial(xla.jit, static_argnames=("model", "tx", "augment"))
def train_step(
    state: TrainState,
    batch: batching.Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    augment: AugmentFn = identity_augment,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the mean cross-entropy over the unmasked rows of ``batch``.

  BatchNorm runs in train mode and its running statistics are updated. Dropout and augmentation
  keys are derived from ``fold_in(state.key, state.step)``, so a resumed run repeats them.
  Padded rows (``mask`` False) carry no loss weight; they do enter BatchNorm batch statistics
  (:func:`fit` fills them with other training examples).

  Returns:
    The new state and summed metrics ``{'loss_sum', 'correct', 'count'}`` over real rows.
  """
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  x = augment(aug_key, batch.x)
  has_bn = bool(state.batch_stats)

  def loss_fn(params):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = state.batch_stats
    out = model.apply(variables, x, train=True, rngs={"dropout": dropout_key},
                      mutable=["batch_stats"] if has_bn else False)
    logits, updates = out if has_bn else (out, {})
    metrics = _masked_metrics(logits, batch.y, batch.mask)
    loss = metrics["loss_sum"] / jnp.maximum(metrics["count"], 1.0)
    return loss, (metrics, updates)

  grads, (metrics, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates_tx, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates_tx),
      batch_stats=updates.get("batch_stats", state.batch_stats),
      opt_state=opt_state)
  return new_state, metrics


@functools.partial(xla.jit, static_argnames=("model",))
def eval_step(variables: Variables, batch: batching.Batch, *, model: nn.Module):
  """Summed eval-mode metrics (BatchNorm running statistics) over the unmasked rows."""
  logits = model.apply(variables, batch.x, train=False)
  return _masked_metrics(logits, batch.y, batch.mask)


def evaluate(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 500,
) -> dict[str, float]:
  """Accuracy and mean cross-entropy of ``model`` on a dataset, in eval mode.

  Uses fixed-shape padded batches with a mask, so the last batch does not retrace.

  Returns:
    ``{'accuracy', 'loss', 'count'}``.
  """
  checks.check_labels(labels, name="labels", size=len(images))
  batch_size = min(batch_size, len(images))
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in batching.padded_batches(images, labels, batch_size):
    metrics = eval_step(variables, batch, model=model)
    totals = {k: totals[k] + metrics[k] for k in totals}
  totals = {k: float(v) for k, v in totals.items()}
  return {
      "accuracy": totals["correct"] / totals["count"],
      "loss": totals["loss_sum"] / totals["count"],
      "count": int(totals["count"]),
  }


def is_improvement(val_accuracy: float, best: float | None) -> bool:
  """DEEPSEC's rule: improved if ``round(acc, 4) >= round(best, 4)``, so ties go to the later."""
  return best is None or round(val_accuracy, 4) >= round(best, 4)


# ----------------------------------------------------------------------------- io helpers








# ----------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _quiet_orbax():
  # Orbax logs several INFO lines per save through absl; keep the training log readable.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(min(verbosity, logging.WARNING))  # absl: larger is more verbose.
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _manager(folder: pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
  """A synchronous manager; ``keep=None`` opens an existing folder for reading."""
  if keep is None:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
  with _quiet_orbax():
    return ocp.CheckpointManager(folder.absolute(), options=options)


def _save(manager: ocp.CheckpointManager, epoch: int, **items) -> None:
  with _quiet_orbax():
    if epoch in manager.all_steps():  # Left over from a run interrupted after this save.
      manager.delete(epoch)
    manager.save(epoch, args=ocp.args.Composite(**items))
    manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, epoch: int, **items) -> dict[str, Any]:
  with _quiet_orbax():
    return dict(manager.restore(epoch, args=ocp.args.Composite(**items)))


def _close(manager: ocp.CheckpointManager) -> None:
  with _quiet_orbax():
    manager.close()


def _state_tree(state: TrainState) -> dict[str, Any]:
  # Typed PRNG keys are not serialisable; store the raw key data.
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "key": jax.random.key_data(state.key)}


def _save_latest(manager, epoch: int, state: TrainState, progress: dict) -> None:
  _save(manager, epoch, state=ocp.args.StandardSave(_state_tree(state)),
        progress=ocp.args.JsonSave(progress))


def _restore_latest(manager, like: TrainState) -> tuple[TrainState, dict] | None:
  epoch = manager.latest_step()
  if epoch is None:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(like))
  restored = _restore(manager, epoch, state=ocp.args.StandardRestore(target),
                      progress=ocp.args.JsonRestore())
  tree = restored["state"]
  state = TrainState(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                     opt_state=tree["opt_state"], key=jax.random.wrap_key_data(tree["key"]))
  return state, dict(restored["progress"])


def _saved_tree_metadata(folder: pathlib.Path) -> Any:
  """The orbax metadata (shape, dtype, saved sharding) of each array saved in ``folder``."""
  with _quiet_orbax(), contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
    return handler.metadata(folder).tree


def _abstract_tree_here(folder: pathlib.Path) -> Any:
  """The shapes and dtypes of the tree saved in ``folder``, placed on this process's first device.

  Without a target, orbax restores each array onto the device it was saved from, and fails when
  that device does not exist here (a checkpoint written on a GPU, read on a CPU).
  """
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here),
                      _saved_tree_metadata(folder))


def _checkpoint_root(path) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  for root in (path / _CHECKPOINT_DIR, path, path.parent):
    if (root / "best").is_dir() or (root / "latest").is_dir():
      return root
  raise FileNotFoundError(
      f"No advtrace checkpoints under {str(path)!r}. Pass the --workdir of a training run "
      f"(it contains {_CHECKPOINT_DIR}/best/<epoch>/), or its {_CHECKPOINT_DIR}/ folder.")


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the model metadata (name, num_classes, input_shape, model_kwargs) of a training run.

  Args:
    path: a training workdir, its ``checkpoints`` folder, or a ``best``/``latest`` folder.
  """
  file = _checkpoint_root(path) / _METADATA_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{str(file)!r} is missing; it is written by train_and_evaluate.")
  return json.loads(file.read_text())


def restore_variables(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """Restores the Flax variables saved by :func:`train_and_evaluate`, for inference.

  Args:
    path: a training workdir, its ``checkpoints`` folder, or its ``checkpoints/best`` or
      ``checkpoints/latest`` folder.
    step: the epoch (1-based) to restore. None takes the best-validation checkpoint (or, when
      ``path`` names the ``latest`` folder, the latest one). A given epoch is looked up among
      the best checkpoint and the kept latest ones.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` only for models with BatchNorm).

  Raises:
    FileNotFoundError: if there is no checkpoint there or the requested epoch was not kept.
  """
  root = _checkpoint_root(path)
  kinds = ("latest", "best") if pathlib.Path(path).name == "latest" else ("best", "latest")
  available = {}
  for kind in kinds:
    if not (root / kind).is_dir():
      continue
    manager = _manager(root / kind)
    steps = list(manager.all_steps())
    available[kind] = steps
    chosen = (max(steps) if steps else None) if step is None else (step if step in steps else None)
    if chosen is not None:
      item = "variables" if kind == "best" else "state"
      target = _abstract_tree_here(root / kind / str(chosen) / item)
      tree = _restore(manager, chosen, **{item: ocp.args.StandardRestore(target)})[item]
    _close(manager)
    if chosen is not None:
      variables = {"params": tree["params"]}
      if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
      return variables
  raise FileNotFoundError(
      f"No checkpoint for epoch {step} under {str(root)!r}; available epochs: {available}.")


def restore_model(path: str | os.PathLike, step: int | None = None):
  """Rebuilds the trained model and its variables.

  Args:
    path: as for :func:`restore_variables`.
    step: as for :func:`restore_variables`.

  Returns:
    ``(model, variables, metadata)``; ``registry.logits_fn(model, variables)`` gives the logits.
  """
  metadata = load_metadata(path)
  model = registry.get_model(metadata["model"], num_classes=metadata["num_classes"],
                             **metadata.get("model_kwargs", {}))
  return model, restore_variables(path, step), metadata


# ----------------------------------------------------------------------------- loop


def _run_epoch(state, train_step_fn, images, labels, batch_size, epoch, seed, log_every):
  """One pass over a freshly shuffled training set; returns (state, metrics, timing)."""
  n = len(images)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  # The last batch is filled up with the first examples of the epoch, masked out of the loss, so
  # BatchNorm batch statistics still come from varied real images.
  num_batches = -(-n // batch_size)
  order = np.concatenate([order, order[:num_batches * batch_size - n]])
  metrics, compile_s, steady_s, steady_n = [], 0.0, 0.0, 0
  t_start = time.perf_counter()
  t_steady = None
  for i in range(num_batches):
    pos = np.arange(i * batch_size, (i + 1) * batch_size)
    idx = order[pos]
    batch = batching.Batch(images[idx], labels[idx], pos < n)
    state, m = train_step_fn(state, batch)
    metrics.append(m)
    if t_steady is None:
      jax.block_until_ready(state)
      t_steady = time.perf_counter()
      compile_s = t_steady - t_start
    else:
      steady_n += int(batch.mask.sum())
    if log_every and (i + 1) % log_every == 0:
      elapsed = time.perf_counter() - t_steady
      logging.info("epoch %d step %d: loss %.4f, %.0f examples/s", epoch + 1, i + 1,
                   float(m["loss_sum"] / m["count"]), steady_n / max(elapsed, 1e-9))
  jax.block_until_ready(state)
  steady_s = time.perf_counter() - t_steady
  totals = {k: float(sum(np.asarray(m[k]) for m in metrics)) for k in metrics[0]}
  return state, totals, {"first_step_s": compile_s, "steady_s": steady_s, "steady_n": steady_n}


def fit(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    metadata: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains ``model`` on ``train``, validating on ``val`` after each epoch, with checkpoints.

  Resumes from ``<workdir>/checkpoints/latest`` when present: the shuffling order
  (``default_rng([seed, epoch])``), the dropout and augmentation keys (folded from the step) and
  the optimizer state all continue, so an interrupted run ends with the same parameters as an
  uninterrupted one.

  Args:
    config: a training config (see :func:`default_config`).
    workdir: where checkpoints go.
    model: a Flax module called as ``model(x, train=...)``.
    train: training ``(images, labels)``, NHWC float32 in [0, 1] and int32.
    val: validation ``(images, labels)``.
    metadata: JSON-serialisable model description saved as ``checkpoints/model.json``.

  Returns:
    ``(best_variables, progress)``; progress has ``history`` (per-epoch metrics), ``best_epoch``,
    ``best_val_accuracy``, and timing of this invocation.
  """
  x_train, y_train = train
  x_val, y_val = val
  checks.check_images(x_train, "training images")
  checks.check_labels(y_train, name="training labels", size=len(x_train))
  checks.check_images(x_val, "validation images")
  checks.check_labels(y_val, name="validation labels", size=len(x_val))
  for name in ("num_epochs", "batch_size", "eval_batch_size"):
    checks.check_positive(config[name], name, allow_zero=False)
  batch_size = int(min(config.batch_size, len(x_train)))
  steps_per_epoch = -(-len(x_train) // batch_size)
  tx, schedule = _cached_optimizer(config, steps_per_epoch)
  augment = get_augment(config.augment, config.translate)
  step_fn = functools.partial(train_step, model=model, tx=tx, augment=augment)

  workdir = pathlib.Path(workdir)
  if metadata is not None:
    _write_metadata(workdir, dict(metadata))
  root = workdir / _CHECKPOINT_DIR
  latest = _manager(root / "latest", keep=max(int(config.keep_latest), 1))
  best = _manager(root / "best", keep=1)
  state = create_train_state(model, tx, jax.random.key(config.seed), x_train.shape[1:])
  progress = {"epoch": 0, "best_epoch": None, "best_val_accuracy": None, "history": []}
  try:
    restored = _restore_latest(latest, state)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"The checkpoint in {str(latest.directory)!r} does not match this config (model or "
        f"optimizer changed?): {e}. Use a fresh --workdir.") from e
  if restored is not None:
    state, progress = restored
    logging.info("Resuming from %s at epoch %d.", latest.directory, progress["epoch"])
  resumed_from = progress["epoch"]

  first_step_s, steady_s, steady_n = None, 0.0, 0
  for epoch in range(progress["epoch"], config.num_epochs):
    lr = float(schedule(state.step))
    state, totals, timing = _run_epoch(state, step_fn, x_train, y_train, batch_size, epoch,
                                       config.seed, config.log_every_steps)
    first_step_s = timing["first_step_s"] if first_step_s is None else first_step_s
    steady_s += timing["steady_s"]
    steady_n += timing["steady_n"]
    variables = variables_of(state)
    val_metrics = evaluate(model, variables, x_val, y_val, config.eval_batch_size)
    record = {
        "epoch": epoch + 1,
        "learning_rate": lr,
        "train_loss": totals["loss_sum"] / totals["count"],
        "train_accuracy": totals["correct"] / totals["count"],
        "val_loss": val_metrics["loss"],
        "val_accuracy": val_metrics["accuracy"],
        "examples_per_sec": timing["steady_n"] / max(timing["steady_s"], 1e-9),
    }
    improved = is_improvement(record["val_accuracy"], progress["best_val_accuracy"])
    if improved:
      progress["best_epoch"], progress["best_val_accuracy"] = epoch + 1, record["val_accuracy"]
      _save(best, epoch + 1, variables=ocp.args.StandardSave(variables))
    progress["epoch"] = epoch + 1
    progress["history"].append(record)
    _save_latest(latest, epoch + 1, state, progress)
    logging.info(
        "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f%s | lr %.3g | "
        "%.0f examples/s", epoch + 1, config.num_epochs, record["train_loss"],
        record["train_accuracy"], record["val_loss"], record["val_accuracy"],
        " (best)" if improved else "", lr, record["examples_per_sec"])
  _close(latest)
  if progress["best_epoch"] is None:
    raise RuntimeError(f"No epoch was trained in {workdir}; check num_epochs.")
  best_variables = restore_variables(workdir, progress["best_epoch"])
  _close(best)
  progress = dict(progress)
  progress.update(
      resumed_from_epoch=resumed_from,
      first_step_s=first_step_s,
      examples_per_sec=steady_n / steady_s if steady_s > 0 else None)
  return best_variables, progress


def _write_metadata(workdir: pathlib.Path, metadata: dict) -> None:
  file = workdir / _CHECKPOINT_DIR / _METADATA_FILE
  if file.is_file():
    old = json.loads(file.read_text())
    if old != json.loads(json.dumps(metadata, default=atomic.json_default)):
      raise ValueError(
          f"{str(workdir)!r} holds checkpoints of a different model ({old}); resuming them with "
          f"{metadata} would fail. Use a fresh --workdir.")
    return
  atomic.write_json(file, metadata, sort_keys=True)


def _subset(images: np.ndarray, labels: np.ndarray, n: int):
  return (images, labels) if not n else (images[:n], labels[:n])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Loads the data, trains (resuming if possible), and evaluates the best checkpoint on test.

  Writes ``results.json`` and ``results.md`` into ``workdir`` (atomically) next to the
  checkpoints.

  Args:
    config: a training config (see :func:`default_config`).
    workdir: the output folder.

  Returns:
    The results dict written to ``results.json``: dataset sizes, ``epochs``, ``best_epoch``,
    ``best_val_accuracy``, ``final_val_accuracy``, ``test_accuracy`` (of the best checkpoint),
    ``examples_per_sec`` (steady state, first step excluded), ``first_step_s`` (compilation),
    ``wall_time_s``, and the per-epoch ``history``.
  """
  from advtrace import data  # Imported lazily: tfds is slow to import.

  t0 = time.perf_counter()
  workdir = pathlib.Path(workdir)
  train_full = data.load(config.dataset, split="train", data_dir=config.data_dir)
  test = data.load(config.dataset, split="test", data_dir=config.data_dir)
  train_ds, val_ds = data.deepsec_split(train_full, config.valid_fraction, config.split_seed)
  train = _subset(np.asarray(train_ds.images), np.asarray(train_ds.labels),
                  config.max_train_examples)
  val = (np.asarray(val_ds.images), np.asarray(val_ds.labels))
  num_classes = int(train_full.num_classes)
  model_kwargs = dict(config.model_kwargs)
  model = registry.get_model(config.model, num_classes=num_classes, **model_kwargs)
  metadata = {"model": config.model, "num_classes": num_classes, "model_kwargs": model_kwargs,
              "input_shape": list(train[0].shape[1:]), "dataset": config.dataset}
  logging.info("Training %s on %s: %d train / %d val / %d test examples; devices %s.",
               config.model, config.dataset, len(train[0]), len(val[0]), len(test.images),
               jax.devices())

  best_variables, progress = fit(config, workdir, model, train, val, metadata)
  test_metrics = evaluate(model, best_variables, np.asarray(test.images),
                          np.asarray(test.labels), config.eval_batch_size)
  history = progress["history"]
  results = {
      "dataset": config.dataset,
      "model": config.model,
      "num_train": len(train[0]),
      "num_val": len(val[0]),
      "num_test": len(test.images),
      "epochs": progress["epoch"],
      "best_epoch": progress["best_epoch"],
      "best_val_accuracy": progress["best_val_accuracy"],
      "final_val_accuracy": history[-1]["val_accuracy"],
      "test_accuracy": test_metrics["accuracy"],
      "test_loss": test_metrics["loss"],
      "examples_per_sec": progress["examples_per_sec"],
      "first_step_s": progress["first_step_s"],
      "resumed_from_epoch": progress["resumed_from_epoch"],
      "wall_time_s": time.perf_counter() - t0,
      "history": history,
      "config": config.to_dict(),
  }
  atomic.write_json(workdir / "results.json", results, sort_keys=True)
  atomic.write_text(workdir / "results.md", results_markdown(results))
  logging.info("Test accuracy of the best checkpoint (epoch %d): %.4f. Results in %s.",
               results["best_epoch"], results["test_accuracy"], workdir)
  return results


def results_markdown(results: Mapping[str, Any]) -> str:
  """A Markdown summary table of :func:`train_and_evaluate` results."""
  eps = results.get("examples_per_sec")
  rows = [
      ("dataset", results["dataset"]),
      ("model", results["model"]),
      ("train / val / test examples",
       f"{results['num_train']} / {results['num_val']} / {results['num_test']}"),
      ("epochs", results["epochs"]),
      ("best epoch (validation)", results["best_epoch"]),
      ("best validation accuracy", f"{results['best_val_accuracy']:.4f}"),
      ("final validation accuracy", f"{results['final_val_accuracy']:.4f}"),
      ("test accuracy (best checkpoint)", f"{results['test_accuracy']:.4f}"),
      ("training examples/s (first step excluded)", "n/a" if eps is None else f"{eps:.0f}"),
      ("wall time", f"{results['wall_time_s']:.1f} s"),
  ]
  lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
  return f"# Training results: {results['model']} on {results['dataset']}\n\n" + "\n".join(
      lines) + "\n"
