"""Atomic file writes (a temporary file in the target's folder, then ``os.replace``) and locks.

A crash or interruption leaves either the old file or the new one, never a partial file. The
locks are ``flock`` locks on files, which the operating system releases when their process
exits, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterator
from collections.abc import Mapping
from typing import IO
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging


def write_bytes(path: str | os.PathLike, payload: bytes, *, mode: int | None = None) -> None:
  """Writes ``payload`` to ``path`` atomically, creating the folder; ``mode`` sets permissions."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
  try:
    if mode is not None:
      os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def write_figure(workdir: str | os.PathLike, fig, name: str) -> str:
  """Saves a matplotlib figure atomically as ``<workdir>/figures/<name>.png``.

  Returns:
    The path relative to ``workdir``, for linking from a Markdown report.
  """
  rel = f"figures/{name}.png"
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  write_bytes(os.path.join(workdir, rel), buffer.getvalue())
  return rel


def json_default(obj):
  """JSON encoding of NumPy/JAX values, ConfigDicts and tuples."""
  if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, ml_collections.ConfigDict):
    return obj.to_dict()
  if isinstance(obj, tuple):
    return list(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default) + "\n")


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *,
              mode: int | None = None) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue(), mode=mode)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an ``.npz`` file (never unpickles)."""
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds the exclusive lock on ``workdir`` (its ``.lock`` file) for the ``with`` block.

  Waits while another process holds it. Processes that share a workdir take the lock only for
  short steps (checking the workdir, claiming work, saving a result), so they can work side by
  side.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("Waiting for another process to release %s.", os.fspath(workdir))
      fcntl.flock(f, fcntl.LOCK_EX)
    yield  # closing the file releases the lock


def try_lock(path: str | os.PathLike) -> IO[str] | None:
  """Takes the exclusive lock of ``path`` (created if missing) without waiting.

  Returns:
    The open file, whose closing releases the lock; None if another open file holds it (in
    this process or another).
  """
  f = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    return None
  return f


def wait_for_lock(path: str | os.PathLike) -> None:
  """Returns once nobody holds the lock of ``path`` (at once if ``path`` does not exist)."""
  try:
    f = open(path)  # pylint: disable=consider-using-with
  except FileNotFoundError:
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
