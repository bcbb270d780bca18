"""The edge tool (``python -m anomalib_aand.tools.infer``) on what an operator's line can hand it.

Two runs into one folder, an output folder it cannot write, odd input sizes, special files and links under
``--images``, images deeper than 8 bits, and models that are not AAND exports. Each either works or ends in one
message with the documented exit code, and no run loses another's results. No training: the models are a stand-in
(``test_infer.Brightness``) or tiny OpenVINO graphs built here.
"""

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops
from PIL import Image
from test_infer import Brightness, read_csv, write_image

from anomalib_aand.tools import infer

SIZE = ("--input-size", "32", "32")


def arguments(images: Path, out: Path, model: Path | str = "model.xml", *extra: str) -> list[str]:
    return ["--model", str(model), "--images", str(images), "--out", str(out), "--progress", "never", *extra]


def graph(path: Path, input_shape: list[int], outputs: dict[str, str]) -> Path:
    """A tiny OpenVINO IR: one input, outputs named as in ``outputs`` (name -> "score", "label", "map", "mean")."""
    image = ops.parameter(input_shape, ov.Type.f32, name="input")
    channel_mean = ops.reduce_mean(image, [1], keep_dims=True)
    score = ops.reduce_max(channel_mean, [1, 2, 3], keep_dims=False)
    nodes = {
        "map": channel_mean,
        "score": score,
        "label": ops.greater(score, ops.constant(np.float32(0.5))),
        "mean": ops.reduce_mean(image, [1, 2, 3], keep_dims=False),
    }
    results = []
    for name, kind in outputs.items():
        node = ops.result(nodes[kind])
        if name:
            node.input_value(0).get_tensor().set_names({name})
        results.append(node)
    ov.save_model(ov.Model(results, [image], "stand-in"), path)
    return path


AAND_LIKE = {"pred_score": "score", "pred_label": "label", "anomaly_map": "map"}


# ------------------------------------------------------------------------------------------- output folder
def test_two_runs_into_one_folder_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both runs find ``--out`` empty (they start together: the model loads in between); only one may write."""
    images, out = tmp_path / "images", tmp_path / "out"
    for i in range(12):
        write_image(images / f"{i:02d}.png", 10 * i)
    together = threading.Barrier(2, timeout=30)

    class Slow(Brightness):
        def predict(self, image: np.ndarray):
            time.sleep(0.01)
            return super().predict(image)

    def load(*args, **kwargs) -> Brightness:
        del args, kwargs
        together.wait()  # both runs have passed the check that --out is empty
        return Slow()

    monkeypatch.setattr(infer, "load_inferencer", load)
    codes: list[int] = []
    command = arguments(images, out, "model.xml", *SIZE)
    runs = [threading.Thread(target=lambda: codes.append(infer.main(command))) for _ in "ab"]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert sorted(codes) == [infer.EXIT_OK, infer.EXIT_NOT_RUN]
    assert [row[0] for row in read_csv(out / "scores.csv")] == [f"{i:02d}.png" for i in range(12)]


def test_unwritable_out_is_refused_without_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    images = tmp_path / "images"
    write_image(images / "a.png")
    (tmp_path / "file").write_text("a file where a folder should be")
    model = graph(tmp_path / "model.xml", [1, 3, 32, 32], AAND_LIKE)
    code = infer.main(arguments(images, tmp_path / "file" / "out", model))
    assert code == infer.EXIT_NOT_RUN
    assert "Cannot write into --out" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_at_start_is_refused_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The results files are created, then the first write fails with ENOSPC: exit 2, nothing left behind."""
    images, out = tmp_path / "images", tmp_path / "out"
    write_image(images / "a.png")
    real_open = Path.open

    def full_disk(self: Path, mode: str = "r", *args, **kwargs):
        if self.name.endswith(".csv") and ("w" in mode or "x" in mode):
            real_open(self, mode, *args, **kwargs).close()
            return open("/dev/full", "w", *args, **kwargs)  # noqa: PTH123  writes fail with ENOSPC
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    monkeypatch.setattr(infer, "load_inferencer", lambda *_, **__: Brightness())
    code = infer.main(arguments(images, out, "model.xml", *SIZE))
    assert code == infer.EXIT_NOT_RUN
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("size", [("0", "0"), ("-4", "32"), ("32", "100000")])
def test_input_size_out_of_range_is_refused(tmp_path: Path, size: tuple[str, str], capsys) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png")
    model = graph(tmp_path / "model.xml", [1, 3, -1, -1], AAND_LIKE)
    code = infer.main(arguments(images, tmp_path / "out", model, "--input-size", *size))
    assert code == infer.EXIT_NOT_RUN
    assert "--input-size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_input_size_must_fit_a_fixed_model_input(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    images = tmp_path / "images"
    write_image(images / "a.png")
    model = graph(tmp_path / "model.xml", [1, 3, 32, 32], AAND_LIKE)
    code = infer.main(arguments(images, tmp_path / "out", model, "--input-size", "64", "64"))
    assert code == infer.EXIT_NOT_RUN
    assert "fixed at 32x32" in capsys.readouterr().err
    assert infer.main(arguments(images, tmp_path / "out", model)) == infer.EXIT_OK


