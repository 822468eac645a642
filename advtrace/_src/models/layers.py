"""Layers shared by the model definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2, stride-2 VALID max-pooling of an NHWC batch (odd trailing rows/columns are dropped).

  Same values and gradients as ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``, written as a
  reshape plus a one-hot select of the *first* maximum of each window (row-major, as PyTorch
  and ``reduce_window`` pick it). On CPU, XLA's index-tracking ``reduce_window`` gradient cost
  about half of an attack step on the DEEPSEC MNIST CNN; this form removes that
  (``benchmarks/README.md``). A plain ``max`` would split the gradient over ties, which are
  common on MNIST's flat background.
  """
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  win = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  win = win.reshape(n, h // 2, w // 2, c, 4)
  first_max = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(win), axis=-1), 4, dtype=x.dtype)
  return jnp.sum(win * first_max, axis=-1)
