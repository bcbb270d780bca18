"""Reliability: clear errors on bad input, faults during training, resume, reproducibility, checkpoints.

Everything runs offline on generated data with a tiny resnet18 (random weights, 32 px images).
"""

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import lightning
import numpy as np
import pytest
import timm
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Padim
from conftest import make_mvtec_dataset, tiny_aand
from lightning.pytorch import Callback, seed_everything
from PIL import Image

from anomalib_aand import Aand
from anomalib_aand.components.data_checks import check_datamodule, check_dataset_folder
from anomalib_aand.components.errors import AandInputError
from anomalib_aand.components.synthesis import AnomalySynthesizer
from anomalib_aand.components.teacher import TeacherError, load_teacher_weights
from anomalib_aand.loss import DistillationLoss, NonFiniteLossGuard

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def datamodule(root: Path, category: str = "toy") -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=2, eval_batch_size=4, num_workers=0)


def engine(root: Path, **kwargs) -> Engine:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return Engine(default_root_dir=root, **settings, **kwargs)


def offline_env(**extra: str) -> dict[str, str]:
    """Environment for a fresh interpreter: offline, importing this checkout and the tests."""
    path = os.pathsep.join([str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    make_mvtec_dataset(root, n_train=4, n_good=2, n_bad=2, size=SIZE)
    return root


def seeded_run(root: Path, out: Path) -> Aand:
    """A 1+1-epoch run with seed 7, deterministic algorithms."""
    seed_everything(7, workers=True)
    model = tiny_aand()
    engine(out, deterministic=True).fit(model, datamodule=datamodule(root))
    return model


@pytest.fixture(scope="module")
def trained_checkpoint(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1+1-epoch run's model.ckpt."""
    out = tmp_path_factory.mktemp("trained")
    seeded_run(small_root, out)
    return next(out.rglob("model.ckpt"))


def copy_dataset(root: Path, target: Path) -> Path:
    shutil.copytree(root, target)
    return target / "toy"


# ------------------------------------------------------------------ settings refused at construction
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "resnet_nope"}, "Unknown backbone 'resnet_nope'"),
        ({"layers": ["layer1", "layer9"]}, r"has no layer\(s\) \['layer9'\]. Its feature layers are"),
        ({"backbone": "vit_tiny_patch16_224"}, "vision transformer"),
        ({"backbone": "mixer_s16_224", "layers": ["blocks.6", "blocks.7"]}, "do not form a pyramid"),
        ({"layers": ["layer2", "layer1"]}, "ordered from shallow to deep"),
        ({"stage1_epochs": -1}, "stage1_epochs must be an integer >= 0"),
        ({"stage2_epochs": 0}, "stage2_epochs must be an integer >= 1"),
        ({"stage2_epochs": -3}, "stage2_epochs must be an integer >= 1"),
        ({"num_keys": 0}, "num_keys must be an integer >= 1"),
        ({"map_sigma": 0}, r"map_sigma must be a number > 0 \(pixels; or a mapping"),
        ({"map_sigma": {"toy": 8, "default": -1}}, "map_sigma must be a number > 0"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_aand(**kwargs)


def test_non_square_size_is_accepted() -> None:
    model = tiny_aand(pre_processor=Aand.configure_pre_processor((32, 64))).eval()
    output = model.model(torch.rand(1, 3, 32, 64))
    assert output.anomaly_map.shape == (1, 1, 32, 64)


def test_input_size_rules_live_on_the_torch_model() -> None:
    model = tiny_aand().model
    assert model.stride == 32  # resnet18 layer3: reduction 16, halved once more by the student
    model.check_input_size((64, 32), top_k=2)
    with pytest.raises(ValueError, match=r"Image size 40x40 .* multiples of 32"):
        model.check_input_size((40, 40))
    with pytest.raises(ValueError, match="hkd_top_k=9 exceeds the 8 positions"):
        model.check_input_size((64, 32), top_k=9)
    with pytest.raises(ValueError, match=r"Image size 64x32 is too small for the anomaly map's blur, which reaches 32"):
        tiny_aand(map_sigma=8.0).model.check_input_size((64, 32))


def test_batch_of_unsuitable_size_is_refused(tmp_path: Path) -> None:
    """A pre-processor without Resize lets any size through: the first training batch is checked."""
    make_mvtec_dataset(tmp_path / "data", n_train=2, n_good=1, n_bad=1, size=40)
    with pytest.raises(ValueError, match=r"Image size 40x40 .* multiples of 32"):
        engine(tmp_path / "out").fit(tiny_aand(pre_processor=False), datamodule=datamodule(tmp_path / "data"))


def test_backbone_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    model = tiny_aand(backbone_weights=str(path))
    with pytest.raises(TeacherError, match=r"do not fit backbone 'resnet18'.*same architecture"):
        load_teacher_weights(model.model.teacher, "resnet18", path)
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher_weights(model.model.teacher, "resnet18", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(TeacherError, match="Cannot read backbone_weights"):
        load_teacher_weights(model.model.teacher, "resnet18", tmp_path / "junk.pth")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_anomaly_source_path_missing_or_empty(tmp_path: Path, small_root: Path, make: str) -> None:
    folder = tmp_path / "textures"
    if make == "empty":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images")
    message = "anomaly_source_path .*(not a folder|holds no images)"
    with pytest.raises(ValueError, match=message):
        AnomalySynthesizer(probability=0.8, anomaly_source_path=folder)
    model = tiny_aand(anomaly_source_path=str(folder))  # construction (and checkpoint loading) does not need it
    with pytest.raises(ValueError, match=message):  # the first stage-1 epoch does, before its first batch
        engine(tmp_path / "out").fit(model, datamodule=datamodule(small_root))


# --------------------------------------------------------------------------------- data checks
def test_missing_category_is_refused_before_download(small_root: Path, tmp_path: Path, monkeypatch) -> None:
    import anomalib.data.datamodules.image.mvtecad as mvtecad_module

    def no_download(*args, **kwargs) -> None:
        del args, kwargs
        pytest.fail("anomalib tried to download the dataset")

    monkeypatch.setattr(mvtecad_module, "download_and_extract", no_download)
    with pytest.raises(AandInputError, match=r"category 'tyo' is not under .* Categories found there: \['toy'\]"):
        engine(tmp_path).fit(tiny_aand(), datamodule=datamodule(small_root, "tyo"))
    with pytest.raises(AandInputError, match="itself does not exist"):
        check_dataset_folder(datamodule(tmp_path / "nowhere"))


def test_default_root_still_downloads_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        check_dataset_folder(MVTecAD(category="bottle"))
    assert "anomalib will now download MVTecAD" in caplog.text


def test_empty_training_folder(small_root: Path, tmp_path: Path) -> None:
    base = copy_dataset(small_root, tmp_path / "data")
    for image in (base / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(AandInputError, match=r"training split of MVTecAD .* holds no images"):
        engine(tmp_path / "out").fit(tiny_aand(), datamodule=datamodule(tmp_path / "data"))


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "16-bit"])
def test_unusable_images_are_named(small_root: Path, tmp_path: Path, fault: str) -> None:
    base = copy_dataset(small_root, tmp_path / "data")
    bad = base / "test" / "spot" / "001.png"  # a test image: would otherwise fail only after training
    if fault == "corrupt":
        bad.write_bytes(b"\x89PNG this is not an image")
        expected = "cannot be read"
    elif fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
        expected = "cannot be read"
    else:
        Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 60).astype(np.uint16)).save(bad)
        expected = "16-bit or float pixels.*Convert them to 8 bits"
    data = datamodule(tmp_path / "data")
    data.setup()
    with pytest.raises(AandInputError, match=f"(?s)1 of 8 train/val/test images of MVTecAD .*{expected}") as error:
        check_datamodule(data, "fit")
    assert str(bad) in str(error.value)


