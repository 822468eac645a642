"""Tests for JSMA and BPDA (with quantisation as the non-differentiable preprocessing)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_testing import AttackCase
from attack_testing import digits_model
from attack_testing import linear_model
from attack_testing import run_standard_properties
from attack_testing import targets_for

from advtrace._src.attacks import jsma as jsma_lib
from advtrace._src.attacks import loop
from advtrace._src.attacks.bpda import bpda
from advtrace._src.attacks.bpda import bpda_pgd
from advtrace._src.attacks.bpda import quantize
from advtrace._src.attacks.gradient import bim
from advtrace._src.attacks.gradient import pgd
from advtrace._src.attacks.jsma import jsma

pytestmark = pytest.mark.usefixtures("fast_compiles")

# ---------------------------------------------------------------------------------- JSMA

JSMA_CASES = [
    AttackCase("jsma_gamma", jsma, dict(gamma=0.1), targeted=True, zero_kwargs=dict(gamma=0.0),
               per_example="gamma", per_example_values=(0.05, 0.15)),
    AttackCase("jsma_theta_chunked", jsma, dict(gamma=0.1, theta=0.5, chunk_size=5),
               targeted=True, per_example="theta", per_example_values=(0.5, 1.0)),
]


def _check_l0_budget(out, x, gamma):
  d = int(np.prod(x.shape[1:]))
  changed = (np.asarray(out.x_adv) != np.asarray(x)).reshape(x.shape[0], -1).sum(1)
  assert np.all(changed <= 2 * math.ceil(gamma * d / 2)), changed
  np.testing.assert_array_equal(np.asarray(out.info.l0), changed)
  assert np.all(np.asarray(out.x_adv) >= np.asarray(x))  # features only increase


@pytest.mark.parametrize("case", JSMA_CASES, ids=lambda c: c.name)
def test_jsma_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:6], y[:6])
  out = case(logits_fn, x[:6], targets_for(y[:6]), jax.random.key(0))
  _check_l0_budget(out, x[:6], 0.1)


def test_jsma_effective_on_trained_model():
  logits_fn, x, y = digits_model()
  target = targets_for(y[:32])
  out = jsma(logits_fn, x[:32], target, gamma=0.3)
  assert float(jnp.mean(out.info.success)) > 0.7
  _check_l0_budget(out, x[:32], 0.3)
  # It stops as soon as the target is reached: one more Jacobian evaluation (the one that sees
  # the target) than pair updates, and no update after it.
  budget = math.ceil(0.3 * 64 / 2)
  early = np.asarray(out.info.success & (out.info.iterations < budget))
  assert early.any()
  np.testing.assert_array_equal(np.asarray(out.info.queries)[early],
                                np.asarray(out.info.iterations)[early] + 1)


def test_jsma_respects_search_domain():
  logits_fn, x, y = digits_model()
  x = x[:8].at[:, :, :4].set(1.0)  # left half saturated: never in the search domain
  out = jsma(logits_fn, x, targets_for(y[:8]), gamma=0.3, theta=0.5)
  np.testing.assert_array_equal(np.asarray(out.x_adv[:, :, :4]), 1.0)
  assert bool(jnp.any(out.x_adv != x))


def test_jsma_chunked_equals_unchunked():
  logits_fn, x, y = digits_model()
  target = targets_for(y[:8])
  full = jsma(logits_fn, x[:8], target, gamma=0.2, chunk_size=64)
  for chunk in (1, 7):
    part = jsma(logits_fn, x[:8], target, gamma=0.2, chunk_size=chunk)
    np.testing.assert_array_equal(np.asarray(part.x_adv), np.asarray(full.x_adv))


def _brute_force_pair(alpha, beta, domain):
  """The paper's Algorithm 3 loop: first best admissible pair in row-major order."""
  best, pair = -np.inf, None
  for p, q in itertools.product(range(len(alpha)), repeat=2):
    if p == q or not (domain[p] and domain[q]):
      continue
    a, b = alpha[p] + alpha[q], beta[p] + beta[q]
    if a > 0 and b < 0 and -a * b > best:
      best, pair = -a * b, (p, q)
  return pair


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [1, 3, 5, 17])
def test_best_pair_matches_paper_formula(seed, chunk):
  rng = np.random.default_rng(seed)
  d = 17
  alpha = rng.normal(size=d).astype(np.float32)
  beta = rng.normal(size=d).astype(np.float32)
  domain = rng.random(d) < 0.7
  p, q, found = jsma_lib.best_pair(jnp.asarray(alpha), jnp.asarray(beta), jnp.asarray(domain),
                                   chunk)
  expect = _brute_force_pair(alpha, beta, domain)
  assert bool(found) == (expect is not None)
  if expect is not None:
    assert (int(p), int(q)) == expect


