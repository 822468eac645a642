"""Model registry, pure logits functions, and head/tail splitting.

Every registered model is a Flax module with the signature

    __call__(self, x, train: bool = False, *, start: str | None = None, stop: str | None = None)

taking NHWC float images in [0, 1] and returning logits. The module lists its named stages in
the class attribute ``stages`` (a tuple of names, in execution order). ``stop=name`` returns the
activation right after stage ``name``; ``start=name`` takes that activation as ``x`` and runs
the remaining stages. This is what :func:`split` uses to cut a model into a per-copy head and a
shared tail.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from advtrace._src import checks

LogitsFn = Callable[[jax.Array], jax.Array]
Variables = Any  # a Flax variables dict: {'params': ..., 'batch_stats': ...}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
  """Class/factory decorator that registers a model constructor under ``name``."""

  def wrap(ctor):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ctor
    return ctor

  return wrap


def _populate() -> None:
  # Importing the model modules runs their @register decorators.
  from advtrace._src.models import deepsec  # noqa: F401
  from advtrace._src.models import zoo  # noqa: F401


def list_models() -> list[str]:
  """Names of every registered model, sorted."""
  _populate()
  return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
  """Builds the registered model ``name`` for ``num_classes`` classes."""
  _populate()
  checks.check_choice(name, _REGISTRY, "model name")
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
  """Initialises ``model`` for inputs of shape ``input_shape`` (NHWC, batch axis included)."""
  return model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)


def logits_fn(model: nn.Module, variables: Variables) -> LogitsFn:
  """Returns the pure inference function ``x -> logits`` (eval mode: BatchNorm running stats)."""
  return functools.partial(_apply_eval, model, variables)


def _apply_eval(model, variables, x):
  return model.apply(variables, x, train=False)


def split(model: nn.Module, variables: Variables, at: str) -> tuple[LogitsFn, LogitsFn]:
  """Splits a model after stage ``at`` into ``(head, tail)`` with ``tail(head(x)) == logits(x)``.

  Args:
    model: a registered model.
    variables: its variables.
    at: the stage after which to cut; one of ``model.stages[:-1]``.

  Returns:
    Two pure functions in eval mode: ``head(x) -> features`` and ``tail(features) -> logits``.
  """
  cuts = tuple(model.stages[:-1])
  checks.check_choice(at, cuts, f"split point for {type(model).__name__}")
  head = lambda x: model.apply(variables, x, train=False, stop=at)
  tail = lambda h: model.apply(variables, h, train=False, start=at)
  return head, tail
