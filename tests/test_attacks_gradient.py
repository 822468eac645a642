"""Tests for FGSM, R+FGSM, BIM, PGD and MI-FGSM (and their targeted/least-likely forms)."""

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_testing import AttackCase
from attack_testing import digits_model
from attack_testing import linear_model
from attack_testing import run_standard_properties

from advtrace import attacks
from advtrace._src.attacks import loop

CASES = [
    AttackCase("fgsm_linf", attacks.fgsm, dict(eps=0.1), zero_kwargs=dict(eps=0.0), norm="linf"),
    AttackCase("fgsm_l2", attacks.fgsm, dict(eps=1.0, norm="l2"), zero_kwargs=dict(eps=0.0),
               norm="l2", per_example_values=(0.5, 1.5)),
    AttackCase("fgsm_l1", attacks.fgsm, dict(eps=2.0, norm="l1"), zero_kwargs=dict(eps=0.0),
               norm="l1", per_example_values=(1.0, 3.0)),
    AttackCase("rfgsm", attacks.rfgsm, dict(eps=0.2, alpha=0.1),
               zero_kwargs=dict(eps=0.0, alpha=0.0), norm="linf", per_example="alpha",
               per_example_values=(0.05, 0.1), stochastic=True),
    AttackCase("bim", attacks.bim, dict(eps=0.2, step_size=0.05, num_steps=5),
               zero_kwargs=dict(num_steps=0), norm="linf"),
    AttackCase("pgd_linf", attacks.pgd, dict(eps=0.2, step_size=0.05, num_steps=5),
               zero_kwargs=dict(eps=0.0), norm="linf", stochastic=True),
    AttackCase("pgd_l2_restarts", attacks.pgd,
               dict(eps=1.5, step_size=0.5, num_steps=4, norm="l2", num_restarts=2),
               zero_kwargs=dict(eps=0.0), norm="l2", stochastic=True,
               per_example_values=(0.5, 1.5)),
    AttackCase("mi_fgsm", attacks.mi_fgsm, dict(eps=0.2, step_size=0.05, num_steps=5),
               zero_kwargs=dict(num_steps=0), norm="linf"),
    AttackCase("illc_targeted_bim", attacks.bim, dict(eps=0.3, step_size=0.05, num_steps=10),
               targeted=True, zero_kwargs=dict(eps=0.0), norm="linf"),
    AttackCase("tmi_fgsm", attacks.mi_fgsm, dict(eps=0.3, step_size=0.05, num_steps=10),
               targeted=True, zero_kwargs=dict(eps=0.0), norm="linf"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:6], y[:6])


@pytest.mark.parametrize("case,threshold", [
    (CASES[0], 0.5), (CASES[4], 0.8), (CASES[5], 0.8), (CASES[7], 0.8),
    (CASES[8], 0.7), (CASES[9], 0.7)], ids=lambda c: getattr(c, "name", str(c)))
def test_effective_on_trained_model(case, threshold):
  logits_fn, x, y = digits_model()
  labels = (y + 1) % 10 if case.targeted else y
  out = case(logits_fn, x, labels, jax.random.key(0))
  assert float(jnp.mean(out.info.success)) > threshold


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fgsm_closed_form_on_linear_model(norm):
  # For logits = W x + b, the CE gradient is W (softmax - onehot); FGSM steps along its
  # steepest-ascent direction for the norm.
  logits_fn, w, b = linear_model()
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=0.3, maxval=0.7)
  y = jnp.array([0, 1, 2, 3])
  eps = 0.05 if norm != "l1" else 0.2
  out = attacks.fgsm(logits_fn, x, y, eps=eps, norm=norm)
  flat = x.reshape(4, -1)
  p = jax.nn.softmax(flat @ w + b)
  grad = (p - jax.nn.one_hot(y, 10)) @ w.T
  if norm == "linf":
    step = jnp.sign(grad)
  elif norm == "l2":
    step = grad / jnp.linalg.norm(grad, axis=1, keepdims=True)
  else:
    step = jax.nn.one_hot(jnp.argmax(jnp.abs(grad), 1), grad.shape[1]) * jnp.sign(grad)
  expect = jnp.clip(flat + eps * step, 0, 1).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(out.x_adv), np.asarray(expect), atol=1e-5)


def test_pgd_matches_closed_form_on_linear_model():
  # Without random start, linear-model BIM moves every coordinate by step*sign(const grad
  # direction) until the eps-ball edge: the result is x + eps*sign(g) if the sign is stable.
  logits_fn, w, b = linear_model(num_classes=2)
  x = jnp.full((1, 8, 8, 1), 0.5)
  y = jnp.array([0])
  out = attacks.bim(logits_fn, x, y, eps=0.1, step_size=0.03, num_steps=10)
  g = (w[:, 0] - w[:, 1])  # d(z0 - z1)/dx; CE on class 0 increases along -g
  expect = jnp.clip(0.5 - 0.1 * jnp.sign(g), 0, 1).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(out.x_adv), np.asarray(expect), atol=1e-6)


