"""The embedded demo dataset: layout, determinism, defects where the masks say, read by anomalib's MVTecAD."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import MVTecAD
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from anomalib_aand.tools.demo import DEFECTS, DRAW, TINTS, _normal_image, generate_category, main

SMALL = {"n_train": 3, "n_good": 2, "n_defective": 5, "size": 128}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_category(tmp_path_factory.mktemp("demo"), "brick", seed=3, **SMALL)


def test_layout_is_mvtec(brick: Path) -> None:
    """train/good, test/good, test/<defect> with one binary mask each in ground_truth/<defect>."""
    assert len(list((brick / "train/good").glob("*.png"))) == 3
    assert len(list((brick / "test/good").glob("*.png"))) == 2
    assert sorted(p.name for p in (brick / "test").iterdir()) == sorted(["good", *DEFECTS])
    for kind in DEFECTS:
        images = sorted((brick / "test" / kind).glob("*.png"))
        assert [p.stem for p in images] == ["000"]
        mask = np.asarray(Image.open(brick / "ground_truth" / kind / "000_mask.png"))
        image = np.asarray(Image.open(images[0]))
        assert image.shape == (128, 128, 3)
        assert mask.shape == (128, 128)
        assert set(np.unique(mask)) == {0, 255}


def test_deterministic_for_a_seed(brick: Path, tmp_path: Path) -> None:
    same = generate_category(tmp_path / "a", "brick", seed=3, **SMALL)
    other = generate_category(tmp_path / "b", "brick", seed=4, **SMALL)
    assert _digest(same) == _digest(brick)
    assert _digest(other).keys() == _digest(brick).keys()
    assert all(a != b for a, b in zip(_digest(other).values(), _digest(brick).values(), strict=True))


@pytest.mark.parametrize("kind", DEFECTS)
@pytest.mark.parametrize("category", sorted(TINTS))
def test_defect_changes_the_image_where_its_mask_is(kind: str, category: str) -> None:
    """Each defect is a small, visible change, (almost) all of it inside its mask."""
    rng = np.random.default_rng(0)
    texture = getattr(skdata, category)()
    for _ in range(3):
        clean = _normal_image(texture, TINTS[category], 256, rng)
        damaged, mask = DRAW[kind](clean.copy(), rng)
        change = np.abs(damaged - clean).sum(axis=2)
        assert 0.0003 < mask.mean() < 0.06, mask.mean()
        assert change[mask].mean() > 0.08, change[mask].mean()
        near = ndimage.binary_dilation(mask, iterations=3)
        assert change[near].sum() > 0.9 * change.sum()


def test_existing_foreign_folder_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "grass").mkdir()
    (tmp_path / "grass" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="another --root"):
        generate_category(tmp_path, "grass", **SMALL)
    assert (tmp_path / "grass" / "mine.txt").read_text() == "user data"


def test_rerun_keeps_or_replaces_its_own_output(tmp_path: Path) -> None:
    folder = generate_category(tmp_path, "gravel", **SMALL)
    stamp = (folder / "train/good/000.png").stat().st_mtime_ns
    generate_category(tmp_path, "gravel", **SMALL)
    assert (folder / "train/good/000.png").stat().st_mtime_ns == stamp
    generate_category(tmp_path, "gravel", **{**SMALL, "n_train": 2})
    assert len(list((folder / "train/good").glob("*.png"))) == 2


def test_bad_arguments_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose from"):
        generate_category(tmp_path, "marble")
    with pytest.raises(ValueError, match="choose from"):
        generate_category(tmp_path, "brick", defects=("dent",))


def test_command_line_and_mvtec_datamodule(tmp_path: Path) -> None:
    """The CLI writes what anomalib's MVTecAD reads unchanged, masks included."""
    main(
        [
            "--root",
            str(tmp_path),
            "--categories",
            "grass",
            "--train",
            "4",
            "--good",
            "2",
            "--defective",
            "5",
            "--size",
            "64",
        ]
    )
    datamodule = MVTecAD(root=tmp_path, category="grass", train_batch_size=2, eval_batch_size=7, num_workers=0)
    datamodule.setup()
    assert len(datamodule.train_data) == 4
    test = datamodule.test_data.samples
    assert len(test) == 7
    assert sorted(test.label_index.tolist()) == [0, 0, 1, 1, 1, 1, 1]
    assert all(Path(m).is_file() for m in test[test.label_index == 1].mask_path)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape == (7, 3, 64, 64)
    assert batch.gt_mask[batch.gt_label == 1].flatten(1).any(dim=1).all()
    assert not batch.gt_mask[batch.gt_label == 0].any()
