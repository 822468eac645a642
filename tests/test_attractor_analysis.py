"""Tests for the Fig. 5 / Fig. 7 measurements of injected attractors."""

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import attractor_analysis as analysis
from advtrace._src import qim

SHAPE = (6, 6, 1)
CFG = qim.QIMConfig()


def _secret(seed=0):
  return qim.new_secret_key(jax.random.key(seed), 10, SHAPE, CFG)


def _linear_classifier(x):
  w = jnp.linspace(-1.0, 1.0, 10 * np.prod(SHAPE)).reshape(np.prod(SHAPE), 10)
  return x.reshape(x.shape[0], -1) @ w


def test_gradient_paths_shapes_and_limits():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(1), (5,) + SHAPE)
  y = jnp.arange(5)
  out = analysis.gradient_paths(_linear_classifier, secret.messages, CFG, x, y)
  for v in out.values():
    assert v.shape == (5,) and np.all(np.isfinite(np.asarray(v)))
  np.testing.assert_allclose(np.asarray(out["c_l1"]), 1.0, rtol=1e-5)
  assert np.all(np.asarray(out["w_l1"]) <= 10 * CFG.a2 + 1e-6)
  # Without attractors nothing flows through W; the C path is then the whole gradient.
  off = CFG._replace(a2=0.0)
  out0 = analysis.gradient_paths(_linear_classifier, secret.messages, off, x, y)
  np.testing.assert_allclose(np.asarray(out0["grad_j_via_w"]), 0.0, atol=1e-7)
  assert np.all(np.asarray(out0["grad_j_via_c"]) > 0)


def test_nearest_attractors_decode_to_their_message():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(2), (4,) + SHAPE)
  x_w, t = analysis.nearest_attractors(x, secret.messages, CFG)
  assert x_w.shape == x.shape and t.shape == (4,)
  w = qim.decode(x_w, secret.messages, CFG)
  np.testing.assert_array_equal(np.argmax(np.asarray(w), -1), np.asarray(t))
  # t is the L2-nearest of the ten per-message attractors.
  for i in range(4):
    d = [float(jnp.sum((qim.nearest_attractor(x[i], secret.messages[k], CFG) - x[i]) ** 2))
         for k in range(10)]
    assert int(t[i]) == int(np.argmin(d))


def test_soft_label_cosine_is_one_when_the_loss_points_at_the_attractor():
  x = jax.random.uniform(jax.random.key(3), (3,) + SHAPE)
  direction = jax.random.normal(jax.random.key(4), SHAPE)
  x_w = x + 0.1 * direction

  def logits_fn(z):  # logit 1 grows along the direction to the attractor
    score = jnp.sum(z * direction, axis=(1, 2, 3))
    return jnp.stack([jnp.zeros_like(score), score], -1)

  cos = analysis.soft_label_cosine(logits_fn, x, x_w, jnp.array([1, 1, 1]))
  np.testing.assert_allclose(np.asarray(cos), 1.0, atol=1e-5)
  anti = analysis.soft_label_cosine(logits_fn, x, x_w, jnp.array([0, 0, 0]))
  np.testing.assert_allclose(np.asarray(anti), -1.0, atol=1e-5)


def test_local_density_on_a_half_space():
  normal = jnp.zeros(SHAPE).at[0, 0, 0].set(1.0)

  def logits_fn(z):  # class 1 where <normal, z - 0.5> > 0
    s = jnp.sum((z - 0.5) * normal, axis=(1, 2, 3))
    return jnp.stack([-s, s], -1)

  x = jnp.full((2,) + SHAPE, 0.5)  # on the boundary: half of the sphere is class 1
  keys = jax.random.split(jax.random.key(5), 2)
  out = analysis.density_cosine(logits_fn, x, x + normal, jnp.array([1, 1]), jnp.array([0, 0]),
                                keys, 0.5, 4000)
  np.testing.assert_allclose(np.asarray(out["h_t"]), 0.5, atol=0.05)
  np.testing.assert_allclose(np.asarray(out["h_t"] + out["h_y"]), 1.0, atol=1e-6)
  assert np.all(np.asarray(out["cosine"]) > 0.8)
  # No sampled point in class t: no direction, cosine 0.
  far = analysis.density_cosine(logits_fn, x - 10 * normal, x, jnp.array([1, 1]),
                                jnp.array([0, 0]), keys, 0.5, 100)
  np.testing.assert_array_equal(np.asarray(far["cosine"]), 0.0)


def test_local_attractors_sit_on_the_finest_lattice_of_their_message():
  secret = _secret()
  x = jax.random.uniform(jax.random.key(6), (4,) + SHAPE).at[0].set(0.0).at[1].set(1.0)
  t = jnp.array([0, 3, 5, 9])
  x_l = analysis.local_attractors(x, secret.messages, CFG, t)
  assert x_l.shape == x.shape
  assert np.all(np.asarray(x_l) >= 0) and np.all(np.asarray(x_l) <= 1)
  fine = CFG.steps.index(min(CFG.steps))
  delta = CFG.steps[fine]
  for i in range(4):
    q = qim.qim_distance(255 * x_l[i], secret.messages[t[i], fine], delta)
    np.testing.assert_allclose(np.asarray(q), 0.0, atol=1e-3)
  # At most 1.5 steps away (half a step, or a full lattice period inward at the box edges).
  assert float(jnp.max(jnp.abs(255 * (x_l - x)))) <= 1.5 * delta + 1e-3
