"""Edge inference: run an exported AAND model (OpenVINO IR or ONNX) on a folder of images, without Lightning.

    python -m anomalib_aand.tools.infer --model weights/openvino/model.xml --images DIR --out DIR [--device CPU]

Written for a line that runs it unattended. Every image under ``--images`` (searched recursively) is read
with its EXIF orientation applied, resized on the host to the model's input size (memory stays bounded
whatever the image size) and scored with anomalib's ``OpenVINOInferencer``. ``--out`` must be new or empty,
and a run owns it: a second run given the same folder, even one started in the same second, is refused
(results of two runs are never mixed). It receives:

- ``scores.csv``: one row ``image,score,label`` per image, appended and flushed as soon as the image is
  scored, so a crash or kill loses at most the image in flight. Scores are anomalib's normalised scores:
  0.5 is the threshold learnt on the validation images.
- ``errors.csv``: one row ``image,error`` per file that could not be read (corrupt, truncated, not an
  image); such files are skipped, named on stderr and counted.
- ``overlays/<relative path>_overlay.png``: the anomaly map as a heat map over the image, in a tree that
  mirrors ``--images`` with the file's extension kept (``a/b.png`` -> ``overlays/a/b.png_overlay.png``),
  so no two inputs share an output. Longest side at most 1024 px.

``--out`` is never read as input, nor is any earlier results folder (``scores.csv`` beside ``overlays/``)
lying under ``--images``. Folders linked into ``--images`` are searched too, each real folder once (a link
back to a parent is not followed again).

Files that are skipped (exit code 1, named in ``errors.csv``): undecodable files, anything that is not a
regular file (a FIFO, a socket or a device named ``*.png`` would block the run), and images with 16-bit,
12-bit (stored in 16) or float pixels: anomalib's reader clips those to 8 bits, so they would be scored as
a white or black image; training refuses them too.

The model must be an AAND export (anomalib's exported chain: outputs ``pred_score``, ``pred_label`` and
``anomaly_map``) whose input is at most ``MAX_INPUT_SIDE`` pixels a side; anything else is refused at start.

Exit codes: 0 every image scored; 1 some files were skipped (see errors.csv), the others are scored;
2 nothing was run (bad arguments, missing or unloadable model, not an AAND model, no images, ``--out`` not
empty, taken by another run, read-only or full); 3 the run stopped: the model or device failed, or results
could not be written (the rows written before are kept).

OpenVINO keeps compiled models in ``./openvino_cache`` (anomalib's choice, in the working directory).
"""

import argparse
import contextlib
import csv
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageOps
from tqdm import tqdm

from anomalib_aand.workarounds import quiet_anomalib_import

with quiet_anomalib_import():
    from anomalib.deploy import OpenVINOInferencer
    from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map

    from anomalib_aand.components.data_checks import HIGH_BIT_DEPTH_MODES

if TYPE_CHECKING:
    import openvino as ov

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SCORES = "scores.csv"
ERRORS = "errors.csv"
OVERLAYS = "overlays"
OVERLAY_MAX_SIDE = 1024
MAX_INPUT_SIDE = 4096  # a float32 image of 4096 x 4096 takes 200 MB on the host; AAND's activations far more
AAND_OUTPUTS = ("pred_score", "pred_label", "anomaly_map")
EXIT_OK = 0
EXIT_SKIPPED = 1
EXIT_NOT_RUN = 2
EXIT_INFERENCE_FAILED = 3


class Prediction(Protocol):
    """The fields of anomalib's ``NumpyImageBatch`` the tool reads (batch of one)."""

    pred_score: ArrayLike
    pred_label: ArrayLike
    anomaly_map: ArrayLike


class Predictor(Protocol):
    """What the tool needs of a model: anomalib's ``OpenVINOInferencer.predict`` interface."""

    def predict(self, image: np.ndarray) -> Prediction:
        """Score one (H, W, 3) float32 image in [0, 1]."""


