"""The GPU check runs on the CPU at tiny size (``--cpu``), so it is known to work before a GPU is lent.

The test runs one step of each kind (environment, data, probes, a training run, DDP, the wide_resnet50_2 steps,
export); the other training steps are the same run with other precision or cache arguments, which
``test_mixed_precision.py`` covers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = "env|data|probes|fp32_cache|ddp2|wrn50|export"


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--steps", STEPS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=2400, check=False)
    summary = (out / "SUMMARY.md").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + summary
    for step in STEPS.split("|"):
        assert json.loads((out / f"{step}.json").read_text())["ok"], step
    assert not (out / "bf16.json").exists()
    cached = json.loads((out / "fp32_cache.json").read_text())["ranks"][0]
    assert cached["cache"]["placement"] == "in host memory"
    assert 0 < cached["cache"]["hits"] < cached["stage2_steps"]  # one process: from the second stage-2 epoch on
    ddp = json.loads((out / "ddp2.json").read_text())["ranks"]
    assert len(ddp) == 2
    assert all(rank["cache"]["hits"] == rank["stage2_steps"] for rank in ddp)  # DDP: filled when stage 2 starts
    probes = json.loads((out / "probes.json").read_text())
    assert all(part["ok"] for name, part in probes.items() if isinstance(part, dict) and "ok" in part), probes
    export = json.loads((out / "export.json").read_text())
    assert export["onnx_vs_torch_cpu_score"] < 1e-3
    assert "Machine:" in summary
    assert "Command:" in summary
