"""Per-example projections onto Lp balls and the box. Batch them with ``jax.vmap``.

``optax.projections.projection_l2_ball`` uses the norm of the whole pytree, which is why these
work on one example at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2", "l1")


def clip_box(x: jax.Array, clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
  return jnp.clip(x, clip_min, clip_max)


def project_linf(delta: jax.Array, eps: jax.Array) -> jax.Array:
  return jnp.clip(delta, -eps, eps)


def project_l2(delta: jax.Array, eps: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(delta * delta))
  return delta * jnp.minimum(1.0, eps / jnp.maximum(norm, 1e-12))


def project_l1(delta: jax.Array, eps: jax.Array) -> jax.Array:
  """Euclidean projection onto the L1 ball (Duchi et al., 2008), sort-based."""
  flat = delta.reshape(-1)
  absd = jnp.abs(flat)
  srt = jnp.sort(absd)[::-1]
  cssv = jnp.cumsum(srt) - eps
  idx = jnp.arange(1, flat.size + 1, dtype=flat.dtype)
  rho = jnp.max(jnp.where(srt - cssv / idx > 0, idx, 0.0))
  theta = jnp.maximum(cssv[jnp.maximum(rho.astype(jnp.int32) - 1, 0)] / jnp.maximum(rho, 1.0), 0.0)
  projected = jnp.sign(flat) * jnp.maximum(absd - theta, 0.0)
  inside = jnp.sum(absd) <= eps
  return jnp.where(inside, flat, projected).reshape(delta.shape)


def project(delta: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """Projects one example's perturbation onto the ``norm`` ball of radius ``eps``."""
  return {"linf": project_linf, "l2": project_l2, "l1": project_l1}[norm](delta, eps)


def project_and_clip(x_adv: jax.Array, x: jax.Array, eps: jax.Array, norm: str,
                     clip_min: float = 0.0, clip_max: float = 1.0) -> jax.Array:
  """Projects ``x_adv`` onto the ``eps``-ball around ``x``, then clips to the box."""
  return clip_box(x + project(x_adv - x, eps, norm), clip_min, clip_max)


def random_in_ball(key: jax.Array, shape, eps: jax.Array, norm: str) -> jax.Array:
  """A random point in the ``eps``-ball: uniform per coordinate for Linf, uniform in volume for L2.

  For L1 a random direction scaled uniformly in radius (not volume-uniform).
  """
  if norm == "linf":
    return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0) * eps
  kdir, krad = jax.random.split(key)
  if norm == "l2":
    d = jax.random.normal(kdir, shape)
    d = d / jnp.maximum(jnp.linalg.norm(d.reshape(-1)), 1e-12)
    r = jax.random.uniform(krad) ** (1.0 / d.size)
    return d * r * eps
  d = jax.random.laplace(kdir, shape)
  d = d / jnp.maximum(jnp.sum(jnp.abs(d)), 1e-12)
  return d * jax.random.uniform(krad) * eps


def normalize_step(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest-ascent direction of unit ``norm`` for one example's gradient.

  Linf: sign(g). L2: g / ||g||_2. L1: the coordinate(s) of largest |g| (ties share the step).
  """
  if norm == "linf":
    return jnp.sign(grad)
  if norm == "l2":
    return grad / jnp.maximum(jnp.sqrt(jnp.sum(grad * grad)), 1e-12)
  absg = jnp.abs(grad)
  top = (absg == jnp.max(absg)) & (absg > 0)
  return jnp.sign(grad) * top / jnp.maximum(jnp.sum(top), 1)
