"""Shared fixtures: a tiny MVTec-layout dataset generated on the fly, and one small model exported from it."""

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from anomalib_aand import Aand

EXPORT_SIZE = 64
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, so that the long ones start early and the quick files fill the end of the run.

    ``scripts/test.sh`` hands whole files to the pytest-xdist workers in this order (``--no-loadscope-reorder``);
    xdist's own order (most tests first) would start a one-test, 90-second file last.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.25 * np.sin(2 * np.pi * 6 * x + phase) * np.cos(2 * np.pi * 4 * y)
    image = base[..., None] * np.array([0.9, 0.7, 0.5]) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_mvtec_dataset(
    root: Path, category: str = "toy", n_train: int = 8, n_good: int = 4, n_bad: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/category`` in MVTec AD layout; defects are dark squares with their masks."""
    rng = np.random.default_rng(seed)
    base = root / category
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng, size)).save(base / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(_texture(rng, size)).save(base / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        image, mask = _texture(rng, size), np.zeros((size, size), np.uint8)
        top, left, side = *rng.integers(4, size // 2, 2), size // 4
        image[top : top + side, left : left + side] = (20, 20, 20)
        mask[top : top + side, left : left + side] = 255
        Image.fromarray(image).save(base / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/spot" / f"{i:03d}_mask.png")
    return base


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset ``<root>/toy``."""
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec_dataset(root)
    return root


@pytest.fixture(scope="session")
def exported(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple["Aand", Path]:
    """Torch model loaded from the checkpoint, and the ONNX file ``Engine.export`` wrote from it.

    A random ResNet-18 teacher, 64 px (Resize in the pre-processor), one epoch per stage: trained and
    exported once per session, shared by the export and inference-tool tests.
    """
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib.pre_processing import PreProcessor
    from lightning import seed_everything
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_aand import Aand

    root = tmp_path_factory.mktemp("export")
    seed_everything(0)
    datamodule = MVTecAD(root=mvtec_root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    pre_processor = PreProcessor(transform=Compose([Resize((EXPORT_SIZE, EXPORT_SIZE)), Normalize(*IMAGENET)]))
    model = Aand(backbone="resnet18", pre_trained=False, stage1_epochs=1, stage2_epochs=1, pre_processor=pre_processor)
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    onnx_path = engine.export(Aand(backbone="resnet18"), ExportType.ONNX, export_root=root, ckpt_path=checkpoint)
    return Aand.load_from_checkpoint(checkpoint, map_location="cpu").eval(), Path(onnx_path)


@pytest.fixture(scope="session")
def lite0_trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small AAND on the offline ImageNet EfficientNet-Lite0 teacher, trained once per session.

    ``lite0_aand()`` (64 px, 1 + 5 epochs) on 16 training images, 8 good and 8 defective test images (dark
    squares). Returns ``root`` (the dataset root), ``engine``, ``model``, ``datamodule`` and ``checkpoint``;
    shared by the Engine and INT8 tests.
    """
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning import seed_everything

    root = tmp_path_factory.mktemp("lite0")
    make_mvtec_dataset(root, n_train=16, n_good=8, n_bad=8)
    seed_everything(0)
    datamodule = MVTecAD(root=root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    model = lite0_aand()
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    return {
        "root": root,
        "engine": engine,
        "model": model,
        "datamodule": datamodule,
        "checkpoint": engine.trainer.checkpoint_callback.best_model_path,
    }


@pytest.fixture(scope="session")
def openvino_ir(exported: tuple["Aand", Path]) -> Path:
    """The exported ONNX file as an FP32 OpenVINO IR, converted with the call anomalib's OpenVINO export makes."""
    import openvino as ov

    xml = exported[1].parent / "openvino" / "model.xml"
    ov.save_model(ov.convert_model(exported[1]), xml, compress_to_fp16=False)  # as anomalib's FP32 export
    return xml


def tiny_aand(**kwargs: object) -> "Aand":
    """Smallest useful AAND: resnet18 with random weights, 32 px images, 1 + 1 epochs; ``kwargs`` override."""
    from anomalib_aand import Aand  # imported here: HF_HUB_OFFLINE above must be set before huggingface_hub loads

    arguments = {
        "backbone": "resnet18",
        "pre_trained": False,
        "stage1_epochs": 1,
        "stage2_epochs": 1,
        "hkd_top_k": 2,
        "pre_processor": Aand.configure_pre_processor((32, 32)),
        "visualizer": False,
    }
    return Aand(**{**arguments, **kwargs})


def lite0_aand(**kwargs: object) -> "Aand":
    """Small AAND on the offline ImageNet EfficientNet-Lite0 teacher: 64 px, 1 + 5 epochs; ``kwargs`` override."""
    from anomalib_aand import Aand

    arguments = {
        "backbone": "tf_efficientnet_lite0",
        "layers": ("blocks.1", "blocks.2", "blocks.4"),
        "pre_trained": True,
        "stage1_epochs": 1,
        "stage2_epochs": 5,
        "num_keys": 4,
        "pre_processor": Aand.configure_pre_processor((EXPORT_SIZE, EXPORT_SIZE)),
    }
    return Aand(**{**arguments, **kwargs})
