r"""The measurements behind the injected-attractors paper's Fig. 5 and Fig. 7.

- :func:`gradient_paths` (Fig. 5): the output magnitudes of :math:`C` and :math:`W` and the
  input gradient of the attack loss :math:`J = -\log M_y` split into the part that flows through
  :math:`C` and the part that flows through :math:`W`.
- :func:`nearest_attractors`, :func:`local_attractors`, :func:`soft_label_cosine`,
  :func:`density_cosine` (Fig. 7): the
  cosine similarity between an attack's ascent direction toward class :math:`t` and the
  direction to the nearest attractor :math:`x_w` of message :math:`t`, for the soft-label loss
  and for the local-density loss :math:`H_\delta` of label-only attacks.

All functions are pure and batched over examples; the secret messages come in as arrays.

References:
  Zhang, Chang, Lee, "Detection and Recovery of Adversarial Attacks with Injected Attractors",
  2020. https://arxiv.org/abs/2003.02732 (§IV-B, §VI-C, Figs. 5 and 7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from advtrace._src import qim
from advtrace._src import xla
from advtrace._src.attacks.base import LogitsFn


def _l1(v: jax.Array) -> jax.Array:
  return jnp.sum(jnp.abs(v))


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine of two arrays; 0 when either is zero (no direction)."""
  a, b = a.reshape(-1), b.reshape(-1)
  norm = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  return jnp.where(norm > 0, jnp.dot(a, b) / jnp.where(norm > 0, norm, 1.0), 0.0)


