"""Shared fixtures: a tiny MVTec-layout dataset generated on the fly."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
