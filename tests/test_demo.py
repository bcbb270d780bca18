"""The embedded demo dataset: layout, determinism, defects where the masks say, read by anomalib's MVTecAD.

Textures and the procedurally drawn objects (pose and light jitter, defects on the object).
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import MVTecAD
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from anomalib_aand.tools.demo import (
    DEFECTS,
    DRAW,
    MARKER,
    TINTS,
    _normal_image,
    generate_category,
    main,
)
from anomalib_aand.tools.demo_objects import OBJECT_DEFECTS, OBJECTS, random_pose, render

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


@pytest.mark.parametrize("category", ["grass", "screw"])
def test_command_line_and_mvtec_datamodule(tmp_path: Path, category: str) -> None:
    """The CLI writes what anomalib's MVTecAD reads unchanged, masks included."""
    main(
        [
            "--root",
            str(tmp_path),
            "--categories",
            category,
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
    datamodule = MVTecAD(root=tmp_path, category=category, train_batch_size=2, eval_batch_size=7, num_workers=0)
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


def test_list_and_default_categories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--list`` names every category with its defects; without ``--categories`` only the textures are written."""
    main(["--list"])
    listed = capsys.readouterr().out
    for category in ("brick", "grass", "gravel", "hex_nut", "screw"):
        assert category in listed
    assert "missing" in listed
    main(["--root", str(tmp_path), "--train", "1", "--good", "1", "--defective", "1", "--size", "64"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brick", "grass", "gravel"]


@pytest.fixture(scope="module")
def screws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_category(tmp_path_factory.mktemp("objects"), "screw", seed=5, **{**SMALL, "n_defective": 4})


def test_object_category_is_deterministic(screws: Path, tmp_path: Path) -> None:
    same = generate_category(tmp_path / "a", "screw", seed=5, **{**SMALL, "n_defective": 4})
    other = generate_category(tmp_path / "b", "screw", seed=6, **{**SMALL, "n_defective": 4})
    assert _digest(same) == _digest(screws)
    assert all(a != b for a, b in zip(_digest(other).values(), _digest(screws).values(), strict=True))
    assert sorted(p.name for p in (screws / "test").iterdir()) == sorted(["good", *OBJECT_DEFECTS])
    assert sorted(p.name for p in screws.iterdir()) == sorted([MARKER, "ground_truth", "test", "train"])  # nothing else


@pytest.mark.parametrize("category", sorted(OBJECTS))
def test_object_poses_differ_between_images(category: str) -> None:
    """Shift and rotation: no two silhouettes coincide, and the object is never clipped by the border."""
    rng = np.random.default_rng(5)
    silhouettes = [render(category, random_pose(128, rng))[2] for _ in range(4)]
    for i, a in enumerate(silhouettes):
        assert 0.03 < a.mean() < 0.5
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert not border.any()
        for b in silhouettes[i + 1 :]:
            assert (a & b).sum() / (a | b).sum() < 0.95


@pytest.mark.parametrize("kind", OBJECT_DEFECTS)
@pytest.mark.parametrize("category", sorted(OBJECTS))
def test_object_defect_lies_on_the_object_where_its_mask_is(kind: str, category: str) -> None:
    """Against the same object in the same pose: the change is inside the mask, and the mask on the object."""
    rng = np.random.default_rng(1)
    for _ in range(3):
        pose = random_pose(256, rng)
        clean, nothing, silhouette = render(category, pose)
        damaged, mask, same_silhouette = render(category, pose, kind, rng)
        assert not nothing.any()
        assert np.array_equal(silhouette, same_silhouette)
        assert 0.0002 < mask.mean() < 0.05, mask.mean()
        assert mask[~ndimage.binary_dilation(silhouette, iterations=1)].sum() == 0
        change = np.abs(damaged - clean).sum(axis=2)
        assert change[mask].mean() > 0.08, change[mask].mean()
        near = ndimage.binary_dilation(mask, iterations=3)
        assert change[near].sum() > 0.85 * change.sum(), change[near].sum() / change.sum()


def test_object_defects_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose from"):
        generate_category(tmp_path, "hex_nut", defects=("crack",))
    with pytest.raises(ValueError, match="needs a generator"):
        render("screw", random_pose(64, np.random.default_rng(0)), "scratch")
