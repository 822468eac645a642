"""Locations of the shared (read-only) test data, and a loader for the experiment configs.

Plain functions, importable with ``from conftest import tfds_data_dir``; all but the config
loaders are also pytest fixtures of the same names. The data locators return None when their
data is absent, and tests then ``pytest.skip`` with a reason.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import pytest

# Tests check the algorithms at float32 precision. On a GPU, XLA's default multiplies float32
# matrices in TF32 (10-bit mantissa), which moves results by ~1e-3; set for subprocesses too.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


def repo_root() -> Path:
  """The repository root (the parent of ``tests/``)."""
  return Path(__file__).resolve().parent.parent


def experiment_config_module(name: str):
  """The module ``experiments/configs/<name>.py``."""
  path = repo_root() / "experiments" / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def experiment_config(name: str):
  """``get_config()`` of ``experiments/configs/<name>.py``."""
  return experiment_config_module(name).get_config()


def shared_root() -> Path | None:
  """``<repo>/../shared`` if it exists, else None."""
  path = repo_root().parent / "shared"
  return path if path.is_dir() else None


def tfds_data_dir() -> str | None:
  """The tfds data dir: ``$TFDS_DATA_DIR`` if set, else ``<shared>/tensorflow_datasets``."""
  env = os.environ.get("TFDS_DATA_DIR")
  if env:
    return env if Path(env).is_dir() else None
  shared = shared_root()
  if shared is not None and (shared / "tensorflow_datasets").is_dir():
    return str(shared / "tensorflow_datasets")
  return None


def deepsec_weights(name: str) -> Path | None:
  """``<shared>/weights/deepsec/<name>`` (e.g. ``'MNIST_raw.pt'``) if it exists, else None."""
  shared = shared_root()
  path = None if shared is None else shared / "weights" / "deepsec" / name
  return path if path is not None and path.is_file() else None


@pytest.fixture(name="repo_root")
def _repo_root_fixture() -> Path:
  return repo_root()


@pytest.fixture(name="shared_root")
def _shared_root_fixture() -> Path | None:
  return shared_root()


@pytest.fixture(name="tfds_data_dir")
def _tfds_data_dir_fixture() -> str | None:
  return tfds_data_dir()


@pytest.fixture(name="deepsec_weights")
def _deepsec_weights_fixture():
  """The :func:`deepsec_weights` function itself: ``deepsec_weights('MNIST_raw.pt')``."""
  return deepsec_weights


@pytest.fixture(scope="module")
def fast_compiles():
  """Turns off most XLA optimisations for one test module, then restores the setting.

  For modules where compile time dominates and the numerics compared do not depend on it. A
  process-wide setting would change other modules' numerics in the same worker, so it is
  module-scoped; use it with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``.
  """
  import jax  # pylint: disable=g-import-not-at-top

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