# ------------------------------------------------------------------------------------------ what is read
def test_fifo_named_png_is_skipped_not_waited_for(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png")
    os.mkfifo(images / "camera.png")
    results: list[infer.RunResult] = []
    run = threading.Thread(
        target=lambda: results.append(infer.run(Brightness(), images, tmp_path / "out", input_size=(32, 32))),
        daemon=True,
    )
    run.start()
    run.join(timeout=30)
    if run.is_alive():
        with (images / "camera.png").open("wb"):  # release the blocked reader
            pass
        pytest.fail("the tool blocked on a FIFO named camera.png")
    assert [row[0] for row in results[0].rows] == ["a.png"]
    assert [(name, reason.split(":")[0]) for name, reason in results[0].failed] == [("camera.png", "OSError")]
    assert "not a regular file" in results[0].failed[0][1]


def test_linked_folders_are_searched_once_and_loops_end(tmp_path: Path) -> None:
    """``loop -> ..`` and ``self -> .`` end the search; a camera folder linked in is scored, once."""
    images, camera = tmp_path / "images", tmp_path / "camera"
    write_image(images / "a.png")
    write_image(camera / "c.png", 60)
    (images / "sub").mkdir()
    (images / "sub" / "loop").symlink_to("..")
    (images / "self").symlink_to(".")
    (images / "line1").symlink_to(camera)
    (images / "line1-again").symlink_to(camera)
    result = infer.run(Brightness(), images, tmp_path / "out", input_size=(32, 32))
    assert [row[0] for row in result.rows] == ["a.png", "line1/c.png"]  # os.walk visits folders sorted


@pytest.mark.parametrize(
    ("name", "pixels", "mode"),
    [
        ("grey16.png", (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16), None),
        ("grey12.png", (np.arange(32 * 32).reshape(32, 32) * 4).astype(np.uint16), None),  # 12 bits stored in 16
        ("float.tif", np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), "F"),
    ],
)
def test_images_deeper_than_8_bits_are_skipped_and_named(
    tmp_path: Path, name: str, pixels: np.ndarray, mode: str | None
) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png")
    Image.fromarray(pixels, mode=mode).save(images / name)
    result = infer.run(Brightness(), images, tmp_path / "out", input_size=(32, 32))
    assert [row[0] for row in result.rows] == ["a.png"]
    assert result.exit_code == infer.EXIT_SKIPPED
    assert [failed for failed, _ in result.failed] == [name]
    assert "convert it to 8 bits" in result.failed[0][1]
    with (tmp_path / "out" / "errors.csv").open(newline="") as file:
        assert [row[0] for row in csv.reader(file)][1:] == [name]


# -------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    ("outputs", "shown"),
    [
        ({"logits": "mean"}, "['logits']"),  # an image classifier
        ({"": "score"}, "['Result_"),  # OpenVINO names an unnamed output
        ({"pred_score": "score", "anomaly_map": "map"}, "['pred_score', 'anomaly_map']"),  # no labels
    ],
)
def test_model_of_another_kind_is_refused_at_start(
    tmp_path: Path, outputs: dict[str, str], shown: str, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "images"
    write_image(images / "a.png")
    model = graph(tmp_path / "model.xml", [1, 3, 32, 32], outputs)
    code = infer.main(arguments(images, tmp_path / "out", model))
    assert code == infer.EXIT_NOT_RUN
    err = capsys.readouterr().err
    assert "is not an exported AAND model" in err
    assert f"returns {shown}" in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_huge_declared_input_is_refused_before_any_image(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "images"
    write_image(images / "a.png")
    model = graph(tmp_path / "model.xml", [1, 3, 10000, 10000], AAND_LIKE)
    code = infer.main(arguments(images, tmp_path / "out", model))
    assert code == infer.EXIT_NOT_RUN
    assert "declares an input of 10000x10000 pixels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
