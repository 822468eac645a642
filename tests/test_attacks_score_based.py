"""Tests for the score-based query attacks: SPSA, NES, Bandits with priors, SimBA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from attack_testing import AttackCase
from attack_testing import digits_model
from attack_testing import linear_model
from attack_testing import run_standard_properties

from advtrace._src.attacks import score_based as sb

pytestmark = pytest.mark.usefixtures("fast_compiles")


CASES = [
    AttackCase("spsa_linf", sb.spsa,
               dict(eps=0.2, num_steps=3, learning_rate=0.1, num_samples=4),
               zero_kwargs=dict(eps=0.0), norm="linf", stochastic=True),
    AttackCase("spsa_l2_targeted_early_stop", sb.spsa,
               dict(eps=1.0, norm="l2", num_steps=3, learning_rate=0.1, num_samples=4,
                    spsa_iters=2, early_stop=True, max_queries=40),
               targeted=True, zero_kwargs=dict(eps=0.0), norm="l2", stochastic=True,
               per_example_values=(0.5, 1.5)),
    AttackCase("nes_linf", sb.nes,
               dict(eps=0.2, step_size=0.05, sigma=0.01, num_samples=4, max_queries=60),
               zero_kwargs=dict(eps=0.0), norm="linf", stochastic=True),
    AttackCase("nes_l2_targeted_momentum", sb.nes,
               dict(eps=1.0, step_size=0.3, sigma=0.01, num_samples=4, max_queries=60,
                    norm="l2", momentum=0.5, loss="margin"),
               targeted=True, zero_kwargs=dict(max_queries=0), norm="l2", stochastic=True,
               per_example_values=(0.5, 1.5)),
    AttackCase("bandits_linf_tiled", sb.bandits,
               dict(eps=0.2, max_queries=30, image_lr=0.05, online_lr=100.0, exploration=1.0,
                    fd_eta=0.1, prior_size=3),
               zero_kwargs=dict(eps=0.0), norm="linf", stochastic=True),
    AttackCase("bandits_l2_blackboxbench", sb.bandits,
               dict(eps=1.0, norm="l2", max_queries=30, image_lr=0.2, online_lr=0.1,
                    exploration=0.1, fd_eta=0.01, prior_size=5, convention="blackboxbench",
                    early_stop=False),
               zero_kwargs=dict(num_steps=0), norm="l2", stochastic=True,
               per_example_values=(0.5, 1.5)),
    AttackCase("simba_pixel", sb.simba, dict(step_size=0.2, max_queries=25),
               zero_kwargs=dict(step_size=0.0), per_example="step_size",
               per_example_values=(0.1, 0.3), stochastic=True),
    AttackCase("simba_dct_targeted", sb.simba,
               dict(step_size=0.3, max_queries=25, basis="dct", freq_dim=2),
               targeted=True, zero_kwargs=dict(num_iters=0), per_example="step_size",
               per_example_values=(0.2, 0.5), stochastic=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:4], y[:4])


EFFECTIVE = [
    ("spsa", sb.spsa, dict(eps=0.3, learning_rate=0.1, num_steps=10, num_samples=16,
                           early_stop=True), False, 0.5),
    ("spsa_targeted", sb.spsa, dict(eps=0.3, learning_rate=0.1, num_steps=20, num_samples=16,
                                    early_stop=True), True, 0.7),
    ("nes", sb.nes, dict(eps=0.3, step_size=0.05, sigma=0.01, num_samples=10,
                         max_queries=1000), False, 0.5),
    ("bandits_linf", sb.bandits, dict(eps=0.3, image_lr=0.05, online_lr=100.0, exploration=1.0,
                                      fd_eta=0.1, prior_size=4, max_queries=1000), False, 0.5),
    ("bandits_l2", sb.bandits, dict(eps=2.0, norm="l2", image_lr=0.2, online_lr=0.1,
                                    exploration=0.01, fd_eta=0.01, max_queries=1000), False, 0.5),
    ("simba_pixel", sb.simba, dict(step_size=0.3, max_queries=300), False, 0.5),
    ("simba_dct_targeted", sb.simba, dict(step_size=0.3, max_queries=600, basis="dct"), True,
     0.7),
]


@pytest.mark.parametrize("name,fn,kwargs,targeted,threshold", EFFECTIVE,
                         ids=[e[0] for e in EFFECTIVE])
def test_effective_on_trained_model(name, fn, kwargs, targeted, threshold):
  del name
  logits_fn, x, y = digits_model()
  x, y = x[:32], y[:32]
  labels = (y + 1) % 10 if targeted else y
  out = fn(logits_fn, x, labels, jax.random.key(0), targeted=targeted, **kwargs)
  assert float(jnp.mean(out.info.success)) > threshold
  budget = kwargs.get("max_queries")
  if budget is not None:
    assert int(out.info.queries.max()) <= budget


# ---------------------------------------------------------------------------- exact queries


def _spent_out(queries, budget, cost, start=0):
  """Examples that stopped because the next step would not fit in the budget.

  With a start query (``start=1``), an example that never queried could not afford it plus one
  step.
  """
  return np.where(queries == 0, budget < start + cost, queries + cost > budget)


def test_spsa_queries_exact():
  # Same batch size and settings as the property cases, so the compiled steps are reused.
  logits_fn, x, y = digits_model()
  x, y = x[:4], y[:4]
  kw = dict(CASES[0].kwargs, num_steps=5)
  out = sb.spsa(logits_fn, x, y, jax.random.key(0), **kw)
  np.testing.assert_array_equal(out.info.iterations, 5)
  np.testing.assert_array_equal(out.info.queries, 5 * 2 * 4)
  # A budget that is not a multiple of the step cost: 30 // 8 = 3 steps.
  out = sb.spsa(logits_fn, x, y, jax.random.key(0), **kw, max_queries=30)
  np.testing.assert_array_equal(out.info.iterations, 3)
  np.testing.assert_array_equal(out.info.queries, 24)
  # spsa_iters=2 batches of 4 pairs, and early stopping queries every new iterate: 17 per step.
  kw = dict(CASES[1].kwargs, num_steps=30, max_queries=np.array([16, 17, 60, 100]))
  out = sb.spsa(logits_fn, x, (y + 1) % 10, jax.random.key(0), targeted=True, **kw)
  q, t = np.asarray(out.info.queries), np.asarray(out.info.iterations)
  np.testing.assert_array_equal(q, t * 17)
  assert np.all(q <= kw["max_queries"]) and q[0] == 0 and q[1] == 17
  assert np.all(np.asarray(out.info.success) | _spent_out(q, kw["max_queries"], 17))


@pytest.mark.parametrize("early_stop", [True, False])
def test_nes_queries_exact(early_stop):
  logits_fn, x, y = digits_model()
  x, y = x[:8], y[:8]
  n, budget = 3, np.array([0, 7, 8, 50, 51, 100, 37, 1000])
  out = sb.nes(logits_fn, x, y, jax.random.key(1), eps=0.3, step_size=0.05, sigma=0.01,
               num_samples=n, max_queries=budget, early_stop=early_stop)
  q, t = np.asarray(out.info.queries), np.asarray(out.info.iterations)
  assert np.all(q <= budget)
  cost = 2 * n + int(early_stop)
  if early_stop:
    np.testing.assert_array_equal(q, np.where(budget >= 1 + cost, 1 + t * cost, 0))
    assert np.all(np.asarray(out.info.success) | _spent_out(q, budget, cost, 1))
  else:
    np.testing.assert_array_equal(q, t * cost)
    np.testing.assert_array_equal(t, budget // cost)
  assert q[0] == 0 and t[0] == 0
  np.testing.assert_array_equal(out.x_adv[0], x[0])


@pytest.mark.parametrize("early_stop", [True, False])
def test_bandits_queries_exact(early_stop):
  logits_fn, x, y = digits_model()
  x, y = x[:8], y[:8]
  budget = np.array([0, 2, 3, 4, 11, 12, 100, 301])
  out = sb.bandits(logits_fn, x, y, jax.random.key(2), eps=0.2, prior_size=4,
                   max_queries=budget, early_stop=early_stop)
  q, t = np.asarray(out.info.queries), np.asarray(out.info.iterations)
  assert np.all(q <= budget)
  if early_stop:
    np.testing.assert_array_equal(q, np.where(budget >= 4, 1 + 3 * t, 0))
    assert np.all(np.asarray(out.info.success) | _spent_out(q, budget, 3, 1))
  else:
    np.testing.assert_array_equal(q, 2 * t)
    np.testing.assert_array_equal(t, budget // 2)


def _simba_reference(logits_np, x, label, key, *, step_size, budget, basis, freq_dim,
                     stride=1, targeted=False):
  """A plain NumPy loop over one example, written from Guo et al.'s ``simba_single``."""
  shape = x.shape
  order = np.asarray(sb.simba_order(key, shape, basis, freq_dim, stride))
  if basis == "pixel":
    directions = np.eye(order.size, dtype=np.float32)
  else:
    dh, dw = np.asarray(sb.dct_matrix(shape[0])), np.asarray(sb.dct_matrix(shape[1]))
    directions = np.einsum("uh,vw,cd->uvchwd", dh, dw, np.eye(shape[2])).reshape(order.size, -1)

  def query(delta):
    z = logits_np(np.clip(x + delta, 0.0, 1.0))
    p = np.exp(z - z.max())
    return p[label] / p.sum(), int(np.argmax(z))

  def better(p_new, p_old):
    return p_new > p_old if targeted else p_new < p_old

  def done(pred):
    return pred == label if targeted else pred != label

  delta = np.zeros(shape, np.float32)
  prob, pred = query(delta)
  queries, tries = 1, 0
  if done(pred):
    return delta, queries, tries
  while queries < budget:
    q = step_size * directions[order[tries % order.size]].reshape(shape)
    tries += 1
    p_left, pred_left = query(delta - q)
    queries += 1
    if better(p_left, prob):
      delta, prob, pred = delta - q, p_left, pred_left
    elif queries < budget:
      p_right, pred_right = query(delta + q)
      queries += 1
      if better(p_right, prob):
        delta, prob, pred = delta + q, p_right, pred_right
    if done(pred):
      break
  return delta, queries, tries


