"""Tests for the decision-based attacks: HopSkipJump and Sign-OPT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_testing import AttackCase
from attack_testing import RowCounter
from attack_testing import digits_model
from attack_testing import linear_model
from attack_testing import run_in_batches
from attack_testing import run_standard_properties

from advtrace._src.attacks.hopskipjump import hop_skip_jump
from advtrace._src.attacks.hopskipjump import starting_points
from advtrace._src.attacks.sign_opt import sign_opt


def _starts(targets):
  """A deterministic, model-free start per target: the first correctly classified test image of
  that class (digits_model's images are all correctly classified)."""
  _, pool, pool_labels = digits_model()
  first = {int(c): int(np.flatnonzero(np.asarray(pool_labels) == c)[0]) for c in range(10)}
  return pool[np.array([first[int(t)] for t in np.asarray(targets)])]


def _hsj_with_starts(logits_fn, x, labels, key, **kw):
  return hop_skip_jump(logits_fn, x, labels, key, x_init=_starts(labels), **kw)


def _sign_opt_with_starts(logits_fn, x, labels, key, **kw):
  return sign_opt(logits_fn, x, labels, key, x_init=_starts(labels), **kw)


# The property, effectiveness and accounting tests share these static settings and a batch of
# 4, so each attack configuration compiles once per model.
HSJ_SMALL = dict(num_iterations=2, max_queries=400, init_num_evals=25, max_num_evals=100,
                 eval_batch_size=50)
SIGN_OPT_SMALL = dict(max_queries=300, num_iterations=3, k=20, num_directions=4,
                      eval_batch_size=20)

CASES = [
    AttackCase("hsj_l2", hop_skip_jump, HSJ_SMALL, zero_kwargs=dict(max_queries=0),
               per_example="gamma", per_example_values=(1.0, 4.0), stochastic=True),
    AttackCase("hsj_linf_targeted", _hsj_with_starts, dict(HSJ_SMALL, norm="linf"),
               targeted=True, zero_kwargs=dict(max_queries=0), per_example="gamma",
               per_example_values=(1.0, 4.0), stochastic=True),
    AttackCase("sign_opt", sign_opt, SIGN_OPT_SMALL, zero_kwargs=dict(max_queries=0),
               per_example="alpha", per_example_values=(0.2, 0.5), stochastic=True),
    AttackCase("sign_opt_targeted", _sign_opt_with_starts, SIGN_OPT_SMALL, targeted=True,
               zero_kwargs=dict(max_queries=0), per_example="beta",
               per_example_values=(0.001, 0.01), stochastic=True),
]


# The targeted Sign-OPT case shares every code path with the two cases before it (the start
# from x_init as in hsj_linf_targeted, the decisions as in sign_opt); it runs in the
# effectiveness and linear-model tests but not through the full property list, to keep this
# file within its time budget.
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
def test_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:4], y[:4])


@pytest.mark.parametrize("case,norm,budget", [
    (CASES[0], "l2", dict(num_iterations=10, max_queries=None)),
    (CASES[1], "linf", dict(num_iterations=10, max_queries=None)),
    (CASES[2], "l2", dict(max_queries=1500, num_iterations=1000)),
    (CASES[3], "l2", dict(max_queries=1500, num_iterations=1000)),
], ids=lambda c: getattr(c, "name", ""))
def test_effective_and_distance_shrinks(case, norm, budget):
  logits_fn, x, y = digits_model()
  x, y = x[:12], y[:12]
  labels = (y + 1) % 10 if case.targeted else y
  start = run_in_batches(case, logits_fn, x, labels, num_iterations=0)
  out = run_in_batches(case, logits_fn, x, labels, **budget)
  success = np.asarray(out.info.success)
  assert success.mean() > (0.7 if case.targeted else 0.5)
  # The start is adversarial; the walk keeps every point adversarial while moving closer.
  assert np.all(np.asarray(start.info.success)[success])
  d0 = np.asarray(getattr(start.info, norm))[success]
  d1 = np.asarray(getattr(out.info, norm))[success]
  assert np.all(d1 <= d0 * (1 + 1e-5))
  assert np.mean(d1 / d0) < 0.8, (d0, d1)
  if budget["max_queries"] is not None:
    assert np.asarray(out.info.queries).max() <= budget["max_queries"]


def test_converges_to_closed_form_on_linear_model():
  # Two-class linear model: the smallest L2 adversarial perturbation has norm
  # |margin| / ||w0 - w1||. Started far from it (off the optimal line), both attacks approach it
  # from above; no adversarial point can be closer.
  logits_fn, w, b = linear_model(num_classes=2)
  x = jnp.clip(0.5 + 0.05 * jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), 0.0, 1.0)
  y = jnp.argmax(logits_fn(x), -1)
  wd = (w[:, 0] - w[:, 1]).reshape(1, 8, 8, 1)
  margin = jnp.sum(x * wd, axis=(1, 2, 3)) + b[0] - b[1]
  optimum = np.abs(np.asarray(margin)) / float(jnp.linalg.norm(wd))
  mirror = x - (2.5 * margin / jnp.sum(wd * wd))[:, None, None, None] * wd
  start = jnp.clip(mirror + 0.25 * jax.random.normal(jax.random.key(7), x.shape), 0.0, 1.0)
  assert np.all(np.asarray(jnp.argmax(logits_fn(start), -1) != y))
  hsj = hop_skip_jump(logits_fn, x, y, jax.random.key(0), x_init=start,
                      **dict(HSJ_SMALL, num_iterations=20, max_queries=None))
  so = sign_opt(logits_fn, x, y, jax.random.key(0), x_init=start,
                **dict(SIGN_OPT_SMALL, num_iterations=1000, max_queries=1500))
  for out in (hsj, so):
    assert np.all(np.asarray(out.info.success))
    ratio = np.asarray(out.info.l2) / optimum
    assert np.all(ratio >= 1 - 1e-4) and np.all(ratio < 1.1), ratio


