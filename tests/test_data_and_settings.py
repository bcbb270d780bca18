"""Dataset and settings checks that close silent failures: masks, hyper-parameter ranges, the non-finite-loss
message, non-ASCII dataset paths. Offline, generated data, a tiny resnet18 with random weights at 32 px."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.engine import Engine
from conftest import make_mvtec_dataset, tiny_aand
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from anomalib_aand.components.errors import AandInputError
from anomalib_aand.loss import NonFiniteLossGuard

SIZE = 32


def engine(root: Path, **kwargs: object) -> Engine:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return Engine(default_root_dir=root, **settings, **kwargs)


def mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="toy", train_batch_size=2, eval_batch_size=4, num_workers=0)


def folder(base: Path) -> Folder:
    return Folder(
        name="toy",
        root=base,
        normal_dir="train/good",
        abnormal_dir="test/spot",
        normal_test_dir="test/good",
        mask_dir="ground_truth/spot",
        train_batch_size=2,
        eval_batch_size=4,
        num_workers=0,
    )


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    make_mvtec_dataset(root, n_train=4, n_good=2, n_bad=3, size=SIZE)
    return root


@pytest.fixture
def data(small_root: Path, tmp_path: Path) -> Path:
    """A fresh copy of the small dataset: returns ``<root>/toy``."""
    shutil.copytree(small_root, tmp_path / "data")
    return tmp_path / "data" / "toy"


DATAMODULES = {"MVTecAD": lambda base: mvtec(base.parent), "Folder": folder}


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("kind", DATAMODULES)
def test_missing_mask_is_named(data: Path, tmp_path: Path, kind: str) -> None:
    """anomalib's own error: 'Must have equal len keys ...' (MVTecAD), 'NumPy boolean array indexing ...' (Folder)."""
    (data / "ground_truth" / "spot" / "001_mask.png").unlink()
    with pytest.raises(
        AandInputError, match=r"(?s)3 defective test images but 2 masks.*1 defective test image\(s\) have no mask"
    ) as error:
        engine(tmp_path / "out").fit(tiny_aand(), datamodule=DATAMODULES[kind](data))
    assert str(data / "test" / "spot" / "001.png") in str(error.value)


@pytest.mark.parametrize("kind", DATAMODULES)
def test_mask_without_image_is_named(data: Path, tmp_path: Path, kind: str) -> None:
    (data / "test" / "spot" / "002.png").unlink()
    with pytest.raises(AandInputError, match=r"1 mask\(s\) belong to no defective test image") as error:
        engine(tmp_path / "out").fit(tiny_aand(), datamodule=DATAMODULES[kind](data))
    assert str(data / "ground_truth" / "spot" / "002_mask.png") in str(error.value)


