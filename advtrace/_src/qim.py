r"""The QIM watermark decoder :math:`W_\phi` of "injected attractors", and its secret key.

For an image of :math:`\ell` values on the [0, 255] scale and one message per class, the
decoder measures how close the image is to each message's QIM lattice and maps that distance to
a correlation :math:`w_k \ge 0` that is high near the message (an *attractor*) and low far from
it. Everything is a pure, differentiable function of the image; the messages are the secret.

Per value :math:`p` (one pixel channel), scale :math:`\delta` and message bit :math:`m`, the
codewords of bit :math:`m` are :math:`c_m + 2\delta k` with :math:`c_0 = 0.5\delta`,
:math:`c_1 = 1.5\delta`, and the distance to the nearest one is

.. math::
  q(p, m, \delta) = \delta - \big|\, ((p - c_m) \bmod 2\delta) - \delta \,\big| \in [0, \delta].

Each value contributes one term per scale (independent bits per scale), weighted so that every
scale's term lies in [0, 1] before its scale weight:

.. math::
  r(x, m) = \frac{Q}{Q_{max}} = \frac{1}{\ell} \sum_i \sum_s a_s \frac{q(p_i, m_{s,i}, \delta_s)}
    {\delta_s}, \qquad \sum_s a_s = 1,

and eq. (3) maps it to the correlation :math:`S(r) = A_2 \tanh\big(v / (1 - v)\big)` with
:math:`v = A_0 r - A_1`. Decision D1 (attractors.md) sets :math:`A_0 = -1, A_1 = -1`, so
:math:`v = 1 - r` and :math:`w \to A_2` at the message, :math:`w \to 0` far from it.

References:
  Zhang, Chang, Lee, "Detection and Recovery of Adversarial Attacks with Injected Attractors",
  2020. https://arxiv.org/abs/2003.02732 (§V-E, eq. 3).
  Chen & Wornell, "Quantization Index Modulation: A Class of Provably Good Methods for Digital
  Watermarking and Information Embedding", IEEE Trans. Inf. Theory 2001.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advtrace._src import atomic

_V_MAX = 1.0 - 1e-6  # keeps v / (1 - v) finite at an exact attractor (D1)


class QIMConfig(NamedTuple):
  """Public (non-secret) decoder settings; defaults are the decisions recorded in attractors.md.

  Attributes:
    steps: the QIM step sizes on the [0, 255] scale (paper: 3 and 128).
    scale_weights: the weight :math:`a_s` of each step size (D3: 128 : 3 = 4 : 1).
    a2: the amplitude :math:`A_2` of the correlation (D5): 1.0, the value at which DeepFool,
      the hardest attack to detect here, is detected at >= 95% TPR at 5% FPR with clean
      accuracy unchanged (docs/results/attractors_mnist.md).
    toward_message: D1. True: w is high near the message (``v = 1 - r``). False: the
      literal reading of eq. (3) with ``v = r`` (w high far from the message), kept for the
      measurement that decided D1.
    in_range: D2. False: the periodic lattice (every codeword ``c_m + 2 delta k``). True: only
      the codewords inside [0, 255], the paper's listed non-negative ones; distances are then
      normalised by the largest one possible in [0, 255] instead of ``delta``.
  """
  steps: tuple[float, ...] = (128.0, 3.0)
  scale_weights: tuple[float, ...] = (0.8, 0.2)
  a2: float = 1.0
  toward_message: bool = True
  in_range: bool = False


def qim_distance(p: jax.Array, bit: jax.Array, delta: float,
                 in_range: bool = False) -> jax.Array:
  """Distance from values ``p`` (0..255 scale) to the nearest codeword of ``bit`` at ``delta``.

  With ``in_range`` only the codewords inside [0, 255] count (see :class:`QIMConfig`).
  """
  center = (0.5 + bit) * delta
  periodic = delta - jnp.abs(jnp.mod(p - center, 2.0 * delta) - delta)
  if not in_range:
    return periodic
  highest = _highest_codeword(center, delta)
  return jnp.where(p < center, center - p, jnp.where(p > highest, p - highest, periodic))


def _highest_codeword(center, delta: float):
  """The largest codeword ``center + 2 delta k`` (k >= 0) that is at most 255.

  ``//`` keeps a Python float a concrete float, so :func:`max_distance` works under ``jit``.
  """
  return center + 2.0 * delta * ((255.0 - center) // (2.0 * delta))


def max_distance(delta: float, in_range: bool = False) -> float:
  """The largest :func:`qim_distance` a value in [0, 255] can have, for either bit."""
  if not in_range:
    return float(delta)
  worst = float(delta)
  for bit in (0, 1):
    center = (0.5 + bit) * delta
    worst = max(worst, center, 255.0 - float(_highest_codeword(center, delta)))
  return worst


def _weighted_distance(p: jax.Array, message: jax.Array, cfg: QIMConfig) -> jax.Array:
  """Per value, the scale-weighted sum of normalised distances; ``message[s]`` broadcasts to p."""
  total = 0.0
  for s, (delta, weight) in enumerate(zip(cfg.steps, cfg.scale_weights, strict=True)):
    q = qim_distance(p, message[s], delta, cfg.in_range)
    total = total + weight * q / max_distance(delta, cfg.in_range)
  return total


def normalized_distance(x: jax.Array, message: jax.Array, cfg: QIMConfig) -> jax.Array:
  """:math:`r = Q / Q_{max} \\in [0, 1]` between one image ``x`` in [0, 1] and one message.

  Args:
    x: one image (any shape) with values in [0, 1].
    message: bits of shape ``(len(cfg.steps),) + x.shape``.
    cfg: the decoder settings.
  """
  return jnp.mean(_weighted_distance(255.0 * x, message, cfg)) / sum(cfg.scale_weights)


def correlation(r: jax.Array, cfg: QIMConfig) -> jax.Array:
  """Eq. (3), :math:`S(r) = A_2 \\tanh((A_0 r - A_1) / (1 + A_1 - A_0 r))`, with D1's constants."""
  a0, a1 = (-1.0, -1.0) if cfg.toward_message else (1.0, 0.0)
  v = jnp.clip(a0 * r - a1, 0.0, _V_MAX)
  return cfg.a2 * jnp.tanh(v / (1.0 - v))