def _deepsec_pair(target_grad, others_grad, domain):
  """DEEPSEC's ``JSMAAttack.saliency_map`` (increasing features), in numpy.

  Features outside the domain are pushed out of the admissible set by shifting their target
  derivative down and their other-classes derivative up by twice the largest magnitude; the
  score is ``alpha * |beta|`` on the pairs with ``alpha > 0``, ``beta < 0`` and ``p != q``, zero
  elsewhere, and the pair is the first maximum of the flattened map.
  """
  d = len(target_grad)
  coef = 2.0 * ~domain
  t = target_grad - coef * np.abs(target_grad).max()
  o = others_grad + coef * np.abs(others_grad).max()
  alpha = t[None, :] + t[:, None]
  beta = o[None, :] + o[:, None]
  mask = (alpha > 0) & (beta < 0) & ~np.eye(d, dtype=bool)
  scores = alpha * np.abs(beta) * mask
  k = int(np.argmax(scores))
  return (k // d, k % d), bool(scores.max() > 0)


@pytest.mark.parametrize("seed", range(6))
def test_best_pair_matches_deepsec_saliency_map(seed):
  # DEEPSEC's map (its domain trick, alpha * |beta|) selects the same pair as best_pair. Where
  # no pair is admissible its all-zero map yields (0, 0); best_pair reports found=False.
  rng = np.random.default_rng(seed)
  d = 40
  jac = rng.normal(size=(10, d)).astype(np.float32)
  target = seed % 10
  alpha, beta = jac[target], jac.sum(0) - jac[target]
  domain = rng.random(d) < (0.7 if seed < 4 else 0.05)
  p, q, found = jsma_lib.best_pair(jnp.asarray(alpha), jnp.asarray(beta), jnp.asarray(domain),
                                   16)
  expect, expect_found = _deepsec_pair(alpha, beta, domain)
  assert bool(found) == expect_found
  if expect_found:
    assert (int(p), int(q)) == expect
  else:
    assert expect == (0, 0)


@pytest.mark.parametrize("jacobian", ["logits", "probs"])
def test_jsma_first_pair_on_linear_model(jacobian):
  # One pair update (ceil(gamma * 64 / 2) = 1) on logits = W x + b. With "logits" the Jacobian
  # is W: alpha = W[:, t], beta = the other columns' sum. With "probs" the rows of the softmax
  # Jacobian sum to zero, so beta = -alpha and the score is alpha^2: the pair is the two
  # features with the largest derivative of p_t, p_t (W[:, t] - W p).
  logits_fn, w, b = linear_model()
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 1), maxval=0.5)
  target = (jnp.argmax(logits_fn(x), -1) + 1) % 10
  out = jsma(logits_fn, x, target, gamma=2 / 64, theta=0.3, jacobian=jacobian)
  w = np.asarray(w, np.float64)
  for i in range(4):
    t = int(target[i])
    if jacobian == "logits":
      expect = _brute_force_pair(w[:, t], w.sum(1) - w[:, t], np.ones(64, bool))
    else:
      z = np.asarray(x[i], np.float64).reshape(-1) @ w + np.asarray(b, np.float64)
      prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      grad = prob[t] * (w[:, t] - w @ prob)
      expect = tuple(np.argsort(-grad)[:2])
      assert grad[list(expect)].sum() > 0
    changed = np.flatnonzero(np.asarray(out.x_adv[i] != x[i]).reshape(-1))
    assert set(changed.tolist()) == set(int(k) for k in expect)
  np.testing.assert_array_equal(np.asarray(out.info.iterations), 1)