@pytest.mark.parametrize("basis,targeted", [("pixel", False), ("dct", True)])
def test_simba_matches_reference_loop(basis, targeted):
  # Inputs away from the box edges: no probe is clipped to a no-op, so no decision rests on a
  # rounding-level difference in probabilities.
  logits_fn, w, b = linear_model()
  w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
  x = jax.random.uniform(jax.random.key(3), (3, 8, 8, 1), minval=0.3, maxval=0.7)
  labels = jnp.argmax(logits_fn(x), -1)
  if targeted:
    labels = (labels + 1) % 10
  keys = jax.random.split(jax.random.key(4), 3)
  budget = np.array([40, 57, 200])
  out = sb.simba(logits_fn, x, labels, keys, step_size=0.4, max_queries=budget, basis=basis,
                 freq_dim=2, targeted=targeted)
  for i in range(3):
    delta, queries, tries = _simba_reference(
        lambda z: z.reshape(-1) @ w + b, np.asarray(x[i], np.float64), int(labels[i]), keys[i],
        step_size=0.4, budget=int(budget[i]), basis=basis, freq_dim=2, targeted=targeted)
    assert int(out.info.queries[i]) == queries
    assert int(out.info.iterations[i]) == tries
    np.testing.assert_allclose(np.asarray(out.x_adv[i]), np.clip(x[i] + delta, 0, 1),
                               atol=1e-5)
  assert np.all(np.asarray(out.info.queries) <= budget)


