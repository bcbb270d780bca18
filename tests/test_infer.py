"""The edge inference tool (``python -m anomalib_aand.tools.infer``) as a production line runs it, unattended.

Most tests hand ``infer.run`` a stand-in with ``OpenVINOInferencer.predict``'s interface (score = mean
brightness), which records what it was given; one test goes through a real exported OpenVINO model.
"""

import csv
import io
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EXPORT_SIZE, make_mvtec_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms.v2.functional import resize

from anomalib_aand import Aand
from anomalib_aand.tools import infer

SIZE = (32, 32)  # the stand-in model's input size (H, W)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # EXIF orientation: the stored pixels must be turned 90 degrees clockwise to be upright


class Brightness:
    """``OpenVINOInferencer.predict``'s interface: score = mean brightness; remembers the images it saw.

    ``fail_at`` (0-based call number) raises ``fail_with`` there, as a broken model or a kill would.
    """

    def __init__(self, fail_at: int | None = None, fail_with: type[BaseException] = RuntimeError) -> None:
        self.seen: list[np.ndarray] = []
        self.fail_at, self.fail_with = fail_at, fail_with

    def predict(self, image: np.ndarray) -> SimpleNamespace:
        if len(self.seen) == self.fail_at:
            msg = "stand-in failure"
            raise self.fail_with(msg)
        self.seen.append(image)
        score = float(image.mean())
        return SimpleNamespace(
            pred_score=np.array([[score]]),
            pred_label=np.array([[score > 0.5]]),
            anomaly_map=np.full((1, 1, *image.shape[:2]), score, np.float32),
        )


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (24, 16), **save: object) -> Path:
    """An RGB image of ``size`` (W, H) around grey level ``value``; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return path


def write_broken(path: Path, kind: str) -> Path:
    """A file with an image suffix that cannot be decoded: ``truncated``, ``garbage`` or ``empty``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "PNG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    else:
        path.write_bytes(b"not an image at all" if kind == "garbage" else b"")
    return path


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))[1:]


def test_unreadable_files_are_skipped_named_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_image(images / "z.png", 200)
    broken = {f"{kind}.png": write_broken(images / f"{kind}.png", kind) for kind in ("truncated", "garbage", "empty")}
    result = infer.run(Brightness(), images, tmp_path / "out", input_size=SIZE)
    assert [name for name, _, _ in result.rows] == ["a.png", "z.png"]
    assert sorted(name for name, _ in result.failed) == sorted(broken)
    assert result.exit_code == infer.EXIT_SKIPPED == 1
    assert sorted(row[0] for row in read_csv(tmp_path / "out" / "errors.csv")) == sorted(broken)
    assert "image file is truncated" in dict(result.failed)["truncated.png"]
    err = capsys.readouterr().err
    assert all(f"skipped {path}: cannot read it" in err for path in broken.values())


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_rows_are_written_as_they_are_computed(tmp_path: Path, failure: type[BaseException]) -> None:
    """A model failure (exit code 3) or a kill at the third image keeps the two rows and overlays before it."""
    images = tmp_path / "images"
    for i in range(5):
        write_image(images / f"{i}.png", 40 * i)
    expected = infer.InferenceFailedError if failure is RuntimeError else KeyboardInterrupt
    with pytest.raises(expected, match=r"2\.png|stand-in"):
        infer.run(Brightness(fail_at=2, fail_with=failure), images, tmp_path / "out", input_size=SIZE)
    assert [row[0] for row in read_csv(tmp_path / "out" / "scores.csv")] == ["0.png", "1.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == [
        "0.png_overlay.png",
        "1.png_overlay.png",
    ]


def test_existing_results_are_never_mixed_with_a_new_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    write_image(images / "a.png")
    infer.run(Brightness(), images, out, input_size=SIZE)
    before = (out / "scores.csv").read_bytes()
    write_image(images / "b.png", 30)
    code = infer.main(["--model", str(tmp_path / "model.xml"), "--images", str(images), "--out", str(out)])
    assert code == infer.EXIT_NOT_RUN == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "scores.csv").read_bytes() == before
    assert not (out / "overlays" / "b.png_overlay.png").exists()


