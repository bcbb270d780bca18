"""benchmarks/map_errors.py: false positives are attributed to the region (outline, object, table) they lie in."""

from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark
from scipy import ndimage

from anomalib_aand.tools.demo import generate_category, object_masks


@pytest.fixture(scope="module")
def map_errors():
    return load_benchmark("map_errors")


def test_regions_partition_the_image(map_errors) -> None:
    silhouette = np.zeros((64, 64), bool)
    silhouette[20:44, 10:54] = True
    found = map_errors.regions(silhouette, 3)
    stacked = np.stack(list(found.values())).astype(int)
    assert (stacked.sum(axis=0) == 1).all()
    assert found["outline (object side)"][20, 30]
    assert found["object interior"][32, 30]
    assert found["outline (table side)"][18, 30]
    assert found["background"][2, 2]


def test_false_positives_on_the_outline_are_counted_there(map_errors, tmp_path: Path) -> None:
    """A map that lights up only the object's outline puts all its false positives in the outline band."""
    folder = generate_category(tmp_path / "data", "hex_nut", n_train=1, n_good=3, n_defective=1, size=64)
    silhouettes = object_masks(folder)
    paths = sorted(str(p) for p in (folder / "test").glob("*/*.png"))
    edges = []
    for path in paths:
        silhouette = silhouettes[map_errors.image_key(path)]
        edges.append(silhouette ^ ndimage.binary_erosion(silhouette))
    rng = np.random.default_rng(0)
    maps = np.stack(edges).astype(np.float32) + rng.uniform(0, 0.1, (len(paths), 64, 64)).astype(np.float32)
    truth = np.zeros_like(maps, dtype=bool)
    np.savez(tmp_path / "maps.npz", anomaly_map=maps, gt_mask=truth, path=np.asarray(paths), pred_score=np.zeros(4))
    found = map_errors.analyse(tmp_path / "maps.npz", silhouettes, fpr=0.02, band=4)
    assert found["regions"]["outline (object side)"]["fp_share"] > 0.95
    assert found["regions"]["background"]["fp_share"] < 0.05
    assert sum(r["area_share"] for r in found["regions"].values()) == pytest.approx(1.0)
