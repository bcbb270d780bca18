"""Checkpoints that must not be lost, files that are not Aand checkpoints, and models that are not finished.

Most tests need no training: a checkpoint is written with ``torch.save`` from an untrained tiny model, as
Lightning would write it. The tests that train (a learning rate that blows up, a full disk, training a finished
run longer) are in the slow tier.
"""

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from anomalib.metrics import AUROC, Evaluator
from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
from conftest import make_mvtec_dataset, tiny_aand
from torch import nn

from anomalib_aand import Aand
from anomalib_aand.components.errors import AandInputError

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_mvtec_dataset(root, n_train=4, n_good=2, n_bad=2, size=SIZE)
    return root


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="toy", train_batch_size=2, eval_batch_size=4, num_workers=0)


def engine(root: Path, **kwargs) -> Engine:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return Engine(default_root_dir=root, **{**settings, **kwargs})


def written_checkpoint(path: Path, model: Aand, *, finished: bool = True, epoch: int = 1, **extra: object) -> Path:
    """``model`` saved as a Lightning checkpoint; ``finished``: with thresholds, as validation leaves them."""
    if finished:
        for name, value in (("_image_threshold", 0.5), ("_pixel_threshold", 0.5)):
            getattr(model.post_processor, name).fill_(value)
        for name, value in (("image_min", 0.0), ("pixel_min", 0.0), ("image_max", 1.0), ("pixel_max", 1.0)):
            getattr(model.post_processor, name).fill_(value)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": epoch,
        "global_step": 4 * (epoch + 1),
        **extra,
    }
    torch.save(checkpoint, path)
    return path


# ----------------------------------------------------------------------------------- files of another kind
def reverse_distillation_checkpoint(path: Path) -> Path:
    """What a ReverseDistillation checkpoint holds that Aand's never does: anomalib's own enum in its settings."""
    torch.save(
        {
            "state_dict": {"model.encoder.conv1.weight": torch.zeros(1)},
            "hyper_parameters": {"backbone": "resnet18", "anomaly_map_mode": AnomalyMapGenerationMode.ADD},
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


def onnx_file(path: Path) -> Path:
    """The first bytes of an ONNX export (protobuf: ir_version, then producer "pytorch")."""
    path.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.14" + bytes(200))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (reverse_distillation_checkpoint, r"not a checkpoint of Aand \(a checkpoint of anomalib's reverse_distill"),
        (onnx_file, "is an ONNX model \\(an export\\), not a Lightning checkpoint of Aand"),
    ],
)
def test_foreign_file_as_ckpt_path_says_what_it_is_not(tmp_path: Path, data_root: Path, make, message: str) -> None:
    """Through the Trainer (``--ckpt_path``) and ``load_from_checkpoint``: never torch's advice to unpickle it."""
    path = make(tmp_path / ("other.onnx" if make is onnx_file else "rd.ckpt"))
    for load in (
        lambda: engine(tmp_path / "out").test(tiny_aand(), datamodule=datamodule(data_root), ckpt_path=path),
        lambda: Aand.load_from_checkpoint(path),
    ):
        with pytest.raises(AandInputError, match=message) as error:
            load()
        assert "weights_only" not in str(error.value)
        assert error.value.__suppress_context__ or error.value.__context__ is None


# ------------------------------------------------------------------------------------ evaluators
@pytest.mark.parametrize(
    ("saved_with", "loaded_with"),
    [
        (True, False),  # default evaluator (with AUPRO) -> none
        (True, "own"),  # default -> the user's own
        (False, True),  # none -> default
    ],
)
def test_evaluator_does_not_decide_whether_weights_load(tmp_path: Path, saved_with, loaded_with) -> None:
    own = Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    saved = tiny_aand(evaluator=saved_with)
    path = written_checkpoint(tmp_path / "model.ckpt", saved)
    loaded = Aand.load_from_checkpoint(path, evaluator=own if loaded_with == "own" else loaded_with)
    for key, value in saved.state_dict().items():
        if key.startswith("model."):
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------- unfinished models
def test_interrupted_checkpoint_is_refused_for_test_and_predict(tmp_path: Path, data_root: Path) -> None:
    """Saved after epoch 1 of 2 (thresholds NaN): it would test plausibly and call every image anomalous."""
    path = written_checkpoint(tmp_path / "model.ckpt", tiny_aand(), finished=False, epoch=0)
    for method in ("test", "predict"):
        run = getattr(engine(tmp_path / method), method)
        with pytest.raises(AandInputError, match=r"interrupted run \(saved after epoch 1 of 2\).*--ckpt_path"):
            run(tiny_aand(), datamodule=datamodule(data_root), ckpt_path=path)


def test_finished_checkpoint_still_tests(tmp_path: Path, data_root: Path) -> None:
    path = written_checkpoint(tmp_path / "model.ckpt", tiny_aand())
    results = engine(tmp_path / "out").test(tiny_aand(), datamodule=datamodule(data_root), ckpt_path=path)
    assert "image_AUROC" in results[0]


@pytest.mark.parametrize("export", ["to_torch", "to_onnx", "to_openvino"])
def test_model_without_thresholds_is_not_exported(tmp_path: Path, export: str) -> None:
    with pytest.raises(AandInputError, match=r"no thresholds.*Finish the run first"):
        getattr(tiny_aand(), export)(tmp_path)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_int8_without_calibration_data_fails_before_writing(tmp_path: Path) -> None:
    """anomalib's phrase, what to pass, and nothing written (it used to export FP32 first)."""
    model = tiny_aand()
    with pytest.raises(ValueError, match=r"Datamodule must be provided.*--data"):
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_PTQ)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


