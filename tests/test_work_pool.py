"""The work pool: batches claimed once, released with their process, saved and gathered."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from advtrace._src import atomic
from advtrace._src import work_pool


def _claim(pool):
  with atomic.workdir_lock(pool.workdir):
    return pool.claim()


def _save(pool, claim, seconds=1.0):
  with atomic.workdir_lock(pool.workdir):
    pool.save(claim, {"value": claim.positions * 10, "seconds": np.float64(seconds)})


def test_one_process_runs_the_batches_of_a_plain_loop(tmp_path):
  pool = work_pool.WorkPool(tmp_path, 10, 4)
  batches = []
  while (claim := _claim(pool)) is not None:
    batches.append(claim.positions.tolist())
    _save(pool, claim)
  assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert pool.complete() and len(pool.gather(())["positions"]) == 10
  out = pool.gather(("value",))
  np.testing.assert_array_equal(out["positions"], np.arange(10))
  np.testing.assert_array_equal(out["value"], np.arange(10) * 10)
  assert pool.total("seconds") == 3.0
  pool.clear()
  assert not (tmp_path / "partial").exists() and not (tmp_path / "claims").exists()


def test_claims_are_exclusive_until_released(tmp_path):
  # Two pools on one folder stand for two processes (their file locks conflict alike).
  a, b = work_pool.WorkPool(tmp_path, 10, 4), work_pool.WorkPool(tmp_path, 10, 4)
  first, second = _claim(a), _claim(b)
  assert second.positions.tolist() == [4, 5, 6, 7]
  last = _claim(b)
  assert last.positions.tolist() == [8, 9]
  assert _claim(a) is None  # everything unfinished is claimed
  first.release()  # a dies before saving: its batch goes back to the pool
  again = _claim(b)
  assert again.positions.tolist() == [0, 1, 2, 3]
  _save(b, again)
  _save(b, last)
  assert len(a.gather(("value",))["positions"]) == 6  # a sees b's batches
  assert not a.complete()


def test_a_gap_is_claimed_alone(tmp_path):
  pool = work_pool.WorkPool(tmp_path, 10, 4)
  claims = [_claim(pool) for _ in range(3)]
  _save(pool, claims[0])
  _save(pool, claims[2])
  claims[1].release()
  assert _claim(pool).positions.tolist() == [4, 5, 6, 7]


def test_wait_returns_when_the_claim_is_released(tmp_path):
  a, b = work_pool.WorkPool(tmp_path, 4, 4), work_pool.WorkPool(tmp_path, 4, 4)
  claim = _claim(a)
  assert _claim(b) is None
  waited = threading.Event()
  waiter = threading.Thread(target=lambda: (b.wait(), waited.set()), daemon=True)
  waiter.start()
  assert not waited.wait(0.3)
  _save(a, claim)
  assert waited.wait(30)
  assert b.complete()


def test_legacy_single_file_checkpoint_is_the_first_batch(tmp_path):
  atomic.write_npz(tmp_path / "partial.npz", {"value": np.arange(5) * 10, "n_done": np.int64(5),
                                              "seconds": np.float64(7.0)})
  pool = work_pool.WorkPool(tmp_path, 8, 2)
  assert _claim(pool).positions.tolist() == [5, 6]
  assert len(pool.gather(())["positions"]) == 5 and pool.total("seconds") == 7.0
  pool.clear()
  assert not (tmp_path / "partial.npz").exists()


def test_bad_rows_and_duplicates_are_errors(tmp_path):
  pool = work_pool.WorkPool(tmp_path, 4, 2)
  claim = _claim(pool)
  with pytest.raises(ValueError, match="expected 2 rows"):
    pool.save(claim, {"value": np.zeros(3)})
  pool.save(claim, {"value": np.zeros(2)})
  atomic.write_npz(tmp_path / "partial" / "000001.npz",
                   {"value": np.zeros(1), "positions": np.array([1])})
  pool.complete()
  with pytest.raises(RuntimeError, match="holds some positions twice"):
    pool.gather(("value",))
  with pytest.raises(ValueError, match="must be positive"):
    work_pool.WorkPool(tmp_path, 0, 2)
