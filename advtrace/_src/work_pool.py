"""Examples ``0..n-1`` shared, batch by batch, by the processes that run in one workdir.

Each finished batch is saved as ``<workdir>/partial/<first>.npz`` (its ``positions`` and its
result arrays). A batch in progress is claimed by a file in ``<workdir>/claims/`` whose lock
its process holds; the lock dies with the process, so the batch of a killed run goes back to
the pool. Claiming and saving happen under the workdir lock (:func:`atomic.workdir_lock`), so
no two processes take the same batch.

A process claims the first free batch of up to ``batch_size`` consecutive positions. One
process alone therefore runs the batches a plain loop would, ``[0, b), [b, 2b), ...``; several
processes share them out.

Usage, in each process::

  pool = WorkPool(workdir, n, batch_size)
  while True:
    with atomic.workdir_lock(workdir):
      complete = pool.complete()
      claim = None if complete else pool.claim()
    if complete:
      break
    if claim is None:
      pool.wait()  # every unfinished batch is claimed: wait for one of them
      continue
    with claim:
      arrays = compute(claim.positions)
      with atomic.workdir_lock(workdir):
        pool.save(claim, arrays)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from typing import IO

import numpy as np

from advtrace._src import atomic

_CHUNKS = "partial"
_CLAIMS = "claims"
# A single-file checkpoint of the first ``n_done`` positions, written by advtrace's runner before
# 2026-11-22; read as one chunk so that runs started then resume.
_LEGACY = "partial.npz"


class Claim:
  """Positions one process is computing. Leaving the ``with`` block (or dropping the object,
  which closes its lock file) releases the claim."""

  def __init__(self, positions: np.ndarray, path: str, lock: IO[str]):
    self.positions = positions
    self.path = path
    self._lock = lock

  def release(self) -> None:
    self._lock.close()

  def __enter__(self) -> Claim:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class WorkPool:
  """The finished and claimed batches of one workdir (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, n: int, batch_size: int):
    if n <= 0 or batch_size <= 0:
      raise ValueError(f"n and batch_size must be positive, got {n} and {batch_size}.")
    self.workdir = os.fspath(workdir)
    self.n = n
    self.batch_size = batch_size
    self._chunks: dict[str, dict[str, np.ndarray]] = {}  # file name -> arrays, read once

  def _path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def _refresh(self) -> None:
    """Reads the chunks saved since the last call (by this process or another)."""
    names = [f for f in _listdir(self._path(_CHUNKS)) if f.endswith(".npz")]
    for name in names:
      if name not in self._chunks:
        self._chunks[name] = atomic.read_npz(self._path(_CHUNKS, name))
    legacy = self._path(_LEGACY)
    if _LEGACY not in self._chunks and os.path.exists(legacy):
      saved = atomic.read_npz(legacy)
      n_done = int(saved.pop("n_done"))
      self._chunks[_LEGACY] = {**saved, "positions": np.arange(n_done)}

  def _done_mask(self) -> np.ndarray:
    done = np.zeros(self.n, bool)
    for chunk in self._chunks.values():
      done[chunk["positions"]] = True
    return done

  def complete(self) -> bool:
    """Whether every position is finished. Call it under the workdir lock."""
    self._refresh()
    return bool(self._done_mask().all())

  def claim(self) -> Claim | None:
    """Claims the first free batch; None if every unfinished position is claimed by another
    process. Call it under the workdir lock."""
    self._refresh()
    busy = self._done_mask()
    for name in _listdir(self._path(_CLAIMS)):
      path = self._path(_CLAIMS, name)
      lock = atomic.try_lock(path)
      if lock is None:
        start, stop = (int(v) for v in name.split("-"))
        busy[start:stop] = True
      else:  # Its process is gone: the batch is free again.
        os.remove(path)
        lock.close()
    free = np.flatnonzero(~busy)
    if not free.size:
      return None
    start = stop = int(free[0])
    while stop < self.n and not busy[stop] and stop - start < self.batch_size:
      stop += 1
    os.makedirs(self._path(_CLAIMS), exist_ok=True)
    path = self._path(_CLAIMS, f"{start:06d}-{stop:06d}")
    lock = atomic.try_lock(path)
    if lock is None:
      raise RuntimeError(f"{path} is locked although free; claim() must run under the lock of "
                         f"{self.workdir}.")
    return Claim(np.arange(start, stop), path, lock)

  def save(self, claim: Claim, arrays: Mapping[str, np.ndarray]) -> None:
    """Saves the results of a claimed batch (one row per position) and releases the claim.
    Call it under the workdir lock."""
    sizes = {k: len(v) for k, v in arrays.items() if np.ndim(v)}
    if any(size != len(claim.positions) for size in sizes.values()):
      raise ValueError(f"expected {len(claim.positions)} rows per array, got {sizes}.")
    name = f"{int(claim.positions[0]):06d}.npz"
    chunk = {**arrays, "positions": claim.positions}
    atomic.write_npz(self._path(_CHUNKS, name), chunk)
    self._chunks[name] = chunk
    os.remove(claim.path)
    claim.release()

  def wait(self) -> None:
    """Waits until one batch claimed by another process is released (finished or abandoned)."""
    claims = _listdir(self._path(_CLAIMS))
    if claims:
      atomic.wait_for_lock(self._path(_CLAIMS, claims[0]))

  def gather(self, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (one row per position) of the finished positions, in position
    order, with their ``positions``."""
    self._refresh()
    chunks = sorted(self._chunks.values(), key=lambda c: int(c["positions"][0]))
    keys = tuple(keys) + ("positions",)
    if not chunks:
      return {k: np.zeros(0) for k in keys}
    out = {k: np.concatenate([c[k] for c in chunks]) for k in keys}
    if len(np.unique(out["positions"])) != len(out["positions"]):
      raise RuntimeError(f"{self._path(_CHUNKS)} holds some positions twice; delete the "
                         "folder to start over.")
    return out

  def total(self, key: str) -> float:
    """The sum of a per-batch scalar (e.g. the attack time) over the finished batches."""
    return float(sum(float(c[key]) for c in self._chunks.values()))

  def clear(self) -> None:
    """Deletes the chunks and claims (once the final results are written)."""
    shutil.rmtree(self._path(_CHUNKS), ignore_errors=True)
    shutil.rmtree(self._path(_CLAIMS), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
      os.remove(self._path(_LEGACY))
    self._chunks.clear()


def _listdir(path: str) -> list[str]:
  try:
    return sorted(f for f in os.listdir(path) if not f.startswith("."))
  except FileNotFoundError:
    return []