def test_overlays_mirror_the_input_tree(tmp_path: Path) -> None:
    """``a.png``/``a.jpg`` and ``x_y.png``/``x/y.png`` used to overwrite each other's overlays."""
    images, out = tmp_path / "images", tmp_path / "out"
    names = ["a.png", "a.jpg", "x_y.png", "x/y.png", "x/y/z.png"]
    for i, name in enumerate(names):
        write_image(images / name, 40 + 40 * i)
    result = infer.run(Brightness(), images, out, input_size=SIZE)
    assert sorted(name for name, _, _ in result.rows) == sorted(names)
    overlays = sorted(str(p.relative_to(out / "overlays")) for p in (out / "overlays").rglob("*.png"))
    assert overlays == sorted(f"{name}_overlay.png" for name in names)
    colours = {tuple(np.asarray(Image.open(out / "overlays" / f"{n}_overlay.png")).mean((0, 1))) for n in names}
    assert len(colours) == len(names)  # each overlay shows its own image's map


def test_output_folder_is_never_read_as_input(tmp_path: Path) -> None:
    """``--out`` inside ``--images``: neither this run's output nor an earlier run's is scored."""
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_image(images / "sub" / "b.png", 60)
    first = infer.run(Brightness(), images, images / "results", input_size=SIZE)
    second = infer.run(Brightness(), images, images / "results2", input_size=SIZE)
    assert [name for name, _, _ in first.rows] == [name for name, _, _ in second.rows] == ["a.png", "sub/b.png"]