@pytest.mark.parametrize("kind", DATAMODULES)
def test_mask_of_another_size_is_refused(data: Path, tmp_path: Path, kind: str) -> None:
    """anomalib stretched it silently (Folder) or failed later; pixel AUROC/AUPRO came out wrong."""
    mask = data / "ground_truth" / "spot" / "000_mask.png"
    Image.open(mask).resize((SIZE // 2, SIZE // 2), Image.NEAREST).save(mask)
    with pytest.raises(AandInputError, match="do not have the size of their image") as error:
        engine(tmp_path / "out").fit(tiny_aand(), datamodule=DATAMODULES[kind](data))
    assert f"{data / 'test' / 'spot' / '000.png'} is 32x32, its mask {mask} is 16x16" in str(error.value)


# --------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("gate_temperature", 0.0, r"a number > 0 \(the paper uses 0.2\)"),
        ("gate_temperature", -0.2, r"a number > 0 \(the paper uses 0.2\)"),
        ("focal_alpha", -0.1, r"a number in \[0, 1\] \(the paper uses 0.8\)"),
        ("focal_alpha", 1.5, r"a number in \[0, 1\] \(the paper uses 0.8\)"),
        ("focal_gamma", -1.0, r"a number >= 0 \(the paper uses 2.0\)"),
        ("amplification_margin", -0.3, r"a number >= 0 \(the paper uses 0.3\)"),
        ("amplification_weight", -0.1, r"a number >= 0 \(the paper uses 0.1\)"),
        ("amplification_weight", float("nan"), r"a number >= 0 \(the paper uses 0.1\)"),
        ("anomaly_probability", 1.2, r"a number in \[0, 1\] \(the paper uses 0.8\)"),
    ],
)
def test_hyperparameter_out_of_range_is_refused(name: str, value: float, expected: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be {expected}, got {value!r}"):
        tiny_aand(**{name: value})


def test_anomaly_probability_zero_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tiny_aand(anomaly_probability=0.0)
    assert "anomaly_probability=0" in caplog.text
    assert "learn nothing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny_aand(anomaly_probability=0.0, stage1_epochs=0)
    assert "anomaly_probability" not in caplog.text


def test_unused_texture_folder_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tiny_aand(stage1_epochs=0, anomaly_source_path=str(tmp_path))
    assert f"anomaly_source_path '{tmp_path}' is not used: stage1_epochs=0" in caplog.text


class PoisonWeights(Callback):
    """Turns the weights of the stage that trains at ``epoch`` into NaN, so that its loss becomes NaN."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, batch: object, batch_idx: int) -> None:
        del batch, batch_idx
        if trainer.current_epoch == self.epoch:
            part = module.model.raa if self.epoch < module.stage1_epochs else module.model.decoder
            with torch.no_grad():
                for parameter in part.parameters():
                    parameter.fill_(float("nan"))


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [0, 1])
def test_non_finite_loss_names_a_checkpoint_only_when_one_exists(small_root: Path, tmp_path: Path, epoch: int) -> None:
    """In the first epoch no checkpoint exists yet: the message must not say one is intact."""
    with pytest.raises(FloatingPointError) as error:
        engine(tmp_path, callbacks=[PoisonWeights(epoch)]).fit(tiny_aand(), datamodule=mvtec(small_root))
    saved = list(tmp_path.rglob("*.ckpt"))
    if epoch == 0:
        assert not saved
        assert "no checkpoint has been saved yet" in str(error.value)
        assert "intact" not in str(error.value)
    else:
        assert len(saved) == 1
        assert f"the last saved checkpoint ({saved[0]}) is intact" in str(error.value)


def test_non_finite_loss_message_checks_the_file(tmp_path: Path) -> None:
    losses = {"loss": torch.tensor(float("nan")), "focal": torch.tensor(float("inf"))}
    guard = NonFiniteLossGuard()
    guard.record(losses, stage=1, epoch=0, step=3)
    with pytest.raises(FloatingPointError, match="no checkpoint has been saved yet"):
        guard.check(0.005, [str(tmp_path / "gone.ckpt")])
    (tmp_path / "model.ckpt").write_bytes(b"x")
    guard.record(losses, stage=1, epoch=0, step=3)
    with pytest.raises(FloatingPointError, match=r"\['focal'\] became non-finite.*model.ckpt\) is intact"):
        guard.check(0.005, [str(tmp_path / "model.ckpt")])


def test_non_finite_loss_guard_reads_the_first_bad_step_of_a_window() -> None:
    """On an accelerator the guard reads the device every ``interval`` steps; it still names the first bad step."""
    guard = NonFiniteLossGuard(interval=3)
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    guard.record({"loss": finite}, stage=2, epoch=4, step=10)
    guard.record({"loss": nan}, stage=2, epoch=4, step=11)
    guard.record({"loss": nan * 2}, stage=2, epoch=4, step=12)
    with pytest.raises(
        FloatingPointError, match=r"stage 2: the loss term\(s\) \['loss'\] .* epoch 4, optimiser step 11"
    ):
        guard.check(0.005)
    guard.record({"loss": finite}, stage=2, epoch=4, step=13)
    guard.check(0.005)  # a new window: nothing to report


# ------------------------------------------------------------------------------ non-ASCII paths
@pytest.mark.slow
@pytest.mark.parametrize("kind", DATAMODULES)
def test_non_ascii_dataset_path_trains(small_root: Path, tmp_path: Path, kind: str) -> None:
    """anomalib 2.7 refused any non-ASCII letter as 'Path contains non-printable characters'."""
    base = tmp_path / "données_Prüfung_検査"
    shutil.copytree(small_root, base)
    model = tiny_aand()
    engine(tmp_path / "résultats").fit(model, datamodule=DATAMODULES[kind](base / "toy"))
    assert list((tmp_path / "résultats").rglob("model.ckpt"))


def test_control_characters_in_paths_are_still_refused(small_root: Path, tmp_path: Path) -> None:
    base = tmp_path / "bad\nname"
    shutil.copytree(small_root, base)
    with pytest.raises(ValueError, match="non-printable characters"):
        mvtec(base).setup()
