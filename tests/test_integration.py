"""End to end through anomalib's own tools: the `anomalib` CLI in a subprocess, and `Engine` in Python."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine

from anomalib_aand import Aand

ROOT = Path(__file__).resolve().parents[1]
ANOMALIB = [str(Path(sys.executable).with_name("anomalib"))]
SMALL = [
    "--model",
    "anomalib_aand.Aand",
    "--model.backbone",
    "resnet18",
    "--model.pre_trained",
    "false",
    "--model.stage1_epochs",
    "1",
    "--model.stage2_epochs",
    "1",
]
METRIC = re.compile(r"│\s*(image_\w+|pixel_\w+)\s*│\s*([-+0-9.eE]+|nan)\s*│")


def run_anomalib(*args: str, cwd: Path) -> tuple[str, dict[str, float]]:
    """Run the `anomalib` CLI; return its output and the metrics of its test table."""
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*ANOMALIB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output, {name: float(value) for name, value in METRIC.findall(output)}


def data_args(root: Path) -> list[str]:
    return [
        "--data",
        "anomalib.data.MVTecAD",
        "--data.root",
        str(root),
        "--data.category",
        "toy",
        "--data.num_workers",
        "0",
        "--data.train_batch_size",
        "4",
        "--data.eval_batch_size",
        "4",
    ]


@pytest.fixture(scope="module")
def trained(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float], Path]:
    """`anomalib train --config configs/mvtec_ad.yaml` once, small: (work dir, reported metrics, checkpoint)."""
    work = tmp_path_factory.mktemp("cli")
    _, metrics = run_anomalib(
        "train",
        "--config",
        str(ROOT / "configs" / "mvtec_ad.yaml"),
        *SMALL[2:],
        *data_args(mvtec_root)[2:],
        "--seed_everything",
        "7",
        "--default_root_dir",
        "out",
        cwd=work,
    )
    checkpoints = list((work / "out").rglob("model.ckpt"))
    assert len(checkpoints) == 1
    return work, metrics, checkpoints[0]


@pytest.mark.slow
def test_cli_train_reports_metrics(trained: tuple[Path, dict[str, float], Path]) -> None:
    """The run took the config's model (the paper's settings, per-category foreground list) and reported metrics."""
    work, metrics, _ = trained
    config = next((work / "out").rglob("config.yaml")).read_text()
    assert "class_path: anomalib_aand.Aand" in config
    assert "- screw" in config  # mvtec_ad.yaml's foreground_mask list
    for name in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO", "pixel_F1Max"):
        assert name in metrics
        assert 0.0 <= metrics[name] <= 1.0


@pytest.mark.slow
def test_checkpoint_holds_both_stages_and_teacher(trained: tuple[Path, dict[str, float], Path]) -> None:
    _, _, checkpoint = trained
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert len(state["optimizer_states"]) == 2
    assert len(state["lr_schedulers"]) == 2
    assert all(s["state"] for s in state["optimizer_states"])  # both stages took Adam steps
    weights = state["state_dict"]
    assert any(k.startswith("model.raa.") for k in weights)
    assert any(k.startswith("model.teacher.feature_extractor.") for k in weights)
    assert bool(weights["teacher_initialised"])


@pytest.mark.slow
def test_cli_test_and_predict_from_checkpoint(trained: tuple[Path, dict[str, float], Path], mvtec_root: Path) -> None:
    work, train_metrics, checkpoint = trained
    _, metrics = run_anomalib(
        "test",
        "--model",
        "anomalib_aand.Aand",
        "--model.backbone",
        "resnet18",
        *data_args(mvtec_root),
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        "test_out",
        cwd=work,
    )
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert metrics[name] == pytest.approx(train_metrics[name], abs=1e-6)
    output, _ = run_anomalib(
        "predict",
        "--model",
        "anomalib_aand.Aand",
        "--model.backbone",
        "resnet18",
        "--data",
        str(mvtec_root / "toy" / "test" / "spot"),
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        "predict_out",
        cwd=work,
    )
    images = list((work / "predict_out").rglob("*.png"))
    assert len(images) == 4, output[-2000:]


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if config.stem == "benchmark":
        pytest.skip("benchmark config is for `anomalib benchmark`")
    from anomalib.cli.cli import AnomalibCLI

    with pytest.raises(SystemExit) as stop:
        AnomalibCLI(["train", "--config", str(config), "--print_config"])
    assert stop.value.code in {0, None}
    assert "class_path: anomalib_aand.Aand" in capsys.readouterr().out


@pytest.mark.slow
def test_engine_fit_test_predict_and_reload(lite0_trained: dict) -> None:
    """The ImageNet teacher (offline package weights) finds the toy set's large dark squares.

    Measured floors with margin: image AUROC 1.0 and pixel AUROC >= 0.98 on data seeds 0, 1 and 2.
    """
    engine = lite0_trained["engine"]
    model = lite0_trained["model"]
    datamodule = lite0_trained["datamodule"]
    assert engine.trainer.current_epoch == 6
    results = engine.test(model=model, datamodule=datamodule)
    assert results[0]["image_AUROC"] >= 0.9
    assert results[0]["pixel_AUROC"] >= 0.9
    first = engine.predict(model=model, datamodule=datamodule)
    reloaded = Aand.load_from_checkpoint(lite0_trained["checkpoint"])
    again = Engine(default_root_dir=lite0_trained["root"] / "again", logger=False)
    second = again.predict(model=reloaded, datamodule=datamodule)
    scores = [torch.cat([b.pred_score.flatten() for b in run]) for run in (first, second)]
    assert torch.allclose(scores[0], scores[1], atol=1e-6)
