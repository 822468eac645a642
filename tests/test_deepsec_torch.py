"""Optional parity with PyTorch: DEEPSEC's own model definitions, loaded with ``torch.load``.

Skipped unless torch is importable (``pip install torch==2.13.0``) and the DEEPSEC weights are
in ``../shared/weights/deepsec``. torch is used only here, never by the library.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import deepsec_weights
from conftest import repo_root

from advtrace._src.models import deepsec_weights as dw
from advtrace._src.models import registry

torch = pytest.importorskip("torch", reason="torch is not installed (optional cross-check)")
from third_party.deepsec.torch_reference import MNISTConvNet  # noqa: E402
from third_party.deepsec.torch_reference import ResNetCifar  # noqa: E402

MNIST_PT = deepsec_weights("MNIST_raw.pt")
CIFAR_PT = deepsec_weights("CIFAR10_raw.pt")


CASES = {
    "mnist": (MNISTConvNet, MNIST_PT, (16, 28, 28, 1)),
    "cifar": (ResNetCifar, CIFAR_PT, (8, 32, 32, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flax_and_evaluate_match_torch(tmp_path, case):
  torch_cls, path, shape = CASES[case]
  if path is None:
    pytest.skip(f"DEEPSEC weights for {case} are absent from ../shared/weights/deepsec")
  net = torch_cls()
  net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  net.eval()

  rng = np.random.RandomState(7)
  x = rng.rand(*shape).astype(np.float32)
  y = rng.randint(0, 10, size=shape[0])
  npz = tmp_path / "inputs.npz"
  np.savez(npz, x=x, y=y, num_classes=10)
  # The reference runs in float64: torch's own float32 result is further from it (about 1.5e-4
  # on the ResNet, whose logits reach ~27) than the Flax float32 logits are (about 3e-5).
  x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    expected = net.double()(x_nchw.double()).numpy()
    torch32 = net.float()(x_nchw).numpy()
  assert np.abs(torch32 - expected).max() < 1e-3

  name, variables = dw.load_deepsec(path)
  flax_logits = np.asarray(registry.logits_fn(registry.get_model(name), variables)(x))
  diff = np.abs(flax_logits - expected).max()
  print(f"{case}: max |logit difference| Flax vs torch float64 {diff:.3g}, torch float32 vs "
        f"float64 {np.abs(torch32 - expected).max():.3g}, Flax vs torch float32 "
        f"{np.abs(flax_logits - torch32).max():.3g}")
  assert diff < 1e-4
  assert np.ptp(expected, axis=1).min() > 1.0  # Non-degenerate logits.

  workdir = tmp_path / "eval"
  cmd = [sys.executable, str(repo_root() / "experiments" / "evaluate.py"), f"--weights={path}",
         f"--dataset={npz}", "--batch_size=5", "--dump_logits", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  dumped = np.load(workdir / "logits.npy")
  assert np.abs(dumped - expected).max() < 1e-4
