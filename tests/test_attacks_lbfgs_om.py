"""Tests for the box-constrained L-BFGS attack (BLB) and OptMargin (OM)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_testing import AttackCase
from attack_testing import digits_model
from attack_testing import linear_model
from attack_testing import run_standard_properties

from advtrace._src.attacks import binary_search
from advtrace._src.attacks import cw
from advtrace._src.attacks import lbfgs
from advtrace._src.attacks import optmargin

CASES = [
    AttackCase("box_lbfgs", lbfgs.box_lbfgs,
               dict(binary_search_steps=3, max_iterations=15, initial_const=0.1), targeted=True,
               zero_kwargs=dict(max_iterations=0), per_example="initial_const",
               per_example_values=(0.1, 10.0)),
    AttackCase("optmargin", optmargin.optmargin,
               dict(binary_search_steps=3, max_iterations=20, learning_rate=0.1,
                    initial_const=0.1, noise_count=5),
               zero_kwargs=dict(binary_search_steps=0), per_example="noise_mag",
               per_example_values=(0.1, 0.3), stochastic=True),
]


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _constant_model(x):
  """Logits that ignore the input, always class 9: no attack on label 9 can succeed."""
  return jnp.broadcast_to(jnp.arange(10.0), (x.shape[0], 10)) + 0.0 * jnp.sum(x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:5], y[:5])


# ---------------------------------------------------------------------------- BLB


def test_box_lbfgs_effective_targeted():
  logits_fn, x, y = digits_model()
  target = (y + 1) % 10
  out = lbfgs.box_lbfgs(logits_fn, x, target, binary_search_steps=5, max_iterations=100)
  assert float(jnp.mean(out.info.success)) >= 0.9
  assert float(jnp.median(out.info.l2)) < 2.0
  # One initial evaluation per round, at least one per iteration (line-search trials).
  assert bool(jnp.all(out.info.queries >= out.info.iterations + 5))


def test_box_lbfgs_requires_targeted():
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match="targeted attack"):
    lbfgs.box_lbfgs(logits_fn, x[:2], y[:2], targeted=False)


def test_projected_lbfgs_matches_scipy_lbfgsb():
  # ||x' - x||^2 + c CE(W x' + b, t) is strictly convex: one minimiser over the box, which
  # scipy's L-BFGS-B (float64) finds. Most digit pixels sit at 0, so bounds are active.
  optimize = pytest.importorskip("scipy.optimize")
  logits_fn, w, b = linear_model(seed=3)
  _, x, y = digits_model()
  x, target, const = x[:3], (y[:3] + 4) % 10, jnp.array([3.0, 10.0, 30.0])
  cfg = lbfgs.Config(memory_size=10, max_linesearch=20, pgtol=1e-7, ftol=1e-9,
                     clip_min=0.0, clip_max=1.0)
  best = binary_search.Best(x, jnp.full((3,), jnp.inf), jnp.zeros((3,), bool))
  state = lbfgs.minimise(logits_fn, x, target.astype(jnp.int32), const, best, cfg, 200)

  w64, b64 = np.asarray(w, np.float64), np.asarray(b, np.float64)
  for i in range(3):
    x0, t, c = np.asarray(x[i], np.float64).ravel(), int(target[i]), float(const[i])

    def fun(v, x0=x0, t=t, c=c):
      z = v @ w64 + b64
      p = np.exp(z - z.max())
      p /= p.sum()
      ce = -np.log(p[t])
      grad = 2 * (v - x0) + c * (w64 @ (p - np.eye(10)[t]))
      return np.sum((v - x0) ** 2) + c * ce, grad

    ref = optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * x0.size,
                            options=dict(ftol=1e-15, gtol=1e-10, maxiter=1000))
    ours = np.asarray(state.x_k[i], np.float64).ravel()
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    assert np.sum(ours == 0.0) > 10  # the bound is active, and exactly respected
    assert fun(ours)[0] <= ref.fun * (1 + 1e-6)
    np.testing.assert_allclose(ours, ref.x, atol=5e-4)


def test_box_lbfgs_more_binary_steps_never_worse():
  logits_fn, x, y = digits_model()
  target = (y[:8] + 3) % 10
  kw = dict(max_iterations=40, initial_const=0.01)
  short = lbfgs.box_lbfgs(logits_fn, x[:8], target, binary_search_steps=2, **kw)
  long = lbfgs.box_lbfgs(logits_fn, x[:8], target, binary_search_steps=5, **kw)
  assert bool(jnp.all(long.info.success | ~short.info.success))
  both = np.asarray(short.info.success)
  assert np.all(np.asarray(long.info.l2)[both] <= np.asarray(short.info.l2)[both] + 1e-6)
  assert int(jnp.sum(long.info.success)) > int(jnp.sum(short.info.success))


# ---------------------------------------------------------------------------- OptMargin


def test_optmargin_effective():
  logits_fn, x, y = digits_model()
  out = optmargin.optmargin(logits_fn, x, y, jax.random.key(0), binary_search_steps=4,
                            max_iterations=100)
  assert float(jnp.mean(out.info.success)) >= 0.9


def test_optmargin_all_rule_is_robust_to_its_noise():
  logits_fn, x, y = digits_model()
  x, y, key = x[:16], y[:16], jax.random.key(1)
  kw = dict(binary_search_steps=4, max_iterations=100)
  om = optmargin.optmargin(logits_fn, x, y, key, decision_rule="all", **kw)
  plain = cw.cw_l2(logits_fn, x, y, learning_rate=0.2, initial_const=0.02, **kw)
  ok = np.asarray(om.info.success)
  assert ok.mean() >= 0.75
  om_frac = np.asarray(optmargin.optmargin_noise_success(logits_fn, om.x_adv, y, key))
  cw_frac = np.asarray(optmargin.optmargin_noise_success(logits_fn, plain.x_adv, y, key))
  np.testing.assert_array_equal(om_frac[ok], 1.0)  # every copy, by the decision rule
  assert om_frac.mean() > cw_frac.mean() + 0.2
  # Robustness costs distance.
  assert np.median(np.asarray(om.info.l2)[ok]) > np.median(np.asarray(plain.info.l2)[ok])


def test_optmargin_single_copy_is_cw():
  logits_fn, x, y = digits_model()
  kw = dict(binary_search_steps=2, max_iterations=20, learning_rate=0.1, initial_const=0.1)
  om = optmargin.optmargin(logits_fn, x[:4], y[:4], jax.random.key(0), noise_count=1, **kw)
  plain = cw.cw_l2(logits_fn, x[:4], y[:4], **kw)
  np.testing.assert_allclose(np.asarray(om.x_adv), np.asarray(plain.x_adv), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(om.info.queries), np.asarray(plain.info.queries))


@pytest.mark.parametrize("scaling", ["linf", "rms"])
def test_noise_vectors(scaling):
  noise = optmargin.noise_vectors(jax.random.key(0), (8, 8, 1), 20, 0.3, scaling)
  assert noise.shape == (20, 8, 8, 1)
  flat = np.asarray(noise, np.float64).reshape(20, -1)
  np.testing.assert_array_equal(flat[-1], 0.0)
  gram = flat[:-1] @ flat[:-1].T
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-5)  # orthogonal
  if scaling == "linf":
    assert np.abs(flat).max() <= 0.3 + 1e-6
    np.testing.assert_allclose(np.diag(gram), np.diag(gram)[0], rtol=1e-5)
  else:
    np.testing.assert_allclose(np.sqrt(np.mean(flat[:-1] ** 2, axis=1)), 0.3, rtol=1e-5)


def test_optmargin_queries_count_copies():
  logits_fn, x, y = digits_model()
  out = optmargin.optmargin(logits_fn, x[:4], y[:4], jax.random.key(0), binary_search_steps=2,
                            max_iterations=10, noise_count=5, abort_early=False)
  np.testing.assert_array_equal(np.asarray(out.info.iterations), 20)
  np.testing.assert_array_equal(np.asarray(out.info.queries), 100)


# ---------------------------------------------------------------------------- shared


@pytest.mark.parametrize("name", ["box_lbfgs", "optmargin"])
def test_failure_returns_x(name):
  _, x, _ = digits_model()
  if name == "box_lbfgs":
    out = lbfgs.box_lbfgs(_constant_model, x[:4], jnp.full((4,), 3, jnp.int32),
                          binary_search_steps=2, max_iterations=5)
  else:
    out = optmargin.optmargin(_constant_model, x[:4], jnp.full((4,), 9, jnp.int32),
                              jax.random.key(0), binary_search_steps=2, max_iterations=5,
                              noise_count=3)
  assert not bool(jnp.any(out.info.success))
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(x[:4]))


@pytest.mark.parametrize("fn,kwargs,match", [
    (lbfgs.box_lbfgs, dict(initial_const=0.0), "initial_const must be > 0"),
    (lbfgs.box_lbfgs, dict(memory_size=0), "memory_size must be an integer >= 1"),
    (lbfgs.box_lbfgs, dict(max_iterations=-1), "max_iterations must be an integer"),
    (optmargin.optmargin, dict(noise_count=65), r"noise_count must be an integer in \[1, 64\]"),
    (optmargin.optmargin, dict(noise_scaling="l2"), "Unknown noise_scaling"),
    (optmargin.optmargin, dict(decision_rule="any"), "Unknown decision_rule"),
    (optmargin.optmargin, dict(noise_mag=-0.3), "noise_mag must be >= 0"),
])
def test_invalid_hyperparameters(fn, kwargs, match):
  logits_fn, x, y = digits_model()
  kwargs = dict(kwargs, targeted=True) if fn is lbfgs.box_lbfgs else kwargs
  with pytest.raises(ValueError, match=match):
    fn(logits_fn, x[:4], y[:4], jax.random.key(0), **kwargs)
