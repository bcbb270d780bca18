"""The GPU check runs on the CPU at tiny size (``--cpu``), so it is known to work before a GPU is lent.

The script runs every step in a process of its own; here one step (``env``) goes that way, through ``main``, and
one step of each other kind (data, probes, a training run, the wide_resnet50_2 steps, export) runs in the test's
process through ``run_step``, the function each child process calls. The other training steps are the same run
with other precision or cache arguments, which ``test_mixed_precision.py`` covers; ``ddp2`` needs two GPUs on a
GPU machine, and DDP's cache and probes are covered by ``test_ddp.py``.
"""

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/ is not a package)

STEPS = ("data", "probes", "fp32_cache", "wrn50", "export")


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert gpu_check.main(["--cpu", "--out", str(out), "--steps", "^env$"]) == 0
    summary = (out / "SUMMARY.md").read_text()
    assert "| env | ok |" in summary
    assert [path.name for path in out.glob("*.json")] == ["env.json"]  # --steps chose one step
    assert "Machine:" in summary
    assert "Command:" in summary
    settings = gpu_check.Settings(argparse.Namespace(cpu=True, out=out, work=None))
    for step in STEPS:
        gpu_check.run_step(step, settings)
        assert json.loads((out / f"{step}.json").read_text())["ok"], (out / f"{step}.json").read_text()
    cached = json.loads((out / "fp32_cache.json").read_text())["ranks"][0]
    assert cached["cache"]["placement"] == "in host memory"
    assert 0 < cached["cache"]["hits"] < cached["stage2_steps"]  # one process: from the second stage-2 epoch on
    probes = json.loads((out / "probes.json").read_text())
    assert all(part["ok"] for name, part in probes.items() if isinstance(part, dict) and "ok" in part), probes
    export = json.loads((out / "export.json").read_text())
    assert export["onnx_vs_torch_cpu_score"] < 1e-3
    gpu_check._summary(settings, [(step, "ok", 0.0) for step in STEPS], budget=1800)  # noqa: SLF001
    summary = (out / "SUMMARY.md").read_text()
    assert "| fp32_cache | 32-true | 1 |" in summary
    assert "## export" in summary
