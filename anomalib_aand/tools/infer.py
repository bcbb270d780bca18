"""Edge inference: run an exported AAND model (OpenVINO IR or ONNX) on a folder of images, without Lightning.

Uses anomalib's ``OpenVINOInferencer``. For every image it writes ``<name>_overlay.png`` (anomaly map as
a heat map over the image) into ``--out`` and one row ``image,score,label`` into ``--out/scores.csv``.
Scores are anomalib's normalised scores: 0.5 is the threshold learnt on the validation images.

    python -m anomalib_aand.tools.infer --model weights/openvino/model.xml --images DIR --out DIR [--device CPU]

OpenVINO keeps compiled models in ``./openvino_cache`` (anomalib's choice, in the working directory).
"""

import argparse
import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer
from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_inferencer(model: str | Path, device: str = "CPU", precision: str = "f32") -> OpenVINOInferencer:
    """``OpenVINOInferencer`` for an IR (``.xml``) or ONNX file.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32`` (default) matches the torch model;
    ``auto`` lets OpenVINO choose (bf16 on CPUs that have it, f16 on GPUs: faster, scores differ by ~1e-2).
    """
    path = Path(model)
    if not path.is_file():
        msg = f"Model file {str(path)!r} does not exist. Export one with `anomalib export --export_type openvino ...`."
        raise FileNotFoundError(msg)
    config = None if precision == "auto" else {"INFERENCE_PRECISION_HINT": precision}
    return OpenVINOInferencer(path=path, device=device, config=config)


def iter_images(folder: str | Path) -> Iterator[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"--images {str(folder)!r} is not a folder."
        raise NotADirectoryError(msg)
    yield from sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Heat map of the normalised ``anomaly_map`` (values in [0, 1]) over ``image`` (H, W, 3 in [0, 1])."""
    heat = visualize_anomaly_map((np.clip(anomaly_map.squeeze(), 0, 1) * 255).astype(np.uint8), colormap=True)
    base = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return overlay_image(base, heat.resize(base.size, Image.BILINEAR), alpha=alpha).convert("RGB")


def run(
    model: str | Path, images: str | Path, out: str | Path, device: str = "CPU", precision: str = "f32"
) -> list[tuple[str, float, bool]]:
    """Score every image in ``images``; write overlays and ``scores.csv`` to ``out``. Returns the rows."""
    inferencer = load_inferencer(model, device, precision)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, bool]] = []
    for path in iter_images(images):
        image = read_image(path, as_tensor=False)
        prediction = inferencer.predict(image)
        score, label = (
            float(np.asarray(prediction.pred_score).reshape(-1)[0]),
            bool(np.asarray(prediction.pred_label).reshape(-1)[0]),
        )
        name = str(path.relative_to(images)).replace("/", "_").rsplit(".", 1)[0]
        overlay(image, np.asarray(prediction.anomaly_map)[0]).save(out / f"{name}_overlay.png")
        rows.append((str(path.relative_to(images)), score, label))
    with (out / "scores.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "score", "label"])
        writer.writerows((name, f"{score:.6f}", int(label)) for name, score, label in rows)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model: model.xml (OpenVINO IR) or model.onnx")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for overlays and scores.csv")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU or AUTO (default CPU)")
    parser.add_argument(
        "--precision",
        default="f32",
        choices=["f32", "bf16", "f16", "auto"],
        help="INFERENCE_PRECISION_HINT (default f32)",
    )
    args = parser.parse_args(argv)
    rows = run(args.model, args.images, args.out, args.device, args.precision)
    anomalous = sum(label for _, _, label in rows)
    print(f"{len(rows)} images, {anomalous} anomalous; overlays and scores.csv in {args.out}")


if __name__ == "__main__":
    main()
