"""Stage-1 synthesis: anomalies where the mask says, in the pre-processor's normalised space."""

import copy
import gc
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from conftest import tiny_aand
from PIL import Image
from skimage import data as skdata

from anomalib_aand.components.synthesis import AnomalySynthesizer, ForegroundEstimator, resolve_foreground_mask
from anomalib_aand.components.textures import write_texture_bank

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def test_synthesis_changes_only_masked_pixels() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 64, 64) * 0.5 + 0.25
    synthesizer = AnomalySynthesizer(probability=1.0, mean=MEAN, std=STD)
    augmented, mask, foreground = synthesizer(_normalise(pixels))
    assert mask.shape == (3, 1, 64, 64)
    assert foreground.shape == mask.shape
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(1) > 0).all()  # probability 1: every image has an anomaly
    changed = (augmented - _normalise(pixels)).abs().amax(dim=1, keepdim=True) > 1e-5
    assert not (changed & (mask == 0)).any()
    assert torch.equal(foreground, torch.ones_like(mask))


def test_synthesis_probability_zero_is_identity() -> None:
    images = _normalise(torch.rand(2, 3, 32, 32))
    augmented, mask, _ = AnomalySynthesizer(probability=0.0, mean=MEAN, std=STD)(images)
    assert mask.sum() == 0
    assert torch.allclose(augmented, images, atol=1e-5)


def test_foreground_estimator_finds_object_and_falls_back_on_textures() -> None:
    image = torch.full((1, 3, 96, 96), 0.1)
    image[..., 24:72, 24:72] = 0.8  # bright object on a dark background
    mask = ForegroundEstimator()(image)
    assert mask[0, 0, 48, 48] == 1
    assert mask[0, 0, 2, 2] == 0
    assert 0.15 < mask.mean() < 0.45
    flat = ForegroundEstimator()(torch.full((1, 3, 64, 64), 0.5))
    assert torch.equal(flat, torch.ones_like(flat))


def test_foreground_estimator_on_images_smaller_than_its_blur() -> None:
    """A 32 px image is smaller than the sigma-8 kernel's reach: its object is still found."""
    image = torch.full((2, 3, 32, 32), 0.1)
    image[..., 8:24, 8:24] = 0.9
    mask = ForegroundEstimator()(image)
    assert mask.shape == (2, 1, 32, 32)
    assert mask[0, 0, 16, 16] == 1
    assert mask[0, 0, 0, 0] == 0


def test_foreground_masking_keeps_anomalies_on_the_object() -> None:
    torch.manual_seed(1)
    pixels = torch.full((4, 3, 96, 96), 0.1)
    pixels[..., 24:72, 24:72] = 0.8
    synthesizer = AnomalySynthesizer(probability=1.0, foreground_mask=True, mean=MEAN, std=STD)
    augmented, mask, foreground = synthesizer(_normalise(pixels))
    assert not (mask * (1 - foreground)).any()
    background = (foreground == 0).expand_as(augmented)
    assert torch.allclose(augmented[background], _normalise(pixels)[background], atol=1e-5)


# ------------------------------------------------------------------ foreground on real images
def _texture(name: str, side: int = 256) -> torch.Tensor:
    """A scikit-image texture photograph as a ``(1, 3, side, side)`` batch in [0, 1]."""
    grey = torch.from_numpy(getattr(skdata, name)().astype(np.float32) / 255)
    image = grey.expand(1, 3, *grey.shape) if grey.ndim == 2 else grey.permute(2, 0, 1)[None]
    return F.interpolate(image, size=(side, side), mode="bilinear", antialias=True)


def _gradient(side: int, strength: float, direction: str) -> torch.Tensor:
    """A linear illumination ramp from -strength/2 to +strength/2 across the image."""
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, side), torch.linspace(-0.5, 0.5, side), indexing="ij")
    return strength * {"x": x, "y": y, "diagonal": (x + y) / 2}[direction]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["brick", "grass", "gravel"])
def test_foreground_keeps_textures_whole_under_illumination_gradients(name: str) -> None:
    texture, estimator = _texture(name), ForegroundEstimator()
    for strength in (0.0, 0.02, 0.05):
        for direction in ("x", "y", "diagonal"):
            mask = estimator((texture + _gradient(256, strength, direction)).clamp(0, 1))
            assert mask.mean() == 1, (name, strength, direction, float(mask.mean()))


@pytest.mark.parametrize(("background", "bright"), [(0.1, True), (0.9, False)])
def test_foreground_finds_a_textured_object_on_a_plain_background(background: float, bright: bool) -> None:
    """A disk of gravel (brightened or darkened) on a plain background with a 5 % gradient: the mask is the disk."""
    side = 256
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disk = ((y - 130) ** 2 + (x - 120) ** 2 < 70**2).float()
    surface = 0.5 + 0.5 * _texture("gravel", side) if bright else 0.5 * _texture("gravel", side)
    image = (background * (1 - disk) + surface * disk + _gradient(side, 0.05, "x")).clamp(0, 1)
    mask = ForegroundEstimator()(image)[0, 0]
    intersection, union = (mask * disk).sum(), ((mask + disk) > 0).sum()
    assert intersection / union > 0.85