def test_simba_l2_bound_within_one_pass():
  logits_fn, x, y = digits_model()
  out = sb.simba(logits_fn, x[:4], y[:4], jax.random.key(0), **CASES[6].kwargs)
  # Orthonormal directions, each tried at most once in a pass, at most tries accepted.
  bound = 0.2 * np.sqrt(np.asarray(out.info.iterations)) + 1e-5
  assert np.all(np.asarray(out.info.l2) <= bound)


# ---------------------------------------------------------------------------- components


def test_dct_matrix_is_scipy_orthonormal_dct():
  for n in (1, 5, 8):
    d = np.asarray(sb.dct_matrix(n), np.float64)
    np.testing.assert_allclose(d, scipy.fft.dct(np.eye(n), norm="ortho", axis=0), atol=1e-6)
    np.testing.assert_allclose(d @ d.T, np.eye(n), atol=1e-6)


def test_simba_dct_direction_is_inverse_dct_of_a_unit_coefficient():
  shape = (6, 4, 3)
  for index in (0, 7, 40, 71):
    coef = np.zeros(shape)
    coef.reshape(-1)[index] = 1.0
    expect = scipy.fft.idctn(coef, axes=(0, 1), norm="ortho")
    got = sb._simba_direction("dct", jnp.int32(index), shape, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), expect, atol=1e-6)


