"""Tests for the Square attack (L-inf and L2, untargeted and targeted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_testing import AttackCase
from attack_testing import RowCounter
from attack_testing import digits_model
from attack_testing import run_in_batches
from attack_testing import run_standard_properties

from advtrace._src.attacks import square
from advtrace._src.attacks.square import square_attack

CASES = [
    AttackCase("square_linf", square_attack, dict(eps=0.2, max_queries=12),
               zero_kwargs=dict(eps=0.0), norm="linf", stochastic=True),
    AttackCase("square_l2", square_attack, dict(eps=1.0, norm="l2", max_queries=12),
               zero_kwargs=dict(eps=0.0), norm="l2", stochastic=True,
               per_example_values=(0.5, 1.5)),
    AttackCase("square_linf_targeted", square_attack, dict(eps=0.2, max_queries=12),
               targeted=True, zero_kwargs=dict(max_queries=0), norm="linf", stochastic=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:4], y[:4])


@pytest.mark.parametrize("norm,eps,targeted,queries,threshold", [
    ("linf", 0.2, False, 300, 0.8),
    ("l2", 1.5, False, 300, 0.8),
    ("linf", 0.3, True, 600, 0.7),
    ("l2", 2.0, True, 600, 0.7),
])
def test_effective_on_trained_model(norm, eps, targeted, queries, threshold):
  logits_fn, x, y = digits_model()
  x, y = x[:16], y[:16]
  labels = (y + 1) % 10 if targeted else y
  out = run_in_batches(square_attack, logits_fn, x, labels, eps=eps, norm=norm,
                       max_queries=queries, targeted=targeted)
  assert float(jnp.mean(out.info.success)) > threshold
  # Exact accounting: one initial query plus one per iteration, never above the budget, and
  # the full budget for every example that did not succeed.
  q, it = np.asarray(out.info.queries), np.asarray(out.info.iterations)
  np.testing.assert_array_equal(q, it + 1)
  assert q.max() <= queries
  assert np.all(q[~np.asarray(out.info.success)] == queries)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_query_count_equals_model_evaluations(norm):
  # One example: every row the model evaluates is a query, plus finalize's success check.
  logits_fn, x, y = digits_model()
  counter = RowCounter(logits_fn)
  out = square_attack(counter, x[5:6], y[5:6], jax.random.key(1), eps=0.05, norm=norm,
                      max_queries=40)
  jax.effects_barrier()
  assert counter.rows == int(out.info.queries[0]) + 1
  assert int(out.info.queries[0]) == 40 or bool(out.info.success[0])


def test_zero_budget_returns_input():
  logits_fn, x, y = digits_model()
  out = square_attack(logits_fn, x[:4], y[:4], jax.random.key(0), eps=0.3, max_queries=0)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(x[:4]))
  assert not np.any(np.asarray(out.info.success))
  np.testing.assert_array_equal(np.asarray(out.info.queries), 0)


def test_p_schedule_matches_reference_formula():
  # The paper's p_selection, evaluated with exact rational arithmetic.
  def reference(p_init, it, n_iters):
    it = (it * 10000) // n_iters
    for k, (lo, hi) in enumerate([(10, 50), (50, 200), (200, 500), (500, 1000), (1000, 2000),
                                  (2000, 4000), (4000, 6000), (6000, 8000), (8000, 10000)]):
      if lo < it <= hi:
        return p_init / 2 ** (k + 1)
    return p_init

  for n in (1, 37, 1000, 10000):
    its = np.arange(n)
    got = np.asarray(square.p_selection(0.05, jnp.asarray(its), square.schedule_thresholds(n)))
    want = np.array([reference(0.05, i, n) for i in its])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _reference_meta_pattern(s):
  """The paper's L2 update shape, written with explicit nested squares (numpy)."""
  def rect(rows, cols):
    delta = np.zeros((rows, cols))
    ci, cj = rows // 2, cols // 2
    for k in range(max(ci, cj) + 1):
      delta[max(ci - k, 0):ci + k + 1, max(cj - k, 0):cj + k + 1] += 1.0 / (k + 1) ** 2
    return delta / np.sqrt(np.sum(delta ** 2)) if delta.size else delta

  delta = np.zeros((s, s))
  delta[:s // 2] = rect(s // 2, s)
  delta[s // 2:] = -rect(s - s // 2, s)
  return delta / np.sqrt(np.sum(delta ** 2))


@pytest.mark.parametrize("s", [1, 3, 4, 5, 8, 11])
def test_l2_bump_matches_reference(s):
  table = square._square_sum_table(16)
  got = np.asarray(square._meta_pattern(jnp.int32(s), 12, table))
  np.testing.assert_allclose(got[:s, :s], _reference_meta_pattern(s), atol=1e-6)
  assert np.all(got[s:] == 0) and np.all(got[:, s:] == 0)


def test_linf_perturbation_stays_on_the_vertices():
  # Stripes and square updates only ever set entries to x +- eps: away from the box edges every
  # entry of the perturbation has magnitude eps.
  logits_fn, x, y = digits_model()
  x0 = jnp.full((4, 8, 8, 1), 0.5)
  out = square_attack(logits_fn, x0, y[:4], jax.random.key(2), eps=0.1, max_queries=30)
  delta = np.asarray(out.x_adv - x0)
  np.testing.assert_allclose(np.abs(delta), 0.1, atol=1e-6)


def test_l2_output_on_sphere_when_not_clipped():
  logits_fn, _, y = digits_model()
  x0 = jnp.full((4, 8, 8, 1), 0.5)
  out = square_attack(logits_fn, x0, y[:4], jax.random.key(3), eps=0.3, norm="l2",
                      max_queries=25)
  np.testing.assert_allclose(np.asarray(out.info.l2), 0.3, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=0.1, norm="l1"), "Unknown norm"),
    (dict(eps=0.1, loss="hinge"), "Unknown loss"),
    (dict(eps=0.1, max_queries=-1), "max_queries"),
    (dict(eps=0.1, p_init=1.5), "p_init"),
    (dict(eps=0.1, clip_min=1.0, clip_max=0.0), "clip_min"),
])
def test_invalid_hyperparameters(kwargs, match):
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match=match):
    square_attack(logits_fn, x[:2], y[:2], jax.random.key(0), **kwargs)


def test_small_images_are_rejected_for_l2():
  logits_fn, _, y = digits_model()
  with pytest.raises(ValueError, match="at least 5x5"):
    square_attack(logits_fn, jnp.zeros((1, 4, 4, 1)), y[:1], jax.random.key(0), eps=1.0,
                  norm="l2")
