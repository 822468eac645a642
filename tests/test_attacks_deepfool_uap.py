"""Tests for DeepFool (L2, Linf) and universal adversarial perturbations (UAP)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_testing import AttackCase
from attack_testing import digits_model
from attack_testing import linear_model as _linear_model
from attack_testing import run_standard_properties

from advtrace import data as adv_data
from advtrace._src.attacks import deepfool as deepfool_lib
from advtrace._src.attacks import uap as uap_lib
from advtrace._src.attacks.deepfool import deepfool
from advtrace._src.attacks.uap import apply_uap
from advtrace._src.attacks.uap import uap
from advtrace._src.attacks.uap import uap_attack

pytestmark = pytest.mark.usefixtures("fast_compiles")


# ---------------------------------------------------------------------------------- DeepFool

linear_model = functools.lru_cache(maxsize=None)(_linear_model)  # one model: fewer compiles

DEEPFOOL_CASES = [
    AttackCase("deepfool_l2", deepfool, dict(max_iter=5), zero_kwargs=dict(max_iter=0),
               per_example="overshoot", per_example_values=(0.02, 0.5)),
    AttackCase("deepfool_linf_top3", deepfool, dict(max_iter=5, norm="linf", num_candidates=3),
               zero_kwargs=dict(max_iter=0), per_example="overshoot",
               per_example_values=(0.02, 0.5)),
]


@pytest.mark.parametrize("case", DEEPFOOL_CASES, ids=lambda c: c.name)
def test_deepfool_standard_properties(case):
  logits_fn, x, y = digits_model()
  run_standard_properties(case, logits_fn, x[:6], y[:6])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_effective_on_trained_model(norm):
  logits_fn, x, y = digits_model()
  out = deepfool(logits_fn, x[:32], y[:32], norm=norm)
  assert float(jnp.mean(out.info.success)) > 0.9
  # Minimal-perturbation attack: it stops at the first adversarial iterate.
  assert bool(jnp.all(out.info.iterations[out.info.success] <= 50))


def _linear_expected(w, b, x, y, norm, overshoot):
  """The closed-form one-step DeepFool perturbation of an affine classifier."""
  flat = x.reshape(x.shape[0], -1)
  z = flat @ w + b
  f = z - z[jnp.arange(len(y)), y][:, None]  # [B, C]
  wk = w[None, :, :] - w[:, y].T[:, :, None]  # [B, d, C]
  wn = (jnp.linalg.norm(wk, axis=1) if norm == "l2" else jnp.sum(jnp.abs(wk), axis=1))
  dist = jnp.where(jax.nn.one_hot(y, w.shape[1], dtype=bool), jnp.inf, jnp.abs(f) / wn)
  nearest = jnp.argmin(dist, axis=1)
  w_n = wk[jnp.arange(len(y)), :, nearest]
  wn_n = wn[jnp.arange(len(y)), nearest]
  # The paper's r = |f_l| / ||w_l||^2 w_l, plus the reference's 1e-4 past the boundary.
  if norm == "l2":
    r_paper = (jnp.abs(f[jnp.arange(len(y)), nearest]) / wn_n**2)[:, None] * w_n
    r = r_paper + 1e-4 * w_n / wn_n[:, None]
  else:
    r_paper = (jnp.abs(f[jnp.arange(len(y)), nearest]) / wn_n)[:, None] * jnp.sign(w_n)
    r = r_paper + 1e-4 * jnp.sign(w_n)
  return nearest, r_paper, (flat + (1 + overshoot) * r).reshape(x.shape)


@pytest.mark.parametrize("num_classes", [2, 10])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_closed_form_on_linear_model(num_classes, norm):
  logits_fn, w, b = linear_model(num_classes=num_classes)
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1), minval=0.35, maxval=0.65)
  y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
  overshoot = 0.02
  nearest, r_paper, expect = _linear_expected(w, b, x, y, norm, overshoot)
  assert float(expect.min()) > 0 and float(expect.max()) < 1  # no clipping: closed form holds
  # The paper's step lands exactly on the boundary between y and the nearest class.
  z_b = (x.reshape(6, -1) + r_paper) @ w + b
  rows = jnp.arange(6)
  np.testing.assert_allclose(np.asarray(z_b[rows, nearest]), np.asarray(z_b[rows, y]), atol=1e-4)
  out = deepfool(logits_fn, x, y, norm=norm, overshoot=overshoot)
  np.testing.assert_allclose(np.asarray(out.x_adv), np.asarray(expect), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.info.iterations), 1)
  assert bool(jnp.all(out.info.success))
  np.testing.assert_array_equal(np.asarray(out.info.predicted), np.asarray(nearest))


def test_deepfool_minimal_on_linear_model():
  # For an affine binary classifier the L2 distance to the boundary is |f| / ||w||: DeepFool
  # (overshoot 0) returns a point that is adversarial at exactly that distance (+1e-4).
  logits_fn, w, b = linear_model(num_classes=2)
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=0.4, maxval=0.6)
  y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
  out = deepfool(logits_fn, x, y, overshoot=0.0)
  gap = jnp.abs((x.reshape(4, -1) @ w + b) @ jnp.array([1.0, -1.0]))
  dist = gap / jnp.linalg.norm(w[:, 0] - w[:, 1])
  np.testing.assert_allclose(np.asarray(out.info.l2), np.asarray(dist + 1e-4), rtol=1e-4)
  assert bool(jnp.all(out.info.success))


def test_deepfool_failure_returns_input():
  logits_fn, x, y = digits_model()
  out = deepfool(logits_fn, x[:16], y[:16], max_iter=1)
  failed = ~np.asarray(out.info.success)
  assert failed.any(), "expected some failures after one iteration"
  np.testing.assert_array_equal(np.asarray(out.x_adv)[failed], np.asarray(x[:16])[failed])


def test_deepfool_deepsec_extra_step_takes_one_more_step():
  logits_fn, x, y = digits_model()
  a = deepfool(logits_fn, x[:8], y[:8])
  b = deepfool(logits_fn, x[:8], y[:8], deepsec_extra_step=True)
  both = np.asarray(a.info.success & b.info.success & (a.info.iterations < 50))
  np.testing.assert_array_equal(np.asarray(b.info.iterations)[both],
                                np.asarray(a.info.iterations)[both] + 1)
  assert np.all(np.asarray(b.info.l2)[both] >= np.asarray(a.info.l2)[both] - 1e-6)


def test_deepfool_already_misclassified_is_unchanged():
  logits_fn, x, y = digits_model()
  wrong = (y[:4] + 1) % 10  # labels the model does not predict: already "adversarial"
  out = deepfool(logits_fn, x[:4], wrong)
  np.testing.assert_array_equal(np.asarray(out.x_adv), np.asarray(x[:4]))
  np.testing.assert_array_equal(np.asarray(out.info.iterations), 0)
  assert bool(jnp.all(out.info.success))


def test_deepfool_fused_and_host_loops_agree():
  logits_fn, x, y = digits_model()
  a = deepfool(logits_fn, x[:4], y[:4], max_iter=10, loop_mode="host")
  b = deepfool(logits_fn, x[:4], y[:4], max_iter=10, loop_mode="fused")
  np.testing.assert_allclose(np.asarray(a.x_adv), np.asarray(b.x_adv), atol=1e-6)


def test_candidate_classes_order():
  logits = jnp.array([0.5, 3.0, -1.0, 2.0])
  np.testing.assert_array_equal(
      np.asarray(deepfool_lib.candidate_classes(logits, jnp.int32(1), None)), [3, 0, 2])
  np.testing.assert_array_equal(
      np.asarray(deepfool_lib.candidate_classes(logits, jnp.int32(1), 3)), [3, 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="l1"), "Unknown norm"),
    (dict(max_iter=-1), "max_iter"),
    (dict(overshoot=-0.1), "overshoot must be >= 0"),
    (dict(num_candidates=1), "num_candidates"),
    (dict(targeted=True), "untargeted"),
])
def test_deepfool_invalid_arguments(kwargs, match):
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match=match):
    deepfool(logits_fn, x[:2], y[:2], **kwargs)


# ---------------------------------------------------------------------------------- UAP


def _uap_fixed(logits_fn, x, labels, key, *, eps, **kw):
  """uap_attack with a fixed sign pattern of Linf norm eps (per-example eps allowed)."""
  shape = x.shape[1:]
  pattern = jnp.sign(jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32) + 0.5)).reshape(shape)
  eps = jnp.asarray(eps, jnp.float32)
  v = eps * pattern if eps.ndim == 0 else eps.reshape(-1, 1, 1, 1) * pattern
  return uap_attack(logits_fn, x, labels, key, perturbation=v, **kw)


def test_uap_attack_standard_properties():
  logits_fn, x, y = digits_model()
  case = AttackCase("uap_apply", _uap_fixed, dict(eps=0.2), zero_kwargs=dict(eps=0.0),
                    norm="linf")
  run_standard_properties(case, logits_fn, x[:6], y[:6])


@pytest.fixture(scope="module")
def digits_train():
  train = adv_data.load("digits", "train")
  return jnp.asarray(train.images[:200]), jnp.asarray(train.labels[:200])


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 3.0)])
def test_uap_effective_and_bounded(digits_train, norm, eps):
  logits_fn, x, y = digits_model()
  xt, _ = digits_train
  v, info = uap(logits_fn, xt, jax.random.key(0), eps=eps, norm=norm, fool_rate=0.6,
                max_outer_iters=4)
  assert v.shape == xt.shape[1:]
  n = float(jnp.max(jnp.abs(v))) if norm == "linf" else float(jnp.linalg.norm(v.reshape(-1)))
  assert n <= eps * (1 + 1e-5)
  assert info.passes >= 1 and len(info.fooling_rates) == info.passes
  assert info.fooling_rate == pytest.approx(uap_lib.fooling_rate(logits_fn, xt, v))
  # The universal perturbation transfers to held-out (test) images.
  out = apply_uap(logits_fn, x, y, v)
  assert float(jnp.mean(out.info.success)) > 0.5
  np.testing.assert_allclose(np.asarray(out.x_adv), np.asarray(jnp.clip(x + v, 0, 1)))


def test_uap_stops_at_fool_rate_and_zero_iters(digits_train):
  logits_fn, _, _ = digits_model()
  xt, _ = digits_train
  v, info = uap(logits_fn, xt[:50], jax.random.key(0), eps=0.3, fool_rate=0.05,
                max_outer_iters=5)
  assert info.passes == 1 and info.converged and info.fooling_rate >= 0.05
  v0, info0 = uap(logits_fn, xt[:50], jax.random.key(0), eps=0.3, max_outer_iters=0)
  np.testing.assert_array_equal(np.asarray(v0), 0.0)
  assert info0.passes == 0 and info0.fooling_rate == 0.0


def test_uap_deterministic_per_key(digits_train):
  logits_fn, _, _ = digits_model()
  xt, _ = digits_train
  kw = dict(eps=0.3, fool_rate=1.0, max_outer_iters=1)
  a, _ = uap(logits_fn, xt[:60], jax.random.key(1), **kw)
  b, _ = uap(logits_fn, xt[:60], jax.random.key(1), **kw)
  c, _ = uap(logits_fn, xt[:60], jax.random.key(2), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))  # another image order


def test_uap_resumes_where_it_stopped(digits_train):
  # Resuming from the checkpoint after pass 1 gives what the uninterrupted 3-pass call gives.
  logits_fn, _, _ = digits_model()
  xt, _ = digits_train
  kw = dict(eps=0.1, fool_rate=1.0, max_outer_iters=3)
  checkpoints = []
  v, info = uap(logits_fn, xt[:40], jax.random.key(4), on_pass=checkpoints.append, **kw)
  assert [len(c.fooling_rates) for c in checkpoints] == [1, 2, 3]
  np.testing.assert_array_equal(checkpoints[-1].v, np.asarray(v))
  later = []
  v2, info2 = uap(logits_fn, xt[:40], jax.random.key(4), resume_from=checkpoints[0],
                  on_pass=later.append, **kw)
  np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))
  np.testing.assert_array_equal(info2.fooling_rates, info.fooling_rates)
  np.testing.assert_array_equal(info2.updates, info.updates)
  assert info2.passes == 3 and len(later) == 2
  done, done_info = uap(logits_fn, xt[:40], jax.random.key(4), resume_from=checkpoints[-1], **kw)
  np.testing.assert_array_equal(np.asarray(done), np.asarray(v))  # nothing left to run
  assert done_info.passes == 3


def test_uap_rejects_a_foreign_checkpoint(digits_train):
  logits_fn, _, _ = digits_model()
  xt, _ = digits_train
  good = uap_lib.UAPCheckpoint(np.zeros(xt.shape[1:], np.float32), np.zeros(1), np.zeros(1, int),
                               np.zeros(1))
  with pytest.raises(ValueError, match="resume_from.v has shape"):
    uap(logits_fn, xt[:4], jax.random.key(0), eps=0.1,
        resume_from=good._replace(v=np.zeros((3, 3, 1), np.float32)))
  with pytest.raises(ValueError, match="more than max_outer_iters"):
    uap(logits_fn, xt[:4], jax.random.key(0), eps=0.1, max_outer_iters=0, resume_from=good)
  with pytest.raises(ValueError, match="different lengths"):
    uap(logits_fn, xt[:4], jax.random.key(0), eps=0.1, resume_from=good._replace(seconds=[]))
  with pytest.raises(ValueError, match="NaN"):
    uap(logits_fn, xt[:4], jax.random.key(0), eps=0.1,
        resume_from=good._replace(v=np.full(xt.shape[1:], np.nan, np.float32)))


@pytest.mark.parametrize("loop_mode", ["host", "fused"])
def test_uap_pass_equals_sequential_reference(digits_train, loop_mode):
  # A pass (host loop, or one jitted scan) must equal the paper's Python loop over the
  # (shuffled) images, with DeepFool run on each not-yet-fooled image one at a time.
  logits_fn, _, _ = digits_model()
  xt, _ = digits_train
  xs, key, eps, max_iter, overshoot = xt[:25], jax.random.key(3), 0.2, 10, 0.02
  v, _ = uap(logits_fn, xs, key, eps=eps, fool_rate=1.0, max_outer_iters=1,
             deepfool_max_iter=max_iter, deepfool_overshoot=overshoot, loop_mode=loop_mode)
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), xs.shape[0]))
  preds = jnp.argmax(logits_fn(xs), -1)
  ref = jnp.zeros(xs.shape[1:])
  for i in order:
    xp = jnp.clip(xs[i] + ref, 0, 1)
    if int(jnp.argmax(logits_fn(xp[None])[0])) != int(preds[i]):
      continue
    s = deepfool_lib.run_deepfool(
        logits_fn, xp[None], preds[i:i + 1].astype(jnp.int32), norm="l2",
        overshoot=jnp.full((1,), overshoot), max_iter=max_iter, num_candidates=None,
        deepsec_extra_step=False, clip_min=0.0, clip_max=1.0)
    if int(s.updates[0]) < max_iter - 1:
      ref = jnp.clip(ref + (1 + overshoot) * s.r_tot[0], -eps, eps)
  np.testing.assert_allclose(np.asarray(v), np.asarray(ref), atol=1e-5)


def test_uap_fooling_rate_with_labels(digits_train):
  logits_fn, _, _ = digits_model()
  xt, yt = digits_train
  v = 0.3 * jnp.ones(xt.shape[1:])
  plain = uap_lib.fooling_rate(logits_fn, xt, v)
  with_labels = uap_lib.fooling_rate(logits_fn, xt, v, labels=yt)
  pred = np.asarray(jnp.argmax(logits_fn(xt), -1))
  pert = np.asarray(jnp.argmax(logits_fn(jnp.clip(xt + v, 0, 1)), -1))
  assert plain == pytest.approx(np.mean(pert != pred))
  assert with_labels == pytest.approx(np.mean((pert != pred) & (pert != np.asarray(yt))))


@pytest.mark.parametrize("kwargs,match,exc", [
    (dict(eps=0.1, norm="l1"), "Unknown norm", ValueError),
    (dict(eps=-0.1), "eps must be >= 0", ValueError),
    (dict(eps=0.1, fool_rate=1.5), "fool_rate", ValueError),
    (dict(eps=0.1, labels_val=jnp.zeros(3, jnp.int32)), "without x_val", ValueError),
])
def test_uap_invalid_arguments(kwargs, match, exc):
  logits_fn, x, _ = digits_model()
  with pytest.raises(exc, match=match):
    uap(logits_fn, x[:4], jax.random.key(0), **kwargs)


def test_apply_uap_invalid():
  logits_fn, x, y = digits_model()
  with pytest.raises(ValueError, match="v must have shape"):
    apply_uap(logits_fn, x[:4], y[:4], jnp.zeros((4, 4, 1)))
  with pytest.raises(ValueError, match="untargeted"):
    uap_attack(logits_fn, x[:4], y[:4], perturbation=jnp.zeros(x.shape[1:]), targeted=True)