def test_simba_order_low_frequencies_first():
  shape, fd, stride = (8, 8, 3), 2, 3
  order = np.asarray(sb.simba_order(jax.random.key(0), shape, "dct", fd, stride))
  np.testing.assert_array_equal(np.sort(order), np.arange(8 * 8 * 3))
  u, v = order // (8 * 3), (order // 3) % 8
  level = np.maximum(u, v)
  band = np.where(level < fd, 0, 1 + (level - fd) // stride)
  assert np.all(band[:3 * fd * fd] == 0)
  assert np.all(np.diff(band) >= 0)
  other = np.asarray(sb.simba_order(jax.random.key(1), shape, "dct", fd, stride))
  assert not np.array_equal(order, other)  # random within bands
  pixel = np.asarray(sb.simba_order(jax.random.key(0), shape, "pixel"))
  np.testing.assert_array_equal(np.sort(pixel), np.arange(8 * 8 * 3))


@pytest.mark.parametrize("estimator", ["spsa", "nes"])
def test_gradient_estimators_recover_a_linear_gradient(estimator):
  g = jax.random.normal(jax.random.key(0), (8, 8, 1))
  x = jnp.full((8, 8, 1), 0.5)

  def loss_fn(probes):
    return jnp.sum(probes * g, axis=(1, 2, 3))

  if estimator == "spsa":
    est = sb.spsa_gradient(loss_fn, x, jax.random.key(1), 0.01, 256, spsa_iters=4)
  else:
    est = sb.nes_gradient(loss_fn, x, jax.random.key(1), 0.01, 1024)
  cos = jnp.sum(est * g) / (jnp.linalg.norm(est) * jnp.linalg.norm(g))
  assert float(cos) > 0.9
  np.testing.assert_allclose(float(jnp.linalg.norm(est)), float(jnp.linalg.norm(g)), rtol=0.25)


def test_upsample_is_torch_nearest():
  prior = jnp.arange(20.0)[:, None, None] * jnp.ones((20, 20, 1))
  up = sb._upsample(prior, (32, 32, 1))
  # torch Upsample(size=32, mode="nearest") reads source row floor(i * 20 / 32).
  np.testing.assert_array_equal(np.asarray(up[:, 0, 0]), np.floor(np.arange(32) * 0.625))


def test_eg_step_matches_formula_and_stays_finite():
  prior = jnp.array([-0.5, 0.0, 0.3, 0.9])
  grad = jnp.array([0.2, -1.0, 0.5, 2.0])
  r = (prior + 1) / 2
  pos, neg = r * jnp.exp(0.7 * grad), (1 - r) * jnp.exp(-0.7 * grad)
  np.testing.assert_allclose(np.asarray(sb._eg_step(prior, grad, 0.7)),
                             np.asarray(pos / (pos + neg) * 2 - 1), rtol=1e-5, atol=1e-6)
  huge = sb._eg_step(prior, 1e4 * grad, 100.0)
  assert np.all(np.isfinite(np.asarray(huge))) and np.all(np.abs(np.asarray(huge)) <= 1)


# ---------------------------------------------------------------------------- behaviour


def test_fused_and_host_loops_agree():
  logits_fn, x, y = digits_model()
  kw = CASES[2].kwargs
  a = sb.nes(logits_fn, x[:4], y[:4], jax.random.key(0), loop_mode="host", **kw)
  b = sb.nes(logits_fn, x[:4], y[:4], jax.random.key(0), loop_mode="fused", **kw)
  np.testing.assert_allclose(np.asarray(a.x_adv), np.asarray(b.x_adv), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(a.info.queries), np.asarray(b.info.queries))


@pytest.mark.parametrize("case", [CASES[3], CASES[7]], ids=lambda c: c.name)
def test_bfloat16_in_fused_loop(case):
  logits_fn, x, y = digits_model()
  labels = (y[:4] + 1) % 10 if case.targeted else y[:4]
  out = case(lambda z: logits_fn(z.astype(jnp.float32)), x[:4].astype(jnp.bfloat16), labels,
             jax.random.key(0), loop_mode="fused")
  assert out.x_adv.dtype == jnp.bfloat16
  assert np.all(np.asarray(out.info.queries) <= case.kwargs["max_queries"])


def test_time_prior_off_differs():
  logits_fn, x, y = digits_model()
  kw = CASES[5].kwargs
  a = sb.bandits(logits_fn, x[:4], y[:4], jax.random.key(0), **kw)
  b = sb.bandits(logits_fn, x[:4], y[:4], jax.random.key(0), time_prior=False, **kw)
  assert not np.array_equal(np.asarray(a.x_adv), np.asarray(b.x_adv))


def test_already_adversarial_start_costs_one_query():
  logits_fn, x, y = digits_model()
  wrong = (y[:4] + 3) % 10  # labels the model does not predict: untargeted success at start
  for case in (CASES[2], CASES[4], CASES[6]):
    out = case(logits_fn, x[:4], wrong, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.info.queries), 1)
    np.testing.assert_array_equal(np.asarray(out.info.iterations), 0)
    np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(x[:4]))