# ---------------------------------------------------------------------------- resume and blow-up
@pytest.mark.parametrize(
    ("saved", "epoch", "new", "refused"),
    [
        (2, 3, 2, False),  # same schedule
        (2, 3, 5, True),  # stage 2 already trained would become stage 1
        (2, 3, 1, True),  # epoch 1 (stage 1) would have been stage 2
        (4, 1, 3, False),  # still in stage 1, and epochs 0-1 stay stage 1
    ],
)
def test_stage1_epochs_can_change_only_where_no_trained_epoch_changes_stage(saved, epoch, new, refused) -> None:
    from anomalib_aand.components.checkpoints import check_resumable

    checkpoint = {"hyper_parameters": {"stage1_epochs": saved}, "epoch": epoch}
    if refused:
        with pytest.raises(AandInputError, match=f"cannot resume with stage1_epochs={new}"):
            check_resumable(checkpoint, new)
    else:
        check_resumable(checkpoint, new)


def test_non_finite_weights_stop_training_before_they_are_saved() -> None:
    from anomalib_aand.components.checkpoints import check_finite_state

    module = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    check_finite_state(module, stage=2, epoch=1, learning_rate=0.005)
    module[1].running_var.fill_(math.inf)
    with pytest.raises(FloatingPointError, match=r"stage 2: 1 trained tensor\(s\) .* \['1.running_var'\]"):
        check_finite_state(module, stage=2, epoch=1, learning_rate=1e8)


@pytest.mark.slow
def test_learning_rate_that_blows_up_batchnorm_is_stopped(tmp_path: Path, data_root: Path) -> None:
    """lr 1e8: the loss (cosine) stays finite, the student's BatchNorm statistics overflow."""
    with pytest.raises(FloatingPointError, match=r"became NaN or infinite .*learning rate \(now 100000000.0\)"):
        engine(tmp_path).fit(tiny_aand(learning_rate=1e8), datamodule=datamodule(data_root))
    for path in tmp_path.rglob("model.ckpt"):
        state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
        weights = [v for k, v in state.items() if k.startswith("model.") and v.is_floating_point()]
        assert all(torch.isfinite(v).all() for v in weights)


@pytest.mark.slow
def test_resuming_a_finished_run_to_train_longer_tests_the_new_model(tmp_path: Path, data_root: Path) -> None:
    """``anomalib train --ckpt_path final.ckpt --model.init_args.stage2_epochs 3`` (Engine.train is what it runs)."""
    lightning.seed_everything(0)
    first = engine(tmp_path / "first")
    first.fit(tiny_aand(), datamodule=datamodule(data_root))
    final = Path(first.trainer.checkpoint_callback.best_model_path)
    longer = engine(tmp_path / "longer")
    printed = longer.train(tiny_aand(stage2_epochs=3), datamodule=datamodule(data_root), ckpt_path=final)
    new = Path(longer.trainer.checkpoint_callback.best_model_path)
    assert torch.load(new, weights_only=True, map_location="cpu")["epoch"] == 3
    again = engine(tmp_path / "again").test(tiny_aand(stage2_epochs=3), datamodule=datamodule(data_root), ckpt_path=new)
    assert printed == again
    with pytest.raises(AandInputError, match="cannot resume with stage1_epochs=2"):
        engine(tmp_path / "changed").fit(tiny_aand(stage1_epochs=2), datamodule=datamodule(data_root), ckpt_path=new)


DISK_FULL_DRIVER = textwrap.dedent("""
    import os, sys, warnings
    warnings.filterwarnings("ignore")
    from pathlib import Path
    from lightning.pytorch import Callback
    from test_checkpoint_safety import datamodule, engine
    from conftest import tiny_aand

    root, out, filler = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    class FillDisk(Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 1:  # after epoch 0's checkpoint: others fill the disk but int(argv[4]) bytes
                disk = os.statvfs(filler.parent)
                descriptor = os.open(filler, os.O_CREAT | os.O_WRONLY)
                os.posix_fallocate(descriptor, 0, disk.f_bavail * disk.f_frsize - int(sys.argv[4]))
                os.close(descriptor)

    engine(out, callbacks=[FillDisk()]).fit(tiny_aand(stage1_epochs=1, stage2_epochs=1), datamodule=datamodule(root))
""")


UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]


def _can_mount_tmpfs(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, f"mount -t tmpfs -o size=1m x {folder}"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, data_root: Path) -> None:
    """A real small filesystem (tmpfs in a user namespace) that others fill after the first save; $TMPDIR elsewhere.

    The stage-2 checkpoint is larger than stage 1's (Adam's state of the student), so it cannot fit.
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    (tmp_path / "driver.py").write_text(DISK_FULL_DRIVER)
    out, filler = disk / "results", disk / "other-files"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)]),
        "TMPDIR": str(tmp_path),  # another filesystem than the results, as a tmpfs /tmp is for a data disk
    }
    load = "import sys, torch; print('EPOCH', torch.load(sys.argv[1], weights_only=True)['epoch'])"
    script = (
        f"mount -t tmpfs -o size=256m aand-disk {disk} && "
        f"{sys.executable} {tmp_path / 'driver.py'} {data_root} {out} {filler} {1 << 20}; "
        f"echo EXIT $?; ls -l {out}/*/*/*/*/weights/lightning || true; "
        f'{sys.executable} -c "{load}" {out}/Aand/MVTecAD/toy/v0/weights/lightning/model.ckpt'
    )
    result = subprocess.run([*UNSHARE, script], capture_output=True, text=True, env=env, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert "EXIT 1" in output, output[-4000:]
    assert "Cannot save checkpoint" in output, output[-4000:]
    assert "is kept as it was" in output, output[-4000:]
    assert "EPOCH 0" in output, output[-4000:]  # the stage-1 checkpoint loads: nothing was lost
    assert not np.any([".partial" in line for line in output.splitlines() if line.startswith("-")])
