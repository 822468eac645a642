"""The iteration driver shared by every iterative attack.

An iterative attack supplies a *per-example* step ``step_fn(logits_fn, cfg, state) -> state``.
``state`` is a pytree (usually a NamedTuple) whose leaves are per-example; it must have a bool
field ``active`` (False once the example is finished, e.g. on early stopping) and an int32 field
``iteration``. ``cfg`` holds the static, hashable settings (a NamedTuple of Python scalars and
strings); per-example hyperparameters live in ``state``.

The driver vmaps the step over the batch, freezes finished examples, counts iterations, and runs
the loop either

- ``"fused"``: one jitted ``lax.while_loop``, stopping when every example is done; or
- ``"host"``: a Python loop over the jitted step, with early exit, a progress callback, and a
  log line (step, examples still running) at most every ``log_every_s`` seconds.
  Once at most half of the batch is still active, the active examples are gathered into a
  smaller batch (a power of two holding at least ``_MIN_BUCKET_ROWS`` model inputs, e.g. one
  OptMargin example of 20 noisy copies), so finished examples stop costing compute; this
  compiles the step for at most log2(batch) extra shapes, once each.

``"auto"`` picks host on CPU and fused elsewhere. On 2 CPU cores the host loop ran PGD and CW
on the DEEPSEC MNIST CNN at about 40 ms per step against 320 ms fused: inside the compiled
``while`` body XLA:CPU keeps a slow kernel layout for the input-gradient convolutions. On an
H100 the fused loop ran PGD at 0.72 ms per step against 1.21 ms host-stepped, and CW at 0.40 ms
against 1.21 ms, with identical outputs (``benchmarks/loop_modes.py``,
``docs/results/benchmarks.md``).

Jitted functions are cached on ``(step_fn, logits_fn, cfg)`` and the state's shapes, so a second
batch of the same shape never retraces. Pass the *same* ``logits_fn`` object to reuse compiles.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from advtrace._src import xla

LOOP_MODES = ("auto", "host", "fused")

StepFn = Callable[[Callable, Any, Any], Any]
ProgressFn = Callable[[int, Any], None]


def _freeze_done(new, old):
  """Keeps finished examples unchanged and counts an iteration for the active ones."""
  keep = old.active

  def select(n, o):
    mask = keep.reshape(keep.shape + (1,) * (n.ndim - keep.ndim))
    return jnp.where(mask, n, o)

  merged = jax.tree.map(select, new, old)
  return merged._replace(iteration=old.iteration + keep.astype(old.iteration.dtype))


def _batched_step(step_fn: StepFn, logits_fn, cfg, state):
  new = jax.vmap(functools.partial(step_fn, logits_fn, cfg))(state)
  return _freeze_done(new, state)


_jit_step = xla.jit(_batched_step, static_argnums=(0, 1, 2), donate_argnums=())

# Each bucket size is one more compile of the step, so buckets stop at this many model inputs.
_MIN_BUCKET_ROWS = 8


def _bucket(n_active: int, rows_per_example: int) -> int:
  smallest = max(1, _MIN_BUCKET_ROWS // rows_per_example)
  return max(smallest, 1 << max(0, int(n_active - 1).bit_length()))


@jax.jit
def _gather(tree, rows):
  return jax.tree.map(lambda leaf: leaf[rows], tree)


@jax.jit
def _scatter(full, rows, part):
  return jax.tree.map(lambda f, p: f.at[rows].set(p), full, part)


@functools.partial(xla.jit, static_argnums=(0, 1, 2))
def _fused(step_fn: StepFn, logits_fn, cfg, state, num_steps):
  def cond(carry):
    i, s = carry
    return (i < num_steps) & jnp.any(s.active)

  def body(carry):
    i, s = carry
    return i + 1, _batched_step(step_fn, logits_fn, cfg, s)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def resolve_loop(loop: str) -> str:
  """Maps ``"auto"`` to the faster mode for the default backend."""
  if loop not in LOOP_MODES:
    raise ValueError(f"Unknown loop mode {loop!r}. Valid choices: {', '.join(LOOP_MODES)}.")
  if loop == "auto":
    return "host" if jax.default_backend() == "cpu" else "fused"
  return loop


def run(step_fn: StepFn, logits_fn, cfg, state, num_steps: int, *, loop: str = "auto",
        progress: ProgressFn | None = None, check_every: int = 1,
        log_every_s: float | None = 60.0, rows_per_example: int = 1):
  """Runs ``num_steps`` steps of ``step_fn`` on a batch ``state`` (see the module docstring).

  Args:
    step_fn: the per-example step, a module-level function (it is part of the jit cache key).
    logits_fn: the model; hashed by identity.
    cfg: static, hashable settings passed to ``step_fn``.
    state: the batched state, with per-example ``active`` and ``iteration`` fields.
    num_steps: the maximum number of steps.
    loop: ``"auto"``, ``"host"`` or ``"fused"``.
    progress: optional ``progress(step, state)`` callback, called after each host step.
    check_every: in host mode, test for early exit every this many steps (each test syncs).
    log_every_s: in host mode, log progress at an early-exit test when at least this many
      seconds have passed since the last log line (None: never), so hour-long batches show
      that they move.
    rows_per_example: model inputs one example's step evaluates (OptMargin: its noisy copies);
      sets the smallest batch the host loop gathers active examples into.

  Returns:
    The final batched state.
  """
  mode = resolve_loop(loop)
  if mode == "fused":
    return _fused(step_fn, logits_fn, cfg, state, jnp.int32(num_steps))
  full, rows = state, None  # ``state`` holds the rows ``rows`` of ``full`` (None: all)
  last_log = time.monotonic()
  for i in range(num_steps):
    state = _jit_step(step_fn, logits_fn, cfg, state)
    if progress is not None:
      progress(i + 1, state if rows is None else _scatter(full, rows, state))
    if (i + 1) % check_every:
      continue
    active = np.asarray(state.active)
    if not active.any():
      break
    if log_every_s is not None and time.monotonic() - last_log >= log_every_s:
      last_log = time.monotonic()
      logging.info("%s.%s: step %d/%d, %d examples still running.",
                   step_fn.__module__.rsplit(".", 1)[-1], step_fn.__name__, i + 1, num_steps,
                   int(active.sum()))
    size = _bucket(int(active.sum()), rows_per_example)
    if size <= active.size // 2:
      # Pad with a finished row: its step result is discarded by _freeze_done.
      keep = np.flatnonzero(active)
      keep = np.concatenate([keep, np.full(size - keep.size, np.argmin(active))])
      full = state if rows is None else _scatter(full, rows, state)
      rows = keep if rows is None else rows[keep]
      state = _gather(full, jnp.asarray(rows))
  return state if rows is None else _scatter(full, jnp.asarray(rows), state)