def test_grayscale_and_rgba_images_are_accepted(small_root: Path, tmp_path: Path, caplog) -> None:
    base = copy_dataset(small_root, tmp_path / "data")
    for i, path in enumerate(sorted((base / "train" / "good").iterdir())):
        image = Image.open(path)
        (image.convert("L") if i % 2 else image.convert("RGBA")).save(path)
    data = datamodule(tmp_path / "data")
    data.setup()
    with caplog.at_level(logging.WARNING):
        check_datamodule(data, "fit")
    assert "2 of 8 train/val/test images of MVTecAD" in caplog.text
    assert "alpha channel" in caplog.text
    batch = next(iter(data.train_dataloader()))
    assert batch.image.shape[1] == 3


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.slow
def test_checkpoint_loads_offline_in_fresh_process(trained_checkpoint: Path) -> None:
    """``weights_only=True`` load through ``Aand.load_from_checkpoint``, no network, new interpreter."""
    script = textwrap.dedent(f"""
        import torch
        from anomalib_aand import Aand
        torch.load({str(trained_checkpoint)!r}, weights_only=True, map_location="cpu")
        model = Aand.load_from_checkpoint({str(trained_checkpoint)!r}, map_location="cpu").eval()
        assert bool(model.teacher_initialised)
        scores = model(torch.rand(2, 3, 32, 32)).pred_score
        assert torch.isfinite(scores).all()
        print("LOADED", model.hparams.backbone)
    """)
    env = offline_env(HTTPS_PROXY="http://0.0.0.0:9", HTTP_PROXY="http://0.0.0.0:9", NO_PROXY="")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED resnet18" in result.stdout


