"""``jit`` with the XLA options that make attack steps fast on CPU.

On CPU, XLA's YNNPACK library fusion ran the DEEPSEC MNIST CNN's forward VALID convolution
slowly; restricting it to individual matrix multiplies made one input-gradient step 1.7x faster
on 2 cores (``benchmarks/README.md``). The option is only passed where the backend is CPU and
the installed XLA accepts it, so other backends and versions are unaffected.
"""

from __future__ import annotations

import functools

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """The extra XLA options for the default backend, or None."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda v: v + 1, compiler_options=_CPU_OPTIONS)(1.0)
  except Exception:  # an XLA without this option: fall back to the defaults
    return None
  return dict(_CPU_OPTIONS)


def jit(fun=None, **jit_kwargs):
  """Drop-in for ``jax.jit`` (also as a decorator) that adds :func:`compiler_options`.

  The backend is queried on the first use, not at import, so importing advtrace does not
  initialise JAX. Attributes of the jitted function (``lower``, ``trace``, ...) are available.
  """
  if fun is None:
    return functools.partial(jit, **jit_kwargs)
  return _LazyJit(fun, jit_kwargs)


class _LazyJit:
  """``jax.jit(fun, **jit_kwargs)``, created on first use with the backend's options."""

  def __init__(self, fun, jit_kwargs):
    self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
    functools.update_wrapper(self, fun)

  def _get(self):
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self._get(), name)
