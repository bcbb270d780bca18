"""``anomalib benchmark`` with Aand: the start-up hook, its packaging, and a results file with Aand rows."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HOOK_FILES = ("anomalib_aand.pth", "anomalib_aand_hook.py", "pyproject.toml", "README.md", "LICENSE")


def _python_with_hook(site_dir: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose site directory ``site_dir`` holds the shipped ``.pth``."""
    shutil.copy(REPO / "anomalib_aand.pth", site_dir / "anomalib_aand.pth")
    boot = f"import site; site.addsitedir({str(site_dir)!r})\n{code}"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run(
        [sys.executable, "-c", boot], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_hook_acts_only_when_anomalib_is_imported(tmp_path: Path) -> None:
    """Start-up imports no anomalib; importing anomalib.models makes ``Aand`` and its class paths resolvable, and
    the benchmark's result collection takes jobs whose keys differ."""
    code = (
        "import sys\n"
        "assert 'anomalib' not in sys.modules and 'anomalib_aand' not in sys.modules, 'hook imported too much'\n"
        "from anomalib.models import get_model\n"
        "import anomalib.models as models\n"
        "assert 'anomalib_aand' not in sys.modules, 'importing anomalib.models imported Aand'\n"
        "from anomalib_aand import Aand\n"
        "assert models.Aand is Aand\n"
        "for path in ('Aand', 'anomalib_aand.Aand', 'anomalib.models.Aand'):\n"
        "    init_args = {'backbone': 'resnet18', 'stage1_epochs': 0, 'stage2_epochs': 1}\n"
        "    model = get_model({'class_path': path, 'init_args': init_args})\n"
        "    assert type(model) is Aand, path\n"
        "from anomalib.pipelines.benchmark.job import BenchmarkJob\n"
        "assert BenchmarkJob.collect([{'a': 1, 'b': 2}, {'a': 3, 'c': 4}]).shape == (2, 3)\n"
        "same = BenchmarkJob.collect([{'a': 1, 'b': 2}, {'b': 4, 'a': 3}])\n"
        "assert same.to_dict('list') == {'a': [1, 3], 'b': [2, 4]}\n"
        "print('registered')\n"
    )
    result = _python_with_hook(tmp_path, code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered" in result.stdout
    assert "hook failed" not in result.stderr


@pytest.mark.slow
def test_wheels_install_the_hook(tmp_path: Path) -> None:
    """Both a regular and an editable (``pip install -e``) wheel put ``anomalib_aand.pth`` at site-packages' top."""
    source = tmp_path / "source"
    source.mkdir()
    for name in HOOK_FILES:
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "anomalib_aand", source / "anomalib_aand", ignore=shutil.ignore_patterns("__pycache__"))
    regular = tmp_path / "regular"
    editable = tmp_path / "editable"
    code = (
        "from hatchling import build\n"
        f"print(build.build_wheel({str(regular)!r}))\n"
        f"print(build.build_editable({str(editable)!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    wheels = [*regular.glob("*.whl"), *editable.glob("*.whl")]
    assert len(wheels) == 2
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        assert "anomalib_aand.pth" in names, (wheel.name, names)
        assert "anomalib_aand_hook.py" in names, (wheel.name, names)


@pytest.mark.slow
def test_benchmark_results_have_aand_rows(mvtec_root: Path, tmp_path: Path) -> None:
    """The unchanged ``anomalib benchmark`` CLI on the shipped config (tiny epochs, generated data, no downloads)."""
    config = yaml.safe_load((REPO / "configs" / "benchmark.yaml").read_text())
    models = config["benchmark"]["model"]["grid"]
    assert {m["class_path"] for m in models} == {"Aand", "ReverseDistillation"}
    for model in models:
        model["init_args"] = {**model["init_args"], "backbone": "resnet18", "pre_trained": False}
        model["init_args"].pop("layers", None)
        if model["class_path"] == "Aand":
            model["init_args"].update(stage1_epochs=1, stage2_epochs=1)
    config["benchmark"]["model"]["grid"] = [models[0], models[-1]]
    data = config["benchmark"]["data"]["init_args"]
    data.update(root=str(mvtec_root), train_batch_size=4, eval_batch_size=4)
    data["category"]["grid"] = ["toy"]
    (tmp_path / "benchmark.yaml").write_text(yaml.safe_dump(config))
    code = (
        "import sys\n"
        "from anomalib.cli.cli import main\n"
        "sys.argv = ['anomalib', 'benchmark', '--config', 'benchmark.yaml']\n"
        "main()\n"
    )
    result = _python_with_hook(tmp_path, code, tmp_path, PL_TRAINER_MAX_EPOCHS="1", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((tmp_path / "runs" / "benchmark").glob("*/results.csv"))
    log = (tmp_path / "runs" / "pipeline.log").read_text() if (tmp_path / "runs" / "pipeline.log").exists() else ""
    assert len(files) == 1, log[-3000:]
    results = pd.read_csv(files[0])
    assert "Error" not in log, log[-3000:]
    assert "not allowed" not in log, log[-3000:]
    assert sorted(results["model.class_path"]) == ["Aand", "ReverseDistillation"], results.to_string()
    aand = results[results["model.class_path"] == "Aand"].iloc[0]
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert 0.0 <= float(aand[metric]) <= 1.0, results.to_string()


def test_collect_patch_only_for_affected_anomalib_versions() -> None:
    """The hook replaces ``BenchmarkJob.collect`` only where anomalib's own fails (``COLLECT_PATCH_VERSIONS``)."""
    import types

    from anomalib_aand_hook import patch_benchmark_collect

    original = object()
    for version, patched in (("2.7.0", True), ("2.9.1", True), ("2.6.0", False), ("3.0.0", False)):
        job = types.SimpleNamespace(BenchmarkJob=types.SimpleNamespace(collect=original))
        assert patch_benchmark_collect(job, version) == patched, version
        assert (job.BenchmarkJob.collect is not original) == patched, version