@pytest.mark.slow
def test_truncated_checkpoint(trained_checkpoint: Path, tmp_path: Path, small_root: Path) -> None:
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(trained_checkpoint.read_bytes()[: trained_checkpoint.stat().st_size // 2])
    with pytest.raises(AandInputError, match=r"is damaged .* cut short"):
        Aand.load_from_checkpoint(truncated)
    # through the Trainer (``--ckpt_path``) too, before testing starts
    with pytest.raises(AandInputError, match=r"is damaged .* cut short"):
        engine(tmp_path / "out").test(tiny_aand(), datamodule=datamodule(small_root), ckpt_path=truncated)
    with pytest.raises(AandInputError, match="does not exist"):
        Aand.load_from_checkpoint(tmp_path / "none.ckpt")


@pytest.mark.slow
def test_checkpoint_of_another_backbone(trained_checkpoint: Path, tmp_path: Path, small_root: Path) -> None:
    checkpoint = trained_checkpoint
    with pytest.raises(AandInputError, match="backbone: checkpoint 'resnet18', this model 'resnet34'"):
        engine(tmp_path).test(tiny_aand(backbone="resnet34"), datamodule=datamodule(small_root), ckpt_path=checkpoint)


@pytest.mark.slow
def test_checkpoint_of_another_model(tmp_path: Path, small_root: Path) -> None:
    padim, other = tmp_path / "padim.ckpt", Padim(backbone="resnet18", pre_trained=False)
    torch.save(
        {
            "state_dict": other.state_dict(),
            "hyper_parameters": {"backbone": "resnet18", "layers": ["layer1", "layer2"]},
            "pytorch-lightning_version": lightning.__version__,
        },
        padim,
    )
    with pytest.raises(AandInputError, match="not saved by Aand"):
        Aand.load_from_checkpoint(padim)
    with pytest.raises(AandInputError, match="not saved by Aand"):
        engine(tmp_path).test(tiny_aand(), datamodule=datamodule(small_root), ckpt_path=padim)


# --------------------------------------------------------------------------- faults in training
def _speck(size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., 10, 10] = 1.0  # one pixel: gone after pooling to any feature scale
    return mask


@pytest.mark.parametrize(
    ("mask", "foreground"),
    [
        (torch.zeros(1, 1, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)),  # no synthetic anomaly in the batch
        (torch.ones(1, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE)),  # empty foreground
        (_speck(), torch.ones(1, 1, SIZE, SIZE)),  # anomaly vanishes at the coarsest scale
        (torch.ones(1, 1, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)),  # anomaly everywhere: no normal position
    ],
)
def test_stage1_degenerate_masks_give_finite_losses(mask: torch.Tensor, foreground: torch.Tensor) -> None:
    model = tiny_aand()
    mask, foreground = mask.expand(2, -1, -1, -1), foreground.expand(2, -1, -1, -1)
    features = model.model.extract(torch.randn(2, 3, SIZE, SIZE))
    amplified, gates = model.model.amplify(features, mask)
    losses = model.amplification_loss(features, amplified, gates, mask, foreground)
    assert set(losses) == {"loss", "focal", "amplification"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    grads = [p.grad for p in model.model.raa.parameters() if p.grad is not None]
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)


class PoisonedDistillationLoss(DistillationLoss):
    def forward(self, targets, students) -> torch.Tensor:
        return super().forward(targets, students) * float("nan")


def test_non_finite_loss_names_the_term() -> None:
    finite = torch.tensor(1.0)
    losses = {"loss": torch.tensor(float("nan")), "focal": finite, "amplification": torch.tensor(float("inf"))}
    guard = NonFiniteLossGuard()
    assert guard.record({"loss": finite, "focal": finite}, stage=1, epoch=3, step=6)  # CPU: every step is checked
    guard.check(learning_rate=0.005)
    guard.record(losses, stage=1, epoch=3, step=7)
    with pytest.raises(FloatingPointError, match=r"stage 1: the loss term\(s\) \['amplification'\] .* epoch 3"):
        guard.check(learning_rate=0.005)


@pytest.mark.slow
def test_non_finite_loss_stops_training_with_a_message(small_root: Path, tmp_path: Path) -> None:
    model = tiny_aand(stage1_epochs=1, stage2_epochs=1)
    model.distillation_loss = PoisonedDistillationLoss("hkd", top_k=2)
    with pytest.raises(
        FloatingPointError, match=r"stage 2: the loss term\(s\) \['loss'\] became non-finite at epoch 1"
    ):
        engine(tmp_path).fit(model, datamodule=datamodule(small_root))
    checkpoint = torch.load(next(tmp_path.rglob("model.ckpt")), weights_only=False, map_location="cpu")
    assert checkpoint["epoch"] == 0  # the last finished epoch (stage 1) is kept
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.") and v.is_floating_point()}
    assert weights
    assert all(torch.isfinite(v).all() for v in weights.values())


# ------------------------------------------------------------------------ interruption and resume
DRIVER = textwrap.dedent("""
    import os, signal, sys, warnings
    warnings.filterwarnings("ignore")
    from test_reliability import Interrupt, resumable_run
    root, out, record = sys.argv[1:4]
    resumable_run(root, out, None, Interrupt(1, lambda: os.kill(os.getpid(), signal.SIGKILL)), record)
""")


class Interrupt(Callback):
    """Records each finished epoch (stage, learning rate); interrupts on the 2nd batch of ``epoch``."""

    def __init__(self, epoch: int, action: Callable[[], None], record: Path | str | None = None) -> None:
        self.epoch, self.action, self.record = epoch, action, record

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        del module, batch
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            self.action()

    def on_train_epoch_end(self, trainer, module) -> None:
        learning_rate = trainer.optimizers[module.stage - 1].param_groups[0]["lr"]
        with Path(self.record).open("a") as file:
            file.write(f"{trainer.current_epoch} {module.stage} {learning_rate:.6f}\n")


def resumable_run(
    root: str | Path,
    out: str | Path,
    checkpoint: str | Path | None,
    interrupt: Interrupt,
    record: str | Path,
    method: str = "fit",
) -> tuple[Aand, Path]:
    """2 + 2 epochs of a tiny AAND, optionally resumed from ``checkpoint``; returns the model and its model.ckpt."""
    interrupt.record = record
    seed_everything(0)
    model = tiny_aand(stage1_epochs=2, stage2_epochs=2)
    run = engine(Path(out), callbacks=[interrupt])
    with contextlib.suppress(SimulatedCrashError):
        getattr(run, method)(model, datamodule=datamodule(Path(root)), ckpt_path=checkpoint)
    return model, next(Path(out).rglob("model.ckpt"))


class SimulatedCrashError(RuntimeError):
    """Stands for a crash inside this test process."""


def _crash() -> None:
    raise SimulatedCrashError


@pytest.mark.slow
def test_kill_and_resume_in_both_stages(small_root: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL) in stage 1, resumed and crashed in stage 2, resumed again: 2 + 2 epochs, schedules intact."""
    record = tmp_path / "epochs.txt"
    (tmp_path / "driver.py").write_text(DRIVER)
    env = offline_env()
    args = [sys.executable, str(tmp_path / "driver.py"), str(small_root), str(tmp_path / "run0"), str(record)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == -9, result.stderr[-3000:]
    checkpoint = next((tmp_path / "run0").rglob("model.ckpt"))
    _, checkpoint = resumable_run(small_root, tmp_path / "run1", checkpoint, Interrupt(3, _crash), record)
    # `anomalib train --ckpt_path`: resume, then test (anomalib passes the same ckpt_path to the test)
    model, checkpoint = resumable_run(small_root, tmp_path / "run2", checkpoint, Interrupt(-1, _crash), record, "train")
    rows = [line.split() for line in record.read_text().splitlines()]
    # every epoch finished exactly once, in its stage; the learning rate follows each stage's own schedule
    assert [(int(e), int(s)) for e, s, _ in rows] == [(0, 1), (1, 1), (2, 2), (3, 2)]
    assert [float(lr) for *_, lr in rows] == [0.005, 0.001, 0.005, 0.001]
    final = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert final["epoch"] == 3
    assert model.synthesizer is None  # resumed in stage 2: stage-1 synthesis (and its textures) not needed
    assert torch.isfinite(final["state_dict"]["post_processor._image_threshold"]).all()
    # what was tested is the finished model, not the interrupted checkpoint it resumed from
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, final["state_dict"][key], rtol=0, atol=0, equal_nan=True, msg=key)


# ------------------------------------------------------------------------------ reproducibility
@pytest.mark.slow
def test_same_seed_gives_same_model_and_scores(trained_checkpoint: Path, small_root: Path, tmp_path: Path) -> None:
    """A second run with the same seed ends with identical weights, thresholds and test scores."""
    first = Aand.load_from_checkpoint(trained_checkpoint, map_location="cpu").eval()
    second = seeded_run(small_root, tmp_path).eval()
    assert first.state_dict().keys() == second.state_dict().keys()
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key], rtol=0, atol=0, msg=key)
    data = datamodule(small_root)
    data.setup()
    images = next(iter(data.test_dataloader())).image
    with torch.no_grad():
        torch.testing.assert_close(first(images).pred_score, second(images).pred_score, rtol=0, atol=0)