@pytest.mark.slow
def test_anomaly_share_stays_at_probability_when_the_object_is_small() -> None:
    """Anomalies that miss a small object are drawn again, so the share of anomalous images stays at 0.8."""
    torch.manual_seed(0)
    pixels = torch.full((120, 3, 64, 64), 0.1)
    pixels[..., 24:40, 24:40] = 0.8  # the object: 6 % of the image (17 % after the mask's blur)
    synthesizer = AnomalySynthesizer(probability=0.8, foreground_mask=True, mean=MEAN, std=STD)
    augmented, mask, foreground = synthesizer(_normalise(pixels))
    assert foreground[0, 0, 32, 32] == 1
    assert foreground.mean() < 0.2
    assert not (mask * (1 - foreground)).any()
    share = float((mask.flatten(1).sum(1) > 0).float().mean())
    assert 0.7 < share < 0.9, share
    background = (foreground == 0).expand_as(augmented)
    assert torch.allclose(augmented[background], _normalise(pixels)[background], atol=1e-5)


# ------------------------------------------------------------------ per-category choice
@pytest.mark.parametrize(
    ("setting", "datamodule", "expected"),
    [
        (True, SimpleNamespace(category="carpet"), True),
        (False, SimpleNamespace(category="bottle"), False),
        (["bottle", "screw"], SimpleNamespace(category="bottle"), True),
        (["bottle", "screw"], SimpleNamespace(category="carpet"), False),
        (["bottle"], None, False),
    ],
)
def test_foreground_mask_per_category(setting, datamodule, expected: bool) -> None:
    assert resolve_foreground_mask(setting, datamodule) is expected


def test_configs_mask_the_authors_object_categories() -> None:
    """mvtec_ad.yaml masks MVTec's objects and keeps its textures whole; visa.yaml masks every VisA category."""
    configs = Path(__file__).parent.parent / "configs"
    mvtec = yaml.safe_load((configs / "mvtec_ad.yaml").read_text())["model"]["init_args"]["foreground_mask"]
    objects = {"bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "zipper"}
    assert set(mvtec) == objects
    assert not {"carpet", "grid", "leather", "tile", "wood", "transistor"} & set(mvtec)
    visa = yaml.safe_load((configs / "visa.yaml").read_text())["model"]["init_args"]["foreground_mask"]
    assert len(set(visa)) == 12


# ------------------------------------------------------------------ anomaly source
def test_texture_bank_is_colourful_and_varied(tmp_path: Path) -> None:
    folder = write_texture_bank(tmp_path / "bank", count=16, side=64, seed=1)
    images = [np.asarray(Image.open(p), dtype=np.float32) / 255 for p in sorted(folder.glob("*.png"))]
    assert len(images) == 16
    assert all(image.shape == (64, 64, 3) for image in images)
    assert np.mean([image.std(axis=-1).mean() for image in images]) > 0.02  # colour, not grey
    assert min(image.std() for image in images) > 0.01  # each has structure
    assert min(np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1 :]) > 0.02  # all differ


def anomaly_colourfulness(synthesizer: AnomalySynthesizer) -> float:
    """Mean spread across colour channels inside the anomalies ``synthesizer`` adds to a grey batch."""
    augmented, mask, _ = synthesizer(torch.full((6, 3, 64, 64), 0.5))
    inside = mask.expand_as(augmented) > 0
    return float(augmented.std(dim=1, keepdim=True).expand_as(augmented)[inside].mean())


def test_procedural_source_blends_coloured_textures() -> None:
    """Noise anomalies are grey; 'procedural' ones carry the textures' colours."""
    torch.manual_seed(0)
    assert anomaly_colourfulness(AnomalySynthesizer(probability=1.0, anomaly_source_path=None)) < 0.02
    assert anomaly_colourfulness(AnomalySynthesizer(probability=1.0, anomaly_source_path="procedural")) > 0.05


@pytest.mark.slow
def test_training_applies_the_per_category_choice(mvtec_root: Path, tmp_path: Path) -> None:
    """With a list, the datamodule's category decides whether stage 1 masks its anomalies."""
    model = tiny_aand(foreground_mask=["toy", "bottle"])
    datamodule = MVTecAD(root=mvtec_root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    Engine(default_root_dir=tmp_path, logger=False, devices=1, accelerator="cpu").fit(model, datamodule=datamodule)
    assert isinstance(model.synthesizer.foreground, ForegroundEstimator)


def test_copy_of_a_procedural_synthesizer_outlives_the_original() -> None:
    """A copied model keeps drawing textured anomalies after the model it was copied from is gone."""
    torch.manual_seed(0)
    synthesizer = AnomalySynthesizer(probability=1.0, anomaly_source_path="procedural")
    copied = copy.deepcopy(synthesizer)
    del synthesizer
    gc.collect()
    assert anomaly_colourfulness(copied) > 0.05


@pytest.mark.slow
def test_procedural_bank_is_removed_at_exit() -> None:
    code = "from anomalib_aand.components.synthesis import procedural_texture_bank as b; print(b())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    folder = Path(run.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("aand_textures_")
    assert not folder.exists()