@pytest.mark.parametrize("content", ["nothing", "no image files"])
def test_empty_input_is_an_error(tmp_path: Path, content: str, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    if content != "nothing":
        (images / "notes.txt").write_text("x")
    code = infer.main(["--model", str(tmp_path / "model.xml"), "--images", str(images), "--out", str(tmp_path / "o")])
    assert code == infer.EXIT_NOT_RUN
    assert "No images under" in capsys.readouterr().err


def test_large_images_are_resized_on_the_host(tmp_path: Path) -> None:
    """The model gets its input size, never the full image; the overlay keeps the aspect, longest side 1024."""
    images, model = tmp_path / "images", Brightness()
    write_image(images / "big.png", 90, size=(3000, 2000))
    result = infer.run(model, images, tmp_path / "out", input_size=SIZE)
    assert [image.shape for image in model.seen] == [(*SIZE, 3)]
    assert model.seen[0].dtype == np.float32
    assert abs(result.rows[0][1] - 90 / 255) < 0.01
    assert Image.open(tmp_path / "out" / "overlays" / "big.png_overlay.png").size == (1024, 683)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    """A phone photo stored sideways (EXIF orientation 6) is scored and drawn upright."""
    upright = np.zeros((40, 20, 3), np.uint8)  # H 40, W 20: dark top half, bright bottom half
    upright[20:] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera writes: 40 wide
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    images, model = tmp_path / "images", Brightness()
    images.mkdir()
    stored.save(images / f"photo{suffix}", exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    infer.run(model, images, tmp_path / "out", input_size=(40, 20))
    seen = model.seen[0].mean(axis=(1, 2))
    assert seen[:18].max() < 0.1
    assert seen[22:].min() > 0.9
    assert Image.open(tmp_path / "out" / "overlays" / f"photo{suffix}_overlay.png").size == (20, 40)


def test_progress_bar_only_when_asked_or_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    for i in range(3):
        write_image(images / f"{i}.png")
    infer.run(Brightness(), images, tmp_path / "shown", input_size=SIZE, progress=True)
    assert "3/3" in capsys.readouterr().err
    infer.run(Brightness(), images, tmp_path / "auto", input_size=SIZE, progress=None)  # captured: not a terminal
    assert "3/3" not in capsys.readouterr().err


VALID, BROKEN = ("png", "jpg"), ("truncated", "garbage", "empty")
entries = st.lists(
    st.tuples(
        st.sampled_from(["", "x", "x/y", "a", "a/a"]),  # folder
        st.sampled_from(["a", "x_y", "y", "x"]),  # stem: few, so that names repeat
        st.sampled_from([".png", ".jpg", ".PNG", ".jpeg"]),
        st.sampled_from(VALID + BROKEN),
    ),
    min_size=1,
    max_size=10,
    unique_by=lambda entry: (entry[0], entry[1] + entry[2]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=entries)
def test_every_valid_file_gets_one_row_and_one_overlay(entries: list[tuple[str, str, str, str]]) -> None:
    """Random folders of valid, corrupt, duplicate-named and nested files."""
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "images", Path(tmp) / "images" / "out"  # --out inside --images as well
        valid, broken = set(), set()
        for i, (folder, stem, suffix, kind) in enumerate(entries):
            relative = str(Path(folder) / f"{stem}{suffix}")
            if kind in VALID:
                write_image(images / relative, 10 + 20 * i, format="PNG" if kind == "png" else "JPEG")
                valid.add(relative)
            else:
                write_broken(images / relative, kind)
                broken.add(relative)
        if not valid and not broken:
            return
        result = infer.run(Brightness(), images, out, input_size=SIZE)
        assert Counter(row[0] for row in read_csv(out / "scores.csv")) == Counter(valid)
        assert sorted(name for name, _, _ in result.rows) == sorted(valid)
        overlays = {str(p.relative_to(out / "overlays")) for p in (out / "overlays").rglob("*") if p.is_file()}
        assert overlays == {f"{name}_overlay.png" for name in valid}
        assert {name for name, _ in result.failed} == broken
        assert Counter(row[0] for row in read_csv(out / "errors.csv")) == Counter(broken)
        assert result.exit_code == (infer.EXIT_SKIPPED if broken else infer.EXIT_OK)


def test_exported_openvino_model_end_to_end(
    exported: tuple[Aand, Path],
    openvino_ir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Through the command line with a real OpenVINO IR: nested test images, a large sideways photo and a
    truncated file. Exit code 1; the large photo's score is anomalib's for the upright image."""
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    images = make_mvtec_dataset(tmp_path / "data", n_train=0, seed=2) / "test"
    upright = Image.open(images / "spot" / "000.png").resize((448, 640), Image.BICUBIC)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    upright.transpose(Image.Transpose.ROTATE_90).save(images / "photo.png", exif=exif)
    write_broken(images / "spot" / "cut.png", "truncated")
    out = tmp_path / "out"

    code = infer.main(["--model", str(openvino_ir), "--images", str(images), "--out", str(out)])
    assert code == infer.EXIT_SKIPPED
    assert "1 skipped" in capsys.readouterr().out
    rows = {row[0]: float(row[1]) for row in read_csv(out / "scores.csv")}
    assert len(rows) == 9
    assert [row[0] for row in read_csv(out / "errors.csv")] == ["spot/cut.png"]
    assert len(list((out / "overlays").rglob("*_overlay.png"))) == 9
    # Reference: what anomalib computes for this image in training, validation and test batches, where its
    # PreProcessor resizes with antialiasing (the exported graph's Resize has it disabled, so it aliases).
    pixels = torch.from_numpy(np.asarray(upright, np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = float(exported[0](resize(pixels, [EXPORT_SIZE, EXPORT_SIZE], antialias=True)).pred_score)
    # The tool resizes in 8 bits (pixels within 1/255 of the float resize); measured up to 0.009 on this tiny model.
    assert abs(rows["photo.png"] - expected) < 0.02


def test_unloadable_model_is_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, out, model = tmp_path / "images", tmp_path / "out", tmp_path / "model.xml"
    write_image(images / "a.png")
    model.write_text("<not an OpenVINO model/>")
    code = infer.main(["--model", str(model), "--images", str(images), "--out", str(out), "--progress", "never"])
    assert code == infer.EXIT_NOT_RUN
    assert "Cannot load the model" in capsys.readouterr().err
    assert not out.exists()