@pytest.mark.parametrize("fn,kwargs,match", [
    (sb.spsa, dict(eps=0.1, num_steps=2, norm="l1"), "Unknown norm"),
    (sb.spsa, dict(eps=0.1, num_steps=2, loss="hinge"), "Unknown loss"),
    (sb.spsa, dict(eps=-0.1, num_steps=2), "eps must be >= 0"),
    (sb.spsa, dict(eps=0.1, num_steps=2, delta=0.0), "delta must be > 0"),
    (sb.spsa, dict(eps=0.1, num_steps=2, num_samples=0), "num_samples"),
    (sb.nes, dict(eps=0.1, step_size=0.1, max_queries=None), "max_queries or num_steps"),
    (sb.nes, dict(eps=0.1, step_size=0.1, max_queries=-5), "max_queries"),
    (sb.nes, dict(eps=0.1, step_size=0.1, max_queries=1.5), "max_queries"),
    (sb.nes, dict(eps=0.1, step_size=0.1, momentum=1.0), "momentum"),
    (sb.bandits, dict(eps=0.1, convention="madry"), "Unknown convention"),
    (sb.bandits, dict(eps=0.1, prior_size=9), "prior_size"),
    (sb.simba, dict(basis="haar"), "Unknown basis"),
    (sb.simba, dict(freq_dim=0), "freq_dim"),
    (sb.simba, dict(max_queries=np.ones(3, int)), "shape"),
])
def test_invalid_hyperparameters(fn, kwargs, match):
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match=match):
    fn(logits_fn, x[:4], y[:4], jax.random.key(0), **kwargs)


def test_invalid_inputs():
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match="outside the allowed range"):
    sb.simba(logits_fn, x[:2] * 2.0, y[:2], jax.random.key(0))
  with pytest.raises(TypeError, match="typed PRNG key"):
    sb.nes(logits_fn, x[:2], y[:2], jax.random.PRNGKey(0), eps=0.1, step_size=0.1)
