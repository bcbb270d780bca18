"""benchmarks/masked_maps.py: masking a test map outside the object removes background false positives."""

from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

from anomalib_aand.tools.demo import generate_category, object_masks


@pytest.fixture(scope="module")
def masked_maps():
    return load_benchmark("masked_maps")


def test_background_responses_are_removed_by_the_silhouette(masked_maps, tmp_path: Path) -> None:
    """A map that fires on the table and, more weakly, on the defects: unmasked it ranks the table first."""
    folder = generate_category(tmp_path / "data", "hex_nut", n_train=1, n_good=3, n_defective=3, size=64)
    silhouettes = object_masks(folder)
    paths = sorted(str(p) for p in (folder / "test").glob("*/*.png"))
    truth = np.stack([Path(p).parent.name != "good" for p in paths])[:, None, None] & np.stack(
        [silhouettes[masked_maps.image_key(p)] for p in paths]
    )
    truth[:, :, :] &= np.indices((64, 64)).sum(axis=0) % 3 == 0  # a scattered defect on each defective object
    rng = np.random.default_rng(0)
    background = ~np.stack([silhouettes[masked_maps.image_key(p)] for p in paths])
    maps = 0.5 * truth + background * rng.uniform(0.4, 1.0, truth.shape) + rng.uniform(0, 0.05, truth.shape)
    labels = truth.reshape(len(paths), -1).any(axis=1)
    np.savez(tmp_path / "maps.npz", anomaly_map=maps.astype(np.float16), gt_mask=truth, gt_label=labels, path=paths)
    found = masked_maps.evaluate(tmp_path / "maps.npz", silhouettes, margin=0)
    assert found["none"]["pixel_AUROC"] < 0.5
    assert found["silhouette"]["pixel_AUROC"] > 0.99
    assert found["silhouette"]["image_AUROC"] == pytest.approx(1.0)
    assert found["silhouette"]["foreground_share"] < found["none"]["foreground_share"] == 1.0
