"""Per-example attack losses on logits. Every loss here is one the attacker *minimises*.

``targeted`` is a (possibly traced) bool: untargeted losses push the true label down, targeted
ones push the target up. Each function takes the logits of one example, shape ``(classes,)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, label: jax.Array, targeted) -> jax.Array:
  """Minimise CE to the target (targeted) or maximise CE to the true label (untargeted)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  return jnp.where(targeted, ce, -ce)


def margin(logits: jax.Array, label: jax.Array, targeted, kappa=0.0) -> jax.Array:
  r"""Carlini-Wagner margin loss :math:`f`, clamped at ``-kappa``.

  Untargeted: :math:`\max(z_y - \max_{i \ne y} z_i, -\kappa)`;
  targeted: :math:`\max(\max_{i \ne t} z_i - z_t, -\kappa)`.

  References:
    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.
    https://arxiv.org/abs/1608.04644
  """
  onehot = jax.nn.one_hot(label, logits.shape[-1], dtype=bool)
  z_label = jnp.sum(jnp.where(onehot, logits, 0.0))
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits))
  diff = jnp.where(targeted, z_other - z_label, z_label - z_other)
  return jnp.maximum(diff, -kappa)


def least_likely(logits: jax.Array) -> jax.Array:
  """The least-likely class (minimum logit), DEEPSEC's LLC/ILLC target."""
  return jnp.argmin(logits, axis=-1)
