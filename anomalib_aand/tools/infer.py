"""Edge inference: run an exported AAND model (OpenVINO IR or ONNX) on a folder of images, without Lightning.

    python -m anomalib_aand.tools.infer --model weights/openvino/model.xml --images DIR --out DIR [--device CPU]

Written for a line that runs it unattended. Every image under ``--images`` (searched recursively) is read
with its EXIF orientation applied, resized on the host to the model's input size (memory stays bounded
whatever the image size) and scored with anomalib's ``OpenVINOInferencer``. ``--out`` must be new or empty
(results of two runs are never mixed); it receives:

- ``scores.csv``: one row ``image,score,label`` per image, appended and flushed as soon as the image is
  scored, so a crash or kill loses at most the image in flight. Scores are anomalib's normalised scores:
  0.5 is the threshold learnt on the validation images.
- ``errors.csv``: one row ``image,error`` per file that could not be read (corrupt, truncated, not an
  image); such files are skipped, named on stderr and counted.
- ``overlays/<relative path>_overlay.png``: the anomaly map as a heat map over the image, in a tree that
  mirrors ``--images`` with the file's extension kept (``a/b.png`` -> ``overlays/a/b.png_overlay.png``),
  so no two inputs share an output. Longest side at most 1024 px.

``--out`` is never read as input, nor is any earlier results folder (``scores.csv`` beside ``overlays/``)
lying under ``--images``.

Exit codes: 0 every image scored; 1 some files were skipped (see errors.csv), the others are scored;
2 nothing was run (bad arguments, missing or unloadable model, no images, ``--out`` not empty); 3 the run
stopped: the model or device failed, or results could not be written (the rows written before are kept).

OpenVINO keeps compiled models in ``./openvino_cache`` (anomalib's choice, in the working directory).
"""

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageOps
from tqdm import tqdm

from anomalib_aand.workarounds import quiet_anomalib_import

with quiet_anomalib_import():
    from anomalib.deploy import OpenVINOInferencer
    from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SCORES = "scores.csv"
ERRORS = "errors.csv"
OVERLAYS = "overlays"
OVERLAY_MAX_SIDE = 1024
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
    """``OpenVINOInferencer`` for an IR (``.xml``) or ONNX file.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32`` (default) matches the torch model;
    ``auto`` lets OpenVINO choose (bf16 on CPUs that have it, f16 on GPUs: faster, scores differ by ~1e-2).
    """
    path = Path(model)
    if not path.is_file():
        msg = f"Model file {str(path)!r} does not exist. Export one with `anomalib export --export_type openvino ...`."
        raise InferInputError(msg)
    config = None if precision == "auto" else {"INFERENCE_PRECISION_HINT": precision}
    return OpenVINOInferencer(path=path, device=device, config=config)


def model_input_size(inferencer: OpenVINOInferencer) -> tuple[int, int] | None:
    """(height, width) the exported graph works at, or None when the graph does not fix it.

    That is its fixed input size, or else the size of its anomaly map: a graph with anomalib's Resize
    takes any size and returns maps at the training size.
    """
    compiled = inferencer.model
    shapes = [compiled.input(0).get_partial_shape()]
    shapes += [output.get_partial_shape() for output in compiled.outputs if "anomaly_map" in output.get_names()]
    for shape in shapes:
        if shape.rank.is_static and len(shape) == 4 and shape[2].is_static and shape[3].is_static:
            return shape[2].get_length(), shape[3].get_length()
    return None


def is_results_folder(folder: Path) -> bool:
    """A results folder of this tool: ``scores.csv`` beside ``overlays/``."""
    return (folder / SCORES).is_file() and (folder / OVERLAYS).is_dir()


def find_images(images: str | Path, out: str | Path | None = None) -> list[Path]:
    """Image files under ``images`` (recursively, sorted), leaving out ``out`` and earlier results folders."""
    images = Path(images)
    if not images.is_dir():
        msg = f"--images {str(images)!r} is not a folder."
        raise InferInputError(msg)
    skipped = {Path(out).resolve()} if out is not None else set()
    found = []
    for folder, subfolders, files in os.walk(images):
        here = Path(folder)
        subfolders[:] = sorted(
            name for name in subfolders if (here / name).resolve() not in skipped and not is_results_folder(here / name)
        )
        found += [here / name for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def overlay_path(out: Path, relative: Path) -> Path:
    """``out/overlays/<relative>_overlay.png``: mirrors the input tree and keeps the extension, so it is unique."""
    return out / OVERLAYS / relative.parent / f"{relative.name}_overlay.png"


def load_image(path: Path, input_size: tuple[int, int]) -> tuple[np.ndarray, Image.Image]:
    """The model input (``input_size`` (H, W), float32 in [0, 1]) and an upright display copy of ``path``.

    EXIF orientation is applied first. The decoded full-size image lives only inside this function: its
    8-bit pixels are the largest allocation of a run, whatever the image size (the model sees ``input_size``).
    """
    with Image.open(path) as image:
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
            "new one. Give a new or empty folder (e.g. one per run: --out results/$(date +%Y%m%d-%H%M%S)), or "
            "move the old results away."
            if out.is_dir()
            else f"--out {str(out)!r} is a file, not a folder. Give a new or empty folder."
        )
        raise InferInputError(msg)


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
    if input_size is None and isinstance(predictor, OpenVINOInferencer):
        input_size = model_input_size(predictor)
    if input_size is None:
        msg = "Cannot tell the model's input size from the model; pass --input-size HEIGHT WIDTH."
        raise InferInputError(msg)
    result = RunResult(out=out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / SCORES).open("w", newline="") as scores, (out / ERRORS).open("w", newline="") as errors:
        score_writer = csv.writer(scores)
        error_writer = csv.writer(errors)
        for file, header in ((scores, ("image", "score", "label")), (errors, ("image", "error"))):
            csv.writer(file).writerow(header)
            file.flush()
        for path in tqdm(paths, desc="images", unit="img", disable=None if progress is None else not progress):
            relative = path.relative_to(images)
            try:
                image, display = load_image(path, input_size)
            except Exception as error:  # noqa: BLE001  PIL raises many types for unreadable files
                reason = f"{type(error).__name__}: {error}"
                tqdm.write(f"skipped {path}: cannot read it ({reason})", file=sys.stderr)
                error_writer.writerow((str(relative), reason))
                errors.flush()
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
        "(bad arguments, unloadable model, no images, --out not empty); 3 the run stopped (model, device or "
        "writing failed; earlier rows are kept).",
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
