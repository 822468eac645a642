"""Tests for the QIM decoder, the attractor model, and the forensic detector/recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from advtrace._src import attractors as at
from advtrace._src import qim

SHAPE = (8, 8, 1)
COLOUR_SHAPE = (6, 6, 3)  # the CIFAR-10 path: a key and a decoder over every channel
CFG = qim.QIMConfig()


def _secret(seed=0, n=10, shape=SHAPE):
  return qim.new_secret_key(jax.random.key(seed), n, shape, CFG)


@settings(max_examples=200, deadline=None)
@given(p=st.floats(-10.0, 300.0, allow_nan=False), bit=st.integers(0, 1),
       delta=st.sampled_from([3.0, 64.0, 128.0]))
def test_qim_distance_in_range_and_zero_at_codewords(p, bit, delta):
  q = float(qim.qim_distance(jnp.float32(p), jnp.float32(bit), delta))
  assert -1e-4 <= q <= delta + 1e-4
  # brute force over the lattice of this bit
  codewords = (0.5 + bit) * delta + 2 * delta * np.arange(-10, int(320 / (2 * delta)) + 10)
  assert q == pytest.approx(np.min(np.abs(p - codewords)), abs=1e-3)


@settings(max_examples=200, deadline=None)
@given(p=st.floats(0.0, 255.0, allow_nan=False), bit=st.integers(0, 1),
       delta=st.sampled_from([3.0, 64.0, 128.0]))
def test_in_range_distance_uses_only_codewords_in_the_pixel_range(p, bit, delta):
  q = float(qim.qim_distance(jnp.float32(p), jnp.float32(bit), delta, in_range=True))
  codewords = (0.5 + bit) * delta + 2 * delta * np.arange(0, 200)
  codewords = codewords[codewords <= 255.0]
  assert q == pytest.approx(np.min(np.abs(p - codewords)), abs=1e-3)
  assert 0.0 <= q <= qim.max_distance(delta, in_range=True) + 1e-4


@pytest.mark.parametrize("in_range", [False, True])
def test_decode_under_jit_equals_eager(in_range):
  cfg = CFG._replace(in_range=in_range)
  secret = qim.new_secret_key(jax.random.key(0), 10, SHAPE, cfg)
  x = jax.random.uniform(jax.random.key(1), (3,) + SHAPE)
  eager = qim.decode(x, secret.messages, cfg)
  jitted = jax.jit(qim.decode, static_argnums=2)(x, secret.messages, cfg)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_codeword_lattice_matches_paper():
  # Codewords of bit 0 at 0.5d, 2.5d, ...; of bit 1 at 1.5d, 3.5d, ... (§V-E, Fig. 4, d=64).
  d = 64.0
  for c in (32.0, 160.0):
    assert float(qim.qim_distance(jnp.float32(c), 0.0, d)) == 0.0
    assert float(qim.qim_distance(jnp.float32(c), 1.0, d)) == d
  for c in (96.0, 224.0):
    assert float(qim.qim_distance(jnp.float32(c), 1.0, d)) == 0.0


@pytest.mark.parametrize("shape", [SHAPE, COLOUR_SHAPE])
def test_watermarked_image_decodes_to_its_message(shape):
  secret = _secret(shape=shape)
  x = jax.random.uniform(jax.random.key(1), (10,) + shape)
  marked = jnp.stack([qim.nearest_attractor(x[k], secret.messages[k], CFG) for k in range(10)])
  w = qim.decode(marked, secret.messages, CFG)
  np.testing.assert_array_equal(np.argmax(w, -1), np.arange(10))
  # At an exact attractor the correlation saturates at A2.
  np.testing.assert_allclose(np.asarray(w[np.arange(10), np.arange(10)]), CFG.a2, rtol=1e-4)
  assert np.all(np.asarray(marked) >= 0) and np.all(np.asarray(marked) <= 1)


def test_decoder_output_range_and_finite_gradients():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(2), (4,) + SHAPE)
  x = x.at[0].set(0.0).at[1].set(1.0)  # saturated images, as in MNIST
  w = qim.decode(x, secret.messages, CFG)
  assert w.shape == (4, 10) and w.dtype == jnp.float32
  assert np.all(np.asarray(w) >= 0) and np.all(np.asarray(w) <= CFG.a2 + 1e-6)
  g = jax.grad(lambda z: qim.decode(z, secret.messages, CFG).sum())(x)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.any(np.asarray(g) != 0)


def test_moving_toward_message_raises_its_correlation():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(3), (1,) + SHAPE)
  target = qim.nearest_attractor(x[0], secret.messages[4], CFG)[None]
  w0 = qim.decode(x, secret.messages, CFG)[0, 4]
  w_half = qim.decode(0.5 * (x + target), secret.messages, CFG)[0, 4]
  w1 = qim.decode(target, secret.messages, CFG)[0, 4]
  assert w0 < w_half < w1


def test_secret_key_roundtrip_and_repr_hides_bits(tmp_path):
  secret = _secret()
  path = tmp_path / "secrets" / "qim_key.npz"
  qim.save_secret_key(path, secret)
  assert (path.stat().st_mode & 0o777) == 0o600
  loaded = qim.load_secret_key(path)
  np.testing.assert_array_equal(np.asarray(loaded.messages), np.asarray(secret.messages))
  text = repr(secret)
  assert "fingerprint" in text and "1." not in text and "0." not in text
  with pytest.raises(FileNotFoundError, match="No QIM secret key"):
    qim.load_secret_key(tmp_path / "missing.npz")


def test_keys_are_derived_from_the_prng_key():
  a, b, c = _secret(0), _secret(0), _secret(1)
  np.testing.assert_array_equal(np.asarray(a.messages), np.asarray(b.messages))
  assert not np.array_equal(np.asarray(a.messages), np.asarray(c.messages))


def _toy_classifier(x):
  # Deterministic logits depending on the image mean, so that accuracy is well defined.
  m = x.reshape(x.shape[0], -1).mean(-1)
  return jnp.stack([-(m - k / 10.0) ** 2 * 100 for k in range(10)], -1)


@pytest.mark.parametrize("shape", [SHAPE, COLOUR_SHAPE])
def test_combined_model_contract(shape):
  secret = _secret(shape=shape)
  f = at.attractor_logits_fn(_toy_classifier, secret, CFG)
  x = jax.random.uniform(jax.random.key(4), (5,) + shape)
  logits = f(x)
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-5)
  # softmax(log M) = M = (C + W) / |C + W|_1
  c = jax.nn.softmax(_toy_classifier(x))
  w = qim.decode(x, secret.messages, CFG)
  expect = (c + w) / (c + w).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(expect),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(at.combine(c, w)), np.asarray(logits), rtol=1e-6)
  g = jax.grad(lambda z: f(z)[:, 0].sum())(x)
  assert np.all(np.isfinite(np.asarray(g)))
  other = COLOUR_SHAPE if shape == SHAPE else SHAPE
  with pytest.raises(ValueError, match="key covers images of shape"):
    f(jnp.zeros((2,) + other))


def test_calibration_realises_target_fpr_on_fresh_clean_data():
  secret = _secret()
  dec = at.decoder_fn(secret, CFG)
  x = jax.random.uniform(jax.random.key(5), (6000,) + SHAPE)
  w = np.asarray(jax.jit(dec)(x))
  for target in (0.05, 0.005):
    cal = at.calibrate(w[:4000], target)
    assert cal.calibration_fpr <= target + 1e-9
    assert cal.calibration_fpr >= target * 0.7
    flagged, conditions = at.detect(jnp.asarray(w[4000:]), cal)
    realised = float(np.mean(np.asarray(flagged)))
    # binomial SD on 2000 samples: ~0.5% at 5%, ~0.16% at 0.5%
    assert abs(realised - target) < 4 * np.sqrt(target * (1 - target) / 2000) + 1e-3
    assert conditions.shape == (2000, 3)


def test_calibration_rejects_bad_input():
  with pytest.raises(ValueError, match="target_fpr"):
    at.calibrate(np.zeros((10, 10)), 0.0)
  with pytest.raises(ValueError, match="finite"):
    at.calibrate(np.full((10, 10), np.nan), 0.05)


def test_recovery_on_constructed_attack():
  # An untargeted attacker suppresses w of the true class: the recovered label is that class.
  w = jnp.full((3, 10), 0.076).at[0, 7].set(0.01).at[1, 2].set(0.02).at[2, 5].set(0.0)
  np.testing.assert_array_equal(np.asarray(at.recover(w)), [7, 2, 5])
  clean = 0.076 + 1e-4 * jax.random.normal(jax.random.key(0), (500, 10))
  cal = at.calibrate(clean, 0.05)
  flagged, _ = at.detect(w, cal)
  assert bool(jnp.all(flagged))
  assert bool(jnp.all(at.detection_score(w, cal) > jnp.max(at.detection_score(clean, cal))))


def test_integrated_model_serves_recovered_label_when_flagged():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(6), (200,) + SHAPE)
  dec = at.decoder_fn(secret, CFG)
  cal = at.calibrate(dec(x), 0.05)
  # A watermarked (attractor) image is flagged by C1.
  marked = qim.nearest_attractor(x[0], secret.messages[3], CFG)[None]
  batch = jnp.concatenate([marked, x[1:4]])
  f_int = at.integrated_logits_fn(_toy_classifier, secret, cal, CFG)
  f_m = at.attractor_logits_fn(_toy_classifier, secret, CFG)
  flagged, _ = at.detect(dec(batch), cal)
  assert bool(flagged[0])
  served = np.argmax(np.asarray(f_int(batch)), -1)
  plain = np.argmax(np.asarray(f_m(batch)), -1)
  expect = np.where(np.asarray(flagged), np.asarray(at.recover(dec(batch))), plain)
  np.testing.assert_array_equal(served, expect)
  g = jax.grad(lambda z: f_int(z)[:, 0].sum())(batch)
  assert np.all(np.isfinite(np.asarray(g)))


def test_weighted_sum_model_follows_classifier_on_clean_inputs():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(7), (20,) + SHAPE)
  f = at.weighted_sum_logits_fn(_toy_classifier, secret, CFG)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(f(x))),
                             np.asarray(jax.nn.softmax(_toy_classifier(x))), atol=1e-3)
