"""Data that trains and tests without an error yet gives wrong results: masks and images deeper than 8 bits.

anomalib counts every non-zero mask pixel as defective, so masks saved as JPEG (grey levels on every edge) or
inverted masks give wrong pixel metrics silently: they are named in a warning. Images with 16-bit, 12-bit or float
pixels are clipped by anomalib's reader; training refuses them, and so does ``anomalib predict`` now. No training.
"""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import Folder, MVTecAD
from anomalib.engine import Engine
from conftest import make_mvtec_dataset, tiny_aand
from PIL import Image

from anomalib_aand.components.data_checks import check_datamodule
from anomalib_aand.components.errors import AandInputError

SIZE = 32


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    make_mvtec_dataset(tmp_path / "data", n_train=4, n_good=2, n_bad=4, size=SIZE)
    return tmp_path / "data"


def masks_of(root: Path) -> list[Path]:
    return sorted((root / "toy" / "ground_truth" / "spot").glob("*.png"))


def as_jpeg(path: Path, target: Path | None = None) -> None:
    """The mask compressed as JPEG, written to ``target`` (default: over itself, in PNG, as after a conversion)."""
    buffer = io.BytesIO()
    Image.open(path).save(buffer, "JPEG", quality=75)
    Image.open(buffer).save(target or path, "PNG" if target is None else "JPEG")


def checked(datamodule: MVTecAD | Folder, caplog: pytest.LogCaptureFixture) -> str:
    datamodule.setup()
    with caplog.at_level(logging.WARNING):
        check_datamodule(datamodule, "fit")
    return caplog.text


def mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="toy", num_workers=0)


def test_jpeg_masks_are_named(data_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = masks_of(data_root)[:2]
    for path in bad:
        as_jpeg(path)
    text = checked(mvtec(data_root), caplog)
    assert "2 masks of MVTecAD" in text
    assert "are not binary" in text
    assert all(str(path) in text for path in bad)


def test_inverted_masks_are_named(data_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = masks_of(data_root)[1]
    Image.fromarray(255 - np.asarray(Image.open(bad))).save(bad)
    text = checked(mvtec(data_root), caplog)
    assert "1 masks of MVTecAD" in text
    assert "are they inverted?" in text
    assert f"{bad} (94% marked)" in text


def test_jpeg_masks_of_a_folder_dataset_are_named(data_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = data_root / "toy"
    (base / "masks").mkdir()
    for path in masks_of(data_root):
        as_jpeg(path, base / "masks" / f"{path.stem.removesuffix('_mask')}.jpg")
    folder = Folder(
        name="toy",
        root=base,
        normal_dir="train/good",
        abnormal_dir="test/spot",
        normal_test_dir="test/good",
        mask_dir="masks",
        num_workers=0,
    )
    text = checked(folder, caplog)
    assert "4 masks of Folder" in text
    assert "are not binary" in text


@pytest.mark.parametrize("encoding", ["0/255", "0/1", "RGB"])
def test_binary_masks_give_no_warning(data_root: Path, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    for path in masks_of(data_root):
        pixels = np.asarray(Image.open(path))
        if encoding == "0/1":
            Image.fromarray((pixels > 0).astype(np.uint8)).save(path)
        elif encoding == "RGB":
            Image.fromarray(pixels).convert("RGB").save(path)
    assert "masks of MVTecAD" not in checked(mvtec(data_root), caplog)


@pytest.mark.parametrize(
    ("pixels", "mode"),
    [
        ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 60).astype(np.uint16), None),  # 16 bits
        ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 4).astype(np.uint16), None),  # 12 bits stored in 16
        (np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE), "F"),  # float TIFF
    ],
)
def test_predict_refuses_images_deeper_than_8_bits(tmp_path: Path, pixels: np.ndarray, mode: str | None) -> None:
    """``anomalib predict --data_path``: such an image used to be scored as white (score 0, "normal")."""
    folder = tmp_path / "line"
    folder.mkdir()
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(folder / "fine.png")
    deep = folder / ("deep.tif" if mode == "F" else "deep.png")
    Image.fromarray(pixels, mode=mode).save(deep)
    engine = Engine(default_root_dir=tmp_path / "out", accelerator="cpu", devices=1, logger=False)
    with pytest.raises(AandInputError, match=r"1 images to predict have 16-bit, 12-bit or float pixels") as error:
        engine.predict(tiny_aand(), data_path=folder)
    assert str(deep) in str(error.value)