@pytest.mark.parametrize("name", ["hsj", "sign_opt"])
def test_query_count_equals_model_evaluations(name):
  # One example and one sample per model call: every evaluated row is a query, plus the final
  # success check in finalize.
  logits_fn, x, y = digits_model()
  counter = RowCounter(logits_fn)
  if name == "hsj":
    out = hop_skip_jump(counter, x[3:4], y[3:4], jax.random.key(1), num_iterations=3,
                        init_num_evals=10, eval_batch_size=1)
  else:
    out = sign_opt(counter, x[3:4], y[3:4], jax.random.key(1), max_queries=150, k=10,
                   num_directions=3, eval_batch_size=1)
  jax.effects_barrier()
  assert counter.rows == int(out.info.queries[0]) + 1


@pytest.mark.parametrize("norm,binary_steps", [("l2", 9), ("linf", 12)])
def test_hsj_initial_queries_closed_form(norm, binary_steps):
  # With a given start: 1 check + a binary search of exactly log2(1/theta) steps, theta =
  # 1/d^1.5 (L2) or 1/d^2 (L-inf), d = 64. Without: >= 1 noise draw, 10 blend steps, the same.
  logits_fn, x, y = digits_model()
  kw = dict(HSJ_SMALL, norm=norm, num_iterations=0)
  out = _hsj_with_starts(logits_fn, x[:4], (y[:4] + 1) % 10, jax.random.key(0), targeted=True,
                         **kw)
  np.testing.assert_array_equal(np.asarray(out.info.queries), 1 + binary_steps)
  out = hop_skip_jump(logits_fn, x[:4], y[:4], jax.random.key(0), **kw)
  draws = np.asarray(out.info.queries) - 10 - binary_steps
  assert np.all(draws >= 1) and np.all(draws <= 100)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: c.name)
def test_budget_is_spent_exactly(case):
  # Neither attack stops early here, so every example spends exactly its budget.
  logits_fn, x, y = digits_model()
  out = case(logits_fn, x[:4], y[:4], jax.random.key(0), num_iterations=200, max_queries=523)
  np.testing.assert_array_equal(np.asarray(out.info.queries), 523)
  assert np.all(np.asarray(out.info.success))


def test_sign_opt_epsilon_filter():
  # adv_tracing's rule: results at distance >= epsilon are replaced by x.
  logits_fn, x, y = digits_model()
  free = CASES[2](logits_fn, x[:4], y[:4], jax.random.key(0))
  eps = float(np.median(np.asarray(free.info.l2)))
  out = CASES[2](logits_fn, x[:4], y[:4], jax.random.key(0), epsilon=eps)
  l2 = np.asarray(out.info.l2)
  success = np.asarray(out.info.success)
  assert np.all(l2[success] < eps) and np.all(l2[~success] == 0)
  assert success.any()


@pytest.mark.parametrize("fn,kwargs", [(hop_skip_jump, dict(HSJ_SMALL, norm="linf")),
                                       (sign_opt, SIGN_OPT_SMALL)])
def test_non_adversarial_start_fails_cleanly(fn, kwargs):
  # x itself is not classified as the target: one query finds that, and x comes back.
  logits_fn, x, y = digits_model()
  out = fn(logits_fn, x[:4], (y[:4] + 1) % 10, jax.random.key(0), x_init=x[:4], targeted=True,
           **kwargs)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(x[:4]))
  assert not np.any(np.asarray(out.info.success))
  np.testing.assert_array_equal(np.asarray(out.info.queries), 1)


def test_starting_points():
  logits_fn, x, y = digits_model()
  targets = jnp.array([3, 7, 7, 0])
  starts = starting_points(logits_fn, x, targets, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(starts), -1)), targets)
  only_01 = x[np.isin(np.asarray(y), [0, 1])]
  with pytest.raises(ValueError, match=r"class\(es\) \[5\]"):
    starting_points(logits_fn, only_01, jnp.array([0, 5]), jax.random.key(0))


@pytest.mark.parametrize("fn,kwargs,match", [
    (hop_skip_jump, dict(targeted=True), "needs x_init"),
    (sign_opt, dict(targeted=True), "needs x_init"),
    (hop_skip_jump, dict(norm="l1"), "Unknown norm"),
    (hop_skip_jump, dict(max_queries=-1), "max_queries"),
    (sign_opt, dict(max_queries=1.5), "max_queries"),
    (hop_skip_jump, dict(x_init=jnp.zeros((3, 8, 8, 1))), "same shape"),
    (sign_opt, dict(x_init=jnp.zeros((3, 8, 8, 1))), "x_init must have shape"),
    (hop_skip_jump, dict(gamma=0.0), "gamma must be > 0"),
    (sign_opt, dict(alpha=-1.0), "alpha must be > 0"),
    (sign_opt, dict(k=0), "k must be"),
])
def test_invalid_arguments(fn, kwargs, match):
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match=match):
    fn(logits_fn, x[:2], y[:2], jax.random.key(0), **kwargs)