def test_best_pair_none_admissible():
  alpha = -jnp.ones(6)  # alpha_p + alpha_q > 0 never holds
  _, _, found = jsma_lib.best_pair(alpha, -jnp.ones(6), jnp.ones(6, bool), 4)
  assert not bool(found)


def _linear_model(image_shape: tuple[int, ...], batch: int = 4):
  """A random linear 10-class model and a batch of images in [0, 0.5]."""
  kw, kx = jax.random.split(jax.random.key(0))
  w = jax.random.normal(kw, (int(np.prod(image_shape)), 10)) / 50.0

  def logits_fn(x):
    return x.reshape(x.shape[0], -1) @ w

  return logits_fn, jax.random.uniform(kx, (batch, *image_shape), maxval=0.5)


def _jsma_step_temp_bytes(image_shape: tuple[int, ...], batch: int = 4) -> int | None:
  """Scratch memory of one compiled JSMA step (chunk 64) on a linear model, or None when the
  backend does not report it."""
  d = int(np.prod(image_shape))
  logits_fn, x = _linear_model(image_shape, batch)
  state = jsma_lib._State(
      x_adv=x, domain=jnp.ones((batch, d), bool), target=jnp.zeros(batch, jnp.int32),
      theta=jnp.ones(batch), budget=jnp.full((batch,), 4, jnp.int32),
      updates=jnp.zeros(batch, jnp.int32), active=jnp.ones(batch, bool),
      iteration=jnp.zeros(batch, jnp.int32))
  cfg = jsma_lib._Config("logits", 64, 0.0, 1.0)
  stats = loop._jit_step.lower(jsma_lib._step, logits_fn, cfg, state).compile().memory_analysis()
  return None if stats is None else stats.temp_size_in_bytes


def test_jsma_memory_bounded_on_cifar_size():
  logits_fn, x = _linear_model((32, 32, 3))
  target = (jnp.argmax(logits_fn(x), -1) + 1) % 10
  out = jsma(logits_fn, x, target, gamma=0.002, chunk_size=64)  # ceil(3.07) = 4 pair updates
  assert out.x_adv.shape == x.shape
  assert np.all(np.asarray(out.info.l0) <= 8)
  # Checked at 64x64x3, where the full pair map (4 * 12288^2 floats, 2.3 GiB) dwarfs a backend's
  # fixed scratch (a GPU's 32 MiB cuBLAS workspace); chunking keeps the step near 4 * 12288 * 64.
  temp = _jsma_step_temp_bytes((64, 64, 3))
  if temp is not None:
    assert temp < 4 * 12288**2 * 4 / 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(targeted=False), "targeted attack"),
    (dict(theta=0.0), "theta must be > 0"),
    (dict(theta=-1.0), "theta must be > 0"),
    (dict(gamma=1.5), "gamma"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(jacobian="softmax"), "Unknown jacobian"),
])
def test_jsma_invalid_arguments(kwargs, match):
  logits_fn, x, y = digits_model()
  kwargs = {"targeted": True, **kwargs}
  with pytest.raises(ValueError, match=match):
    jsma(logits_fn, x[:2], targets_for(y[:2]), **kwargs)


# ---------------------------------------------------------------------------------- BPDA


def _double(x):
  return 2.0 * x