class InferInputError(ValueError):
    """Arguments the tool cannot run with (exit code 2)."""


class InferenceFailedError(RuntimeError):
    """The model failed on a readable image, or its results could not be written (exit code 3)."""


@dataclass
class RunResult:
    """What a run produced: ``rows`` (image, score, label) as written to scores.csv, ``failed`` (image, error)."""

    out: Path
    rows: list[tuple[str, float, bool]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """``EXIT_SKIPPED`` when any file was skipped, else ``EXIT_OK``."""
        return EXIT_SKIPPED if self.failed else EXIT_OK


def load_inferencer(model: str | Path, device: str = "CPU", precision: str = "f32") -> OpenVINOInferencer:
    """``OpenVINOInferencer`` for an IR (``.xml``) or ONNX file of AAND, checked before it is compiled.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32`` (default) matches the torch model;
    ``auto`` lets OpenVINO choose (bf16 on CPUs that have it, f16 on GPUs: faster, scores differ by ~1e-2).
    """
    import openvino as ov

    path = Path(model)
    if not path.is_file():
        msg = f"Model file {str(path)!r} does not exist. Export one with `anomalib export --export_type openvino ...`."
        raise InferInputError(msg)
    check_aand_model(ov.Core().read_model(path), path)
    config = None if precision == "auto" else {"INFERENCE_PRECISION_HINT": precision}
    return OpenVINOInferencer(path=path, device=device, config=config)


def _static_size(shape: "ov.PartialShape") -> tuple[int, int] | None:
    """(height, width) of a static NCHW shape, else None."""
    if shape.rank.is_static and len(shape) == 4 and shape[2].is_static and shape[3].is_static:
        return shape[2].get_length(), shape[3].get_length()
    return None


def check_aand_model(model: "ov.Model", path: str | Path) -> None:
    """Refuse a model that is not an AAND export, or whose input is larger than ``MAX_INPUT_SIDE`` a side.

    An AAND export is anomalib's exported chain: one (N, 3, H, W) image input; outputs ``pred_score``,
    ``pred_label`` and ``anomaly_map`` (and ``pred_mask``).
    """
    inputs = [input_.get_partial_shape() for input_ in model.inputs]
    outputs = ["/".join(sorted(output.get_names())) or "<unnamed>" for output in model.outputs]
    names = {name for output in model.outputs for name in output.get_names()}
    shape = inputs[0] if len(inputs) == 1 else None
    image_input = (
        shape is not None
        and shape.rank.is_static
        and len(shape) == 4
        and (shape[1].is_dynamic or shape[1].get_length() == 3)
    )
    if not image_input or not set(AAND_OUTPUTS) <= names:
        msg = (
            f"{str(path)!r} is not an exported AAND model: it takes {[str(s) for s in inputs]} and returns {outputs}. "
            f"An AAND export takes one image batch [N,3,H,W] and returns {', '.join(AAND_OUTPUTS)}. Pass the "
            "model.xml that `anomalib export --model anomalib_aand.Aand --ckpt_path <model.ckpt> --export_type "
            "openvino` writes (weights/openvino/model.xml)."
        )
        raise InferInputError(msg)
    size = _static_size(shape)
    if size is not None and max(size) > MAX_INPUT_SIDE:
        msg = (
            f"{str(path)!r} declares an input of {size[0]}x{size[1]} pixels, more than the {MAX_INPUT_SIDE} a side "
            f"this tool accepts (one image would take {3 * 4 * size[0] * size[1] / 1e9:.1f} GB on the host before "
            "the network runs). Export with a smaller --input_size, or with the default pre-processor (its Resize "
            "takes images of any size)."
        )
        raise InferInputError(msg)


def check_input_size(size: Sequence[int], fixed: tuple[int, int] | None) -> tuple[int, int]:
    """``size`` (height, width) as a tuple, if both sides are in [1, ``MAX_INPUT_SIDE``] and fit a fixed model input."""
    height, width = (int(side) for side in size)
    if not (0 < height <= MAX_INPUT_SIDE and 0 < width <= MAX_INPUT_SIDE):
        msg = f"--input-size {height} {width}: height and width must be between 1 and {MAX_INPUT_SIDE}."
        raise InferInputError(msg)
    if fixed is not None and (height, width) != fixed:
        msg = (
            f"--input-size {height} {width} does not fit the model, whose input is fixed at {fixed[0]}x{fixed[1]}: "
            "leave --input-size out (the tool reads it from the model)."
        )
        raise InferInputError(msg)
    return height, width


def model_input_size(inferencer: OpenVINOInferencer) -> tuple[int, int] | None:
    """(height, width) the exported graph works at, or None when the graph does not fix it.

    That is its fixed input size, or else the size of its anomaly map: a graph with anomalib's Resize
    takes any size and returns maps at the training size.
    """
    compiled = inferencer.model
    shapes = [compiled.input(0).get_partial_shape()]
    shapes += [output.get_partial_shape() for output in compiled.outputs if "anomaly_map" in output.get_names()]
    for shape in shapes:
        if (size := _static_size(shape)) is not None:
            return size
    return None


def is_results_folder(folder: Path) -> bool:
    """A results folder of this tool: ``scores.csv`` beside ``overlays/``."""
    return (folder / SCORES).is_file() and (folder / OVERLAYS).is_dir()


def find_images(images: str | Path, out: str | Path | None = None) -> list[Path]:
    """Image files under ``images`` (recursively, sorted), leaving out ``out`` and earlier results folders.

    Linked folders are followed, each real folder once, so a link to a parent folder ends the search there.
    """
    images = Path(images)
    if not images.is_dir():
        msg = f"--images {str(images)!r} is not a folder."
        raise InferInputError(msg)
    skipped = {Path(out).resolve()} if out is not None else set()
    visited = {images.resolve()}
    found = []
    for folder, subfolders, files in os.walk(images, followlinks=True):
        here = Path(folder)
        kept = []
        for name in sorted(subfolders):
            real = (here / name).resolve()
            if real not in skipped and real not in visited and not is_results_folder(here / name):
                visited.add(real)
                kept.append(name)
        subfolders[:] = kept
        found += [here / name for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def overlay_path(out: Path, relative: Path) -> Path:
    """``out/overlays/<relative>_overlay.png``: mirrors the input tree and keeps the extension, so it is unique."""
    return out / OVERLAYS / relative.parent / f"{relative.name}_overlay.png"


def load_image(path: Path, input_size: tuple[int, int]) -> tuple[np.ndarray, Image.Image]:
    """The model input (``input_size`` (H, W), float32 in [0, 1]) and an upright display copy of ``path``.

    EXIF orientation is applied first. The decoded full-size image lives only inside this function: its
    8-bit pixels are the largest allocation of a run, whatever the image size (the model sees ``input_size``).
    Raises ``OSError`` for what is not a regular file (a FIFO would block) and ``ValueError`` for pixels deeper
    than 8 bits, which the conversion to RGB would clip.
    """
    if not stat.S_ISREG(path.stat().st_mode):
        msg = "not a regular file (a FIFO, socket or device)"
        raise OSError(msg)
    with Image.open(path) as image:
        if image.mode in HIGH_BIT_DEPTH_MODES:
            msg = (
                f"{'float' if image.mode == 'F' else '16-bit'} pixels (PIL mode {image.mode}), which would be clipped "
                "to 8 bits and scored as a white or black image: convert it to 8 bits, scaling the values to 0..255"
            )
            raise ValueError(msg)
        ImageOps.exif_transpose(image, in_place=True)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        height, width = input_size
        model_input = rgb if rgb.size == (width, height) else rgb.resize((width, height), Image.BILINEAR)
        scale = min(1.0, OVERLAY_MAX_SIDE / max(rgb.size))
        display_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        display = rgb.copy() if scale == 1.0 else rgb.resize(display_size, Image.BILINEAR)
        return np.asarray(model_input, dtype=np.float32) / 255.0, display


def overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Heat map of the normalised ``anomaly_map`` (values in [0, 1]) over ``image``."""
    heat = visualize_anomaly_map((np.clip(anomaly_map.squeeze(), 0, 1) * 255).astype(np.uint8), colormap=True)
    return overlay_image(image, heat.resize(image.size, Image.BILINEAR), alpha=alpha).convert("RGB")


def _refuse_used_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = sorted(p.name for p in out.iterdir())[:5] if out.is_dir() else []
        msg = (
            f"--out {str(out)!r} is not empty (holds {held}): results of an earlier run are never mixed with a "
            "new one. Give a new or empty folder (e.g. one per run: --out results/$(date +%Y%m%d-%H%M%S)-$$), or "
            "move the old results away."
            if out.is_dir()
            else f"--out {str(out)!r} is a file, not a folder. Give a new or empty folder."
        )
        raise InferInputError(msg)


@contextlib.contextmanager
def claim_out(out: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Make ``out`` this run's folder and open its scores.csv and errors.csv, headers written.

    scores.csv is created exclusively: of two runs given the same folder, the second is refused. A folder that
    cannot be written (read-only, full) is refused too, and what this call created is removed again.
    """
    created = not out.exists()
    opened: list[TextIO] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, header in ((SCORES, ("image", "score", "label")), (ERRORS, ("image", "error"))):
            opened.append((out / name).open("x", newline=""))
            csv.writer(opened[-1]).writerow(header)
            opened[-1].flush()
    except OSError as error:
        for file, name in zip(opened, (SCORES, ERRORS), strict=False):
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(OSError):
                (out / name).unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        if isinstance(error, FileExistsError):
            msg = (
                f"--out {str(out)!r} was taken by another run that started at the same time. Give each run its own "
                "folder (e.g. --out results/$(date +%Y%m%d-%H%M%S)-$$)."
            )
        else:
            msg = (
                f"Cannot write into --out {str(out)!r} ({type(error).__name__}: {error}). Give a folder that this "
                "user can write to, on a disk with free space."
            )
        raise InferInputError(msg) from error
    scores, errors = opened
    with scores, errors:
        yield scores, errors


def _save_atomically(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    partial.replace(path)


def _first(value: ArrayLike) -> float:
    return float(np.asarray(value).reshape(-1)[0])


def run(
    model: str | Path | Predictor,
    images: str | Path,
    out: str | Path,
    device: str = "CPU",
    precision: str = "f32",
    input_size: tuple[int, int] | None = None,
    progress: bool | None = False,
) -> RunResult:
    """Score every image under ``images``; write scores.csv, errors.csv and overlays into the new folder ``out``.

    ``model`` is an exported model file or any object with ``OpenVINOInferencer.predict``'s interface.
    ``input_size`` (H, W) is read from an exported model when not given. ``progress``: show a progress bar
    (None: when stderr is a terminal). Unreadable files are skipped and listed in ``RunResult.failed``.
    Raises ``InferInputError`` before anything is run, ``InferenceFailedError`` when the model fails.
    """
    images = Path(images)
    out = Path(out)
    paths = find_images(images, out)
    if not paths:
        msg = (
            f"No images under {str(images)!r} (looked recursively for {', '.join(IMAGE_SUFFIXES)}, leaving out "
            "--out and earlier results folders). Check --images."
        )
        raise InferInputError(msg)
    _refuse_used_out(out)
    try:
        predictor = load_inferencer(model, device, precision) if isinstance(model, str | Path) else model
    except InferInputError:
        raise
    except Exception as error:  # OpenVINO raises RuntimeError for files it cannot read or compile
        msg = f"Cannot load the model {str(model)!r} ({type(error).__name__}: {error}). Pass an exported model.xml."
        raise InferInputError(msg) from error
    inferencer = predictor if isinstance(predictor, OpenVINOInferencer) else None
    fixed = _static_size(inferencer.model.input(0).get_partial_shape()) if inferencer is not None else None
    if input_size is None and inferencer is not None:
        input_size = model_input_size(inferencer)
    if input_size is None:
        msg = "Cannot tell the model's input size from the model; pass --input-size HEIGHT WIDTH."
        raise InferInputError(msg)
    input_size = check_input_size(input_size, fixed)
    result = RunResult(out=out)
    with claim_out(out) as (scores, errors):
        score_writer = csv.writer(scores)
        error_writer = csv.writer(errors)
        for path in tqdm(paths, desc="images", unit="img", disable=None if progress is None else not progress):
            relative = path.relative_to(images)
            try:
                image, display = load_image(path, input_size)
            except Exception as error:  # noqa: BLE001  PIL raises many types for unreadable files
                reason = f"{type(error).__name__}: {error}"
                tqdm.write(f"skipped {path}: cannot read it ({reason})", file=sys.stderr)
                try:
                    error_writer.writerow((str(relative), reason))
                    errors.flush()
                except OSError as write_error:
                    msg = f"Cannot write into {out / ERRORS} ({type(write_error).__name__}: {write_error})."
                    raise InferenceFailedError(msg) from write_error
                result.failed.append((str(relative), reason))
                continue
            try:
                prediction = predictor.predict(image)
            except Exception as error:
                msg = (
                    f"Inference failed on {path} ({type(error).__name__}: {error}). The {len(result.rows)} images "
                    f"scored before it are in {out / SCORES}."
                )
                raise InferenceFailedError(msg) from error
            score = _first(prediction.pred_score)
            label = bool(_first(prediction.pred_label))
            try:
                _save_atomically(overlay(display, np.asarray(prediction.anomaly_map)[0]), overlay_path(out, relative))
                score_writer.writerow((str(relative), f"{score:.6f}", int(label)))
                scores.flush()
            except OSError as error:  # disk full, folder removed, permissions
                msg = f"Cannot write the results of {path} into {out} ({type(error).__name__}: {error})."
                raise InferenceFailedError(msg) from error
            result.rows.append((str(relative), score, label))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 all images scored; 1 some files skipped (named in errors.csv); 2 nothing run "
        "(bad arguments, unloadable or not an AAND model, no images, --out not empty, taken, read-only or full); "
        "3 the run stopped (model, device or writing failed; earlier rows are kept).",
    )
    parser.add_argument("--model", required=True, help="exported model: model.xml (OpenVINO IR) or model.onnx")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="new or empty output folder for scores.csv, errors.csv, overlays")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU or AUTO (default CPU)")
    parser.add_argument(
        "--precision",
        default="f32",
        choices=["f32", "bf16", "f16", "auto"],
        help="INFERENCE_PRECISION_HINT (default f32)",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="size images are resized to on the host (default: read from the model)",
    )
    parser.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="progress bar on stderr (auto: only when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    try:
        result = run(
            args.model,
            args.images,
            args.out,
            args.device,
            args.precision,
            tuple(args.input_size) if args.input_size else None,
            {"auto": None, "always": True, "never": False}[args.progress],
        )
    except InferInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_RUN
    except InferenceFailedError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INFERENCE_FAILED
    anomalous = sum(label for _, _, label in result.rows)
    skipped = f", {len(result.failed)} skipped (unreadable, listed in {result.out / ERRORS})" if result.failed else ""
    print(
        f"{len(result.rows)} images scored, {anomalous} anomalous{skipped}; scores in {result.out / SCORES}, "
        f"overlays in {result.out / OVERLAYS}"
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