def decode(x: jax.Array, messages: jax.Array, cfg: QIMConfig) -> jax.Array:
  """:math:`W_\\phi(x)` for a batch: correlations of shape ``(batch, num_messages)``.

  Args:
    x: images, NHWC in [0, 1].
    messages: the secret bits, shape ``(num_messages, len(cfg.steps)) + x.shape[1:]``.
    cfg: the decoder settings.

  Raises:
    ValueError: the images' shape is not the one the key was made for.
  """
  if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != tuple(messages.shape[2:]):
    raise ValueError(f"The QIM key covers images of shape {tuple(messages.shape[2:])}, got a "
                     f"batch of shape {tuple(jnp.shape(x))}; pass NHWC images of the dataset "
                     "the key was made for.")
  per_message = jax.vmap(normalized_distance, in_axes=(None, 0, None))
  r = jax.vmap(per_message, in_axes=(0, None, None))(x, messages, cfg)
  return correlation(r, cfg)


def make_messages(key: jax.Array, num_messages: int, num_scales: int,
                  image_shape: tuple[int, ...]) -> jax.Array:
  """Draws i.i.d. uniform message bits (D4) from an explicit PRNG key, as float32 0/1."""
  bits = jax.random.bernoulli(key, 0.5, (num_messages, num_scales) + tuple(image_shape))
  return bits.astype(jnp.float32)


class SecretKey(NamedTuple):
  """The decoder's key material. Never log it; store it apart from public artefacts."""
  messages: jax.Array  # (num_messages, num_scales, H, W, C), float32 0/1

  def fingerprint(self) -> str:
    """A short non-reversible id of the key, safe to put in public results."""
    digest = hashlib.sha256(np.asarray(self.messages, np.uint8).tobytes()).hexdigest()
    return digest[:12]

  def __repr__(self) -> str:  # keep the bits out of logs and tracebacks
    return f"SecretKey(<{self.messages.shape} bits, fingerprint {self.fingerprint()}>)"


def new_secret_key(key: jax.Array, num_messages: int, image_shape: tuple[int, ...],
                   cfg: QIMConfig = QIMConfig()) -> SecretKey:
  """Derives the secret messages for ``num_messages`` classes from a typed PRNG key."""
  return SecretKey(make_messages(key, num_messages, len(cfg.steps), image_shape))


def save_secret_key(path: str | os.PathLike, secret: SecretKey) -> None:
  """Writes the key atomically, readable by the owner only (mode 0600)."""
  meta = np.frombuffer(json.dumps({"kind": "advtrace.qim.SecretKey"}).encode(), np.uint8)
  atomic.write_npz(path, {"messages": np.asarray(secret.messages, np.uint8), "meta": meta},
                   mode=0o600)


def load_secret_key(path: str | os.PathLike) -> SecretKey:
  """Reads a key written by :func:`save_secret_key` (no pickle)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No QIM secret key at {path!r}. Create one with "
                            "advtrace.attractors.new_secret_key and save_secret_key.")
  with np.load(path, allow_pickle=False) as f:
    if "messages" not in f:
      raise ValueError(f"{path!r} is not an advtrace QIM key file (no 'messages' array).")
    bits = f["messages"]
  if not np.isin(bits, (0, 1)).all() or bits.ndim != 5:
    raise ValueError(f"{path!r} holds malformed message bits (shape {bits.shape}); expected "
                     "0/1 values of shape (num_messages, num_scales, H, W, C).")
  return SecretKey(jnp.asarray(bits, jnp.float32))


def nearest_attractor(x: jax.Array, message: jax.Array, cfg: QIMConfig) -> jax.Array:
  """The attractor of ``message`` nearest to one image ``x`` (D11), on the [0, 1] scale.

  Per value, the candidates are every codeword of every scale inside [0, 255] plus the value
  itself; the one with the lowest weighted two-scale distance wins, ties going to the candidate
  closest to the value.
  """
  p = 255.0 * x
  centers = []
  for delta in cfg.steps:
    k = jnp.arange(int(np.ceil(256.0 / (2 * delta))) + 1)
    for bit_center in (0.5 * delta, 1.5 * delta):
      centers.append(bit_center + 2.0 * delta * k)
  grid = jnp.concatenate(centers)
  grid = jnp.where(grid <= 255.0, grid, 255.0)
  candidates = jnp.concatenate([jnp.broadcast_to(grid[:, None], (grid.size, p.size)),
                                p.reshape(1, -1)], axis=0)
  cost = _weighted_distance(candidates, message.reshape(message.shape[0], 1, -1), cfg)
  # Lexicographic (cost, distance): costs are exact piecewise-linear values, so round them.
  key_ = jnp.round(cost * 1e6) + jnp.abs(candidates - p.reshape(1, -1)) / 1e3
  best = jnp.take_along_axis(candidates, jnp.argmin(key_, axis=0)[None], axis=0)[0]
  return (best / 255.0).reshape(x.shape)
