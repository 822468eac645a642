"""End-to-end test of the README quickstart command, with one training epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import repo_root

from advtrace._src import quickstart

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart")
  cmd = [sys.executable, "experiments/quickstart.py", f"--workdir={workdir}",
         "--config.train.num_epochs=1"]
  proc = subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, timeout=600,
                        stdin=subprocess.DEVNULL, env=dict(os.environ, MPLBACKEND="Agg"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_quickstart_writes_report(quickstart_dir):
  results = json.loads((quickstart_dir / "results.json").read_text())
  assert 0.3 < results["test_accuracy"] <= 1.0  # Chance is 0.1; one epoch reaches ~0.8.
  assert results["sections"]["training"]["epochs"] == 1
  assert results["sections"]["predictions"]["num_images"] == 32
  report = (quickstart_dir / "report.md").read_text()
  assert f"{results['test_accuracy']:.4f}" in report
  assert results["figures"] == ["figures/training_curve.png", "figures/predictions.png"]
  for figure in results["figures"]:
    assert f"]({figure})" in report
    assert (quickstart_dir / figure).read_bytes()[:8] == _PNG_MAGIC
  assert (quickstart_dir / "train" / "checkpoints" / "model.json").is_file()


def test_quickstart_sections_plug_in(quickstart_dir):
  def extra_section(ctx):
    accuracy = float((ctx.logits(ctx.test_images).argmax(-1) == ctx.test_labels).mean())
    return quickstart.Section("extra", "Extra", f"Recomputed accuracy {accuracy:.4f}.",
                              results={"accuracy": accuracy})

  config = quickstart.default_config()
  config.train.num_epochs = 1  # Already trained in quickstart_dir: only the report is redone.
  results = quickstart.run(config, quickstart_dir,
                           sections=(quickstart.training_section, extra_section))
  assert results["sections"]["extra"]["accuracy"] == pytest.approx(results["test_accuracy"])
  assert "## Extra" in (quickstart_dir / "report.md").read_text()
  assert "predictions" not in results["sections"]