@functools.partial(xla.jit, static_argnums=(0, 2))
def gradient_paths(classifier: LogitsFn, messages: jax.Array, cfg: qim.QIMConfig,
                   x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  r"""Fig. 5's magnitudes per example, all L1 norms.

  Args:
    classifier: the victim :math:`C` as a batched logits function (hashable: static).
    messages: the secret bits.
    cfg: the decoder settings.
    x: images (B, H, W, C) in [0, 1].
    y: labels (B,).

  Returns:
    ``c_l1`` (:math:`\lVert \mathrm{softmax}\, C(x) \rVert_1`, 1 by construction),
    ``w_l1`` (:math:`\lVert W(x) \rVert_1`), ``grad_c_y`` and ``grad_w_y`` (the input gradients
    of :math:`C_y` and :math:`w_y`), and ``grad_j_via_c`` / ``grad_j_via_w`` (the input gradient
    of :math:`J = -\log M_y(x)` through :math:`C` only and through :math:`W` only; they sum to
    :math:`\nabla_x J`), each of shape (B,).
  """

  def c_prob(xi):
    return jax.nn.softmax(classifier(xi[None]), axis=-1)[0]

  def w_corr(xi):
    return qim.decode(xi[None], messages, cfg)[0]

  def loss(x_c, x_w, yi):
    s = c_prob(x_c) + w_corr(x_w)
    return -jnp.log(s[yi] / jnp.sum(s))

  def one(xi, yi):
    g_c, g_w = jax.grad(loss, argnums=(0, 1))(xi, xi, yi)
    return {
        "c_l1": _l1(c_prob(xi)), "w_l1": _l1(w_corr(xi)),
        "grad_c_y": _l1(jax.grad(lambda v: c_prob(v)[yi])(xi)),
        "grad_w_y": _l1(jax.grad(lambda v: w_corr(v)[yi])(xi)),
        "grad_j_via_c": _l1(g_c), "grad_j_via_w": _l1(g_w),
    }

  return jax.vmap(one)(x, y)


@functools.partial(xla.jit, static_argnums=(2,))
def nearest_attractors(x: jax.Array, messages: jax.Array,
                       cfg: qim.QIMConfig) -> tuple[jax.Array, jax.Array]:
  """The nearest attractor of every message (D11) and the L2-nearest of them, per example.

  Args:
    x: images (B, H, W, C) in [0, 1].
    messages: the secret bits, (num_messages, num_scales, H, W, C).
    cfg: the decoder settings.

  Returns:
    ``(x_w, t)``: the nearest attractor (B, H, W, C) and its message index (B,).
  """
  per_message = jax.vmap(qim.nearest_attractor, in_axes=(None, 0, None))
  attractors = jax.vmap(per_message, in_axes=(0, None, None))(x, messages, cfg)
  dist = jnp.sum(jnp.square(attractors - x[:, None]).reshape(x.shape[0], messages.shape[0], -1),
                 axis=-1)
  t = jnp.argmin(dist, axis=-1)
  return jnp.take_along_axis(attractors, t[:, None, None, None, None], axis=1)[:, 0], t


@functools.partial(xla.jit, static_argnums=(2,))
def local_attractors(x: jax.Array, messages: jax.Array, cfg: qim.QIMConfig,
                     t: jax.Array) -> jax.Array:
  """The attractor of message ``t`` nearest to ``x`` on the finest QIM lattice only.

  Every value moves to the nearest in-range codeword of its bit of ``messages[t]`` at the
  smallest step size (at most half a step away); the other scales are left as they are. This is
  where a gradient dominated by the finest lattice leads, unlike :func:`nearest_attractors`,
  which must satisfy every scale at once.

  Args:
    x: images (B, H, W, C) in [0, 1].
    messages: the secret bits, (num_messages, num_scales, H, W, C).
    cfg: the decoder settings.
    t: the message index per example, (B,).

  Returns:
    The local attractors, (B, H, W, C) in [0, 1].
  """
  s = min(range(len(cfg.steps)), key=lambda i: cfg.steps[i])
  delta = cfg.steps[s]
  bits = messages[t, s]
  p = 255.0 * x
  center = (0.5 + bits) * delta
  code = center + 2.0 * delta * jnp.round((p - center) / (2.0 * delta))
  code = jnp.where(code < 0.0, code + 2.0 * delta, jnp.where(code > 255.0, code - 2.0 * delta,
                                                              code))
  return code / 255.0


@functools.partial(xla.jit, static_argnums=(0,))
def soft_label_cosine(logits_fn: LogitsFn, x: jax.Array, x_w: jax.Array,
                      t: jax.Array) -> jax.Array:
  r"""cos(:math:`x_w - x`, :math:`-\nabla_x J(x, t)`) per example, J the cross-entropy on ``t``.

  A targeted soft-label attack on class ``t`` descends :math:`J`; a value near 1 means that it
  walks straight into the attractor (an :math:`\epsilon`-attractor basin with small
  :math:`\epsilon`).
  """

  def loss(xi, ti):
    return -jax.nn.log_softmax(logits_fn(xi[None]), axis=-1)[0, ti]

  grads = jax.vmap(jax.grad(loss))(x, t)
  return jax.vmap(_cosine)(-grads, x_w - x)


@functools.partial(xla.jit, static_argnums=(0, 6))
def local_density(logits_fn: LogitsFn, x: jax.Array, t: jax.Array, y: jax.Array,
                  keys: jax.Array, radius: jax.Array, num_directions: int):
  r"""Monte-Carlo local density :math:`H_\delta` and its gradient direction (D11), per example.

  With ``u`` uniform on the unit sphere, :math:`H_\delta(x, k) = P_u[\arg\max f(x + \delta u)
  = k]` and :math:`\nabla H_\delta(x, k) \propto E_u[1\{\arg\max f(x + \delta u) = k\}\, u]`
  (Gaussian-smoothing estimator; the factor :math:`d/\delta` does not change directions).

  Args:
    logits_fn: the model (hashable: static).
    x: images (B, H, W, C).
    t: the class whose density is ascended (the nearest attractor's label), (B,).
    y: the true labels, (B,), for :math:`H_\delta(x, y)`.
    keys: one PRNG key per example, (B,).
    radius: the sphere radius :math:`\delta` (L2 on the [0, 1] scale).
    num_directions: directions per example.

  Returns:
    ``(grad_t, h_t, h_y)``: the direction estimate (B, H, W, C), :math:`H_\delta(x, t)` and
    :math:`H_\delta(x, y)`, each (B,).
  """

  def one(xi, ti, yi, key):
    u = jax.random.normal(key, (num_directions,) + xi.shape)
    u = u / jnp.linalg.norm(u.reshape(num_directions, -1), axis=1).reshape(
        (num_directions,) + (1,) * xi.ndim)
    pred = jnp.argmax(logits_fn(xi[None] + radius * u), axis=-1)
    hit_t = (pred == ti).astype(u.dtype)
    grad = jnp.tensordot(hit_t, u, axes=1) / num_directions
    return grad, jnp.mean(hit_t), jnp.mean((pred == yi).astype(u.dtype))

  return jax.vmap(one)(x, t, y, keys)


def density_cosine(logits_fn: LogitsFn, x: jax.Array, x_w: jax.Array, t: jax.Array,
                   y: jax.Array, keys: jax.Array, radius: float,
                   num_directions: int) -> dict[str, jax.Array]:
  """cos(:math:`x_w - x`, :math:`\\nabla H_\\delta(x, t)`) per example, with the densities.

  Returns:
    ``cosine`` (0 where no sampled point is classified as ``t``: no direction), ``h_t``,
    ``h_y``, each (B,).
  """
  grad, h_t, h_y = local_density(logits_fn, x, t, y, keys, jnp.float32(radius), num_directions)
  return {"cosine": jax.vmap(_cosine)(grad, x_w - x), "h_t": h_t, "h_y": h_y}
