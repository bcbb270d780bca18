"""benchmarks/compare_trials.py: before/after table of accuracy-benchmark runs, through its command line."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "compare_trials.py"


def _run_folder(folder: Path, rows: dict[str, dict[str, float]]) -> Path:
    folder.mkdir()
    results = {
        "aand": {c: {"0": {"image_AUROC": a, "pixel_AUROC": p, "pixel_AUPRO": o}} for c, (a, p, o) in rows.items()}
    }
    (folder / "results.json").write_text(json.dumps({"settings": {}, "results": results}))
    return folder


def test_table_gives_trial_values_and_changes_on_shared_categories(tmp_path: Path) -> None:
    base = _run_folder(tmp_path / "base", {"brick": (1.0, 0.9, 0.8), "grass": (0.6, 0.7, 0.5)})
    trial = _run_folder(tmp_path / "trial", {"brick": (0.9, 0.95, 0.8), "grass": (0.8, 0.7, 0.6), "screw": (1, 1, 1)})
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, SCRIPT, "--baseline", base, "--trial", f"t={trial}", "--output", out],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines()[2:]}
    assert set(rows) == {"brick", "grass", "**mean**"}  # screw is not in the baseline
    assert "0.900 (-0.100)" in rows["brick"]
    assert "0.800 (+0.200)" in rows["grass"]
    assert "0.850 (+0.050)" in rows["**mean**"]  # image AUROC mean 0.85 against 0.80
    assert result.stdout.strip() == out.read_text().strip()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, SCRIPT, "--baseline", tmp_path, "--trial", f"t={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "results.json not found" in result.stderr
    assert "Traceback" not in result.stderr