def test_least_likely_target_is_argmin():
  logits_fn, x, _ = digits_model()
  np.testing.assert_array_equal(np.asarray(attacks.least_likely_target(logits_fn, x[:8])),
                                np.asarray(jnp.argmin(logits_fn(x[:8]), -1)))


def test_fused_and_host_loops_agree():
  logits_fn, x, y = digits_model()
  kw = dict(eps=0.2, step_size=0.05, num_steps=5)
  a = attacks.pgd(logits_fn, x[:4], y[:4], jax.random.key(0), loop_mode="host", **kw)
  b = attacks.pgd(logits_fn, x[:4], y[:4], jax.random.key(0), loop_mode="fused", **kw)
  np.testing.assert_allclose(np.asarray(a.x_adv), np.asarray(b.x_adv), atol=1e-6)


def test_early_stop_freezes_successful_examples():
  logits_fn, x, y = digits_model()
  out = attacks.pgd(logits_fn, x[:8], y[:8], jax.random.key(0), eps=0.3, step_size=0.05,
                    num_steps=20, early_stop=True)
  assert bool(jnp.all(out.info.iterations[out.info.success] < 20))


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=0.1, norm="l3"), "Unknown norm"),
    (dict(eps=0.1, loss="hinge"), "Unknown loss"),
    (dict(eps=jnp.ones(3)), "shape"),
])
def test_invalid_hyperparameters(kwargs, match):
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match=match):
    attacks.fgsm(logits_fn, x[:4], y[:4], **kwargs)


@pytest.mark.parametrize("bad,match,exc", [
    (lambda x: x * 2.0, "outside the allowed range", ValueError),
    (lambda x: x.at[0, 0, 0, 0].set(jnp.nan), "NaN", ValueError),
    (lambda x: x[0], "4 dimensions", ValueError),
    (lambda x: (x * 255).astype(jnp.uint8), "floating-point", TypeError),
])
def test_invalid_inputs(bad, match, exc):
  logits_fn, x, y = digits_model()
  with pytest.raises(exc, match=match):
    attacks.fgsm(logits_fn, bad(x[:4]), y[:4], eps=0.1)


def test_raw_uint32_key_is_rejected():
  logits_fn, x, y = digits_model()
  with pytest.raises(TypeError, match="typed PRNG key"):
    attacks.pgd(logits_fn, x[:2], y[:2], jax.random.PRNGKey(0), eps=0.1, step_size=0.1,
                num_steps=1)


class _CountState(NamedTuple):
  x: jax.Array
  active: jax.Array
  iteration: jax.Array


def _count_up(logits_fn, cfg, s):
  del logits_fn, cfg
  return s._replace(x=s.x + 1.0, active=s.x + 1.0 < 3.0)


@pytest.mark.parametrize("log_every_s,expected_lines", [(0.0, 2), (None, 0)])
def test_host_loop_logs_progress(caplog, log_every_s, expected_lines):
  state = _CountState(jnp.zeros(4), jnp.ones(4, bool), jnp.zeros(4, jnp.int32))
  with caplog.at_level(logging.INFO, logger="absl"):
    out = loop.run(_count_up, None, None, state, 10, loop="host", log_every_s=log_every_s)
  lines = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
  # Steps 1 and 2 leave examples running and log; step 3 finishes them all and exits.
  assert len(lines) == expected_lines
  if expected_lines:
    assert lines[0] == "test_attacks_gradient._count_up: step 1/10, 4 examples still running."
  np.testing.assert_array_equal(np.asarray(out.iteration), 3)


class _TargetState(NamedTuple):
  x: jax.Array
  x0: jax.Array
  active: jax.Array
  iteration: jax.Array


def _count_to_x0(logits_fn, cfg, s):
  del logits_fn, cfg
  return s._replace(x=s.x + 1.0, active=s.x + 1.0 < s.x0)


@pytest.mark.parametrize("rows_per_example,expected_sizes", [
    (1, {5}),          # buckets hold at least 8 inputs: a batch of 5 is never gathered
    (20, {5, 2, 1}),   # 20 inputs per example (OptMargin's copies): gathered down to one
])
def test_host_loop_gathers_active_examples(monkeypatch, rows_per_example, expected_sizes):
  sizes = set()
  jit_step = loop._jit_step

  def recording_step(step_fn, logits_fn, cfg, state):
    sizes.add(state.x.shape[0])
    return jit_step(step_fn, logits_fn, cfg, state)

  monkeypatch.setattr(loop, "_jit_step", recording_step)
  stop_at = jnp.array([1.0, 9.0, 2.0, 5.0, 3.0])  # example i finishes after stop_at[i] steps
  state = _TargetState(jnp.zeros(5), stop_at, jnp.ones(5, bool), jnp.zeros(5, jnp.int32))
  out = loop.run(_count_to_x0, None, None, state, 20, loop="host", log_every_s=None,
                 rows_per_example=rows_per_example)
  assert sizes == expected_sizes
  # Gathering changes only which rows are computed, not the results.
  np.testing.assert_array_equal(np.asarray(out.x), np.asarray(stop_at))
  np.testing.assert_array_equal(np.asarray(out.iteration), np.asarray(stop_at).astype(np.int32))
  assert not np.asarray(out.active).any()
