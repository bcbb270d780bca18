"""What a user of the ``anomalib`` command sees: reproducible runs and errors that end with what to do.

Two seeded trainings, each in a fresh process, must give the same model. Commands that stop before training must
stop with Aand's own sentence as the last thing printed, never with jsonargparse's ``Namespace(...)`` or torch's
advice to load a file with ``weights_only=False``; they run ``anomalib.cli.cli.main`` (what the ``anomalib``
command calls) in the test's process, with its output captured at the file descriptors.
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
from conftest import tiny_aand

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
TINY = [
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


def data(root: Path) -> list[str]:
    return [
        *("--data", "anomalib.data.MVTecAD", "--data.root", str(root), "--data.category", "toy"),
        *("--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4"),
    ]


def anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([ANOMALIB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


def last_lines(result: subprocess.CompletedProcess, count: int = 3) -> str:
    return "\n".join([line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-count:])


def anomalib_stops(*args: str, cwd: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """``anomalib ARGS`` in this process, for a command that must exit before training: its exit status, its
    output and its last printed line."""
    from anomalib.cli.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["anomalib", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    return stopped.value.code, out + err, lines[-1]


CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  deterministic: true
model:
  class_path: anomalib_aand.Aand
  init_args:
    backbone: resnet18
    pre_trained: false
    stage1_epochs: 1
    stage2_epochs: 1
    hkd_top_k: 2
    visualizer: false
    pre_processor:
      class_path: anomalib.pre_processing.PreProcessor
      init_args:
        transform:
          class_path: torchvision.transforms.v2.Compose
          init_args:
            transforms:
              - class_path: torchvision.transforms.v2.Resize
                init_args: {size: [64, 64]}
              - class_path: torchvision.transforms.v2.Normalize
                init_args: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
data:
  class_path: anomalib.data.MVTecAD
  init_args: {root: ROOT, category: toy, num_workers: 0, train_batch_size: 2, eval_batch_size: 4}
"""


def test_seed_everything_makes_cli_runs_reproducible(mvtec_root: Path, tmp_path: Path) -> None:
    """``anomalib train --config`` twice with ``seed_everything: 0`` and deterministic algorithms: one model."""
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.replace("ROOT", str(mvtec_root)))
    states = []
    for run in ("first", "second"):
        result = anomalib("train", "--config", str(config), "--default_root_dir", run, cwd=tmp_path)
        assert result.returncode == 0, last_lines(result, 40)
        states.append(torch.load(next((tmp_path / run).rglob("model.ckpt")), weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert "seed_everything: 0" in next((tmp_path / "first").rglob("config.yaml")).read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--model.backbone", "resnet_nope"), "Unknown backbone 'resnet_nope'"),
        (("--model.layers", "[layer1, layer9]"), "has no layer(s) ['layer9']"),
        (("--model.stage2_epochs", "-3"), "stage2_epochs must be an integer >= 1"),
    ],
)
def test_model_errors_are_the_last_thing_printed(
    mvtec_root: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    arguments: tuple[str, str],
    message: str,
) -> None:
    command = ("train", "--model", "anomalib_aand.Aand", *arguments, *data(mvtec_root))
    status, output, last = anomalib_stops(*command, cwd=tmp_path, capfd=capfd, monkeypatch=monkeypatch)
    assert status == 2
    assert last.startswith("error: --model anomalib_aand.Aand: ")
    assert message in last
    assert "Namespace(" not in output
    assert "Traceback" not in output


def test_checkpoint_of_another_model_as_ckpt_path(
    mvtec_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a ReverseDistillation checkpoint holds that an Aand checkpoint never does: anomalib's own enum."""
    other = tmp_path / "rd.ckpt"
    torch.save(
        {
            "state_dict": {"model.encoder.conv1.weight": torch.zeros(1)},
            "hyper_parameters": {"backbone": "resnet18", "anomaly_map_mode": AnomalyMapGenerationMode.ADD},
            "pytorch-lightning_version": lightning.__version__,
        },
        other,
    )
    command = ("test", *TINY, *data(mvtec_root), "--ckpt_path", str(other))
    status, output, last = anomalib_stops(*command, cwd=tmp_path, capfd=capfd, monkeypatch=monkeypatch)
    assert status == 2
    assert last.startswith(f"error: {str(other)!r} is not a checkpoint of Aand (a checkpoint of anomalib's reverse_")
    assert last.endswith("pass the model.ckpt of an Aand run.")
    assert "weights_only" not in output
    assert "Traceback" not in output


def test_interrupted_checkpoint_is_not_exported(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anomalib export`` of a checkpoint saved before the final validation: refused, nothing written."""
    model = tiny_aand()
    interrupted = tmp_path / "model.ckpt"
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0}
    torch.save({**checkpoint, "pytorch-lightning_version": lightning.__version__, "global_step": 2}, interrupted)
    export = ("--export_type", "onnx", "--ckpt_path", str(interrupted), "--default_root_dir", "exported")
    status, _, last = anomalib_stops("export", *TINY, *export, cwd=tmp_path, capfd=capfd, monkeypatch=monkeypatch)
    assert status == 2
    assert last.startswith("error: This model has no thresholds")
    assert not list(tmp_path.rglob("*.onnx"))