def test_quantize_values():
  x = jnp.array([0.0, 0.1, 0.5, 1.0, 0.0021])
  # rtol: a GPU divides by 255 as a multiplication by 1/255, one float32 ulp off.
  np.testing.assert_allclose(np.asarray(quantize(x)), np.round(np.asarray(x) * 255) / 255,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(quantize(x, levels=2)), [0, 0, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(quantize(quantize(x))), np.asarray(quantize(x)))


def test_bpda_forward_and_straight_through_gradient():
  logits_fn, x, _ = digits_model()
  x = x[:4]
  wrapped = bpda(logits_fn, quantize)
  np.testing.assert_allclose(np.asarray(wrapped(x)), np.asarray(logits_fn(quantize(x))),
                             rtol=1e-6)

  def loss(fn, z):
    return jnp.sum(fn(z)[:, 3])

  g_bpda = jax.grad(lambda z: loss(wrapped, z))(x)
  g_at_q = jax.grad(lambda z: loss(logits_fn, z))(quantize(x))
  np.testing.assert_allclose(np.asarray(g_bpda), np.asarray(g_at_q), rtol=1e-5, atol=1e-7)
  # The plain gradient through rounding is zero everywhere.
  g_plain = jax.grad(lambda z: loss(lambda u: logits_fn(quantize(u)), z))(x)
  np.testing.assert_array_equal(np.asarray(g_plain), 0.0)
  # A custom backward replaces the preprocessing's VJP: here d(2x)/dx = 2.
  g_double = jax.grad(lambda z: loss(bpda(logits_fn, quantize, _double), z))(x)
  np.testing.assert_allclose(np.asarray(g_double), 2 * np.asarray(g_at_q), rtol=1e-5, atol=1e-7)


def test_bpda_wrappers_share_caches():
  logits_fn, _, _ = digits_model()
  assert bpda(logits_fn, quantize) == bpda(logits_fn, quantize)
  assert hash(bpda(logits_fn, quantize)) == hash(bpda(logits_fn, quantize))
  assert bpda(logits_fn, quantize) != bpda(logits_fn, quantize, _double)


def test_pgd_on_bpda_standard_properties():
  logits_fn, x, y = digits_model()
  case = AttackCase("pgd_bpda", pgd, dict(eps=0.2, step_size=0.05, num_steps=4),
                    zero_kwargs=dict(eps=0.0), norm="linf", stochastic=True)
  # The attacked model is the defended one, quantisation included.
  run_standard_properties(case, bpda(logits_fn, quantize), x[:6], y[:6])


def test_bpda_beats_quantisation_where_plain_gradients_fail():
  logits_fn, x, y = digits_model()
  x, y = x[:32], y[:32]
  defended = jax.jit(lambda z: logits_fn(quantize(z)))
  kw = dict(eps=0.3, step_size=0.04, num_steps=20)
  plain = bim(defended, x, y, **kw)  # zero gradient: BIM never moves
  np.testing.assert_array_equal(np.asarray(plain.x_adv), np.asarray(x))
  assert float(jnp.mean(plain.info.success)) == 0.0
  out = bpda_pgd(logits_fn, x, y, jax.random.key(0), **kw)
  same = pgd(bpda(logits_fn, quantize), x, y, jax.random.key(0), **kw)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(same.x_adv))
  assert float(jnp.mean(out.info.success)) > 0.8
  pred = jnp.argmax(defended(out.x_adv), -1)  # success is measured on the defended model
  np.testing.assert_array_equal(np.asarray(out.info.success), np.asarray(pred != y))


def test_bpda_invalid_arguments():
  logits_fn, _, _ = digits_model()
  with pytest.raises(TypeError, match="callable"):
    bpda(logits_fn, 3)
  with pytest.raises(TypeError, match="backward"):
    bpda(logits_fn, quantize, backward="identity")
  with pytest.raises(ValueError, match="levels"):
    quantize(jnp.zeros(3), levels=1)
