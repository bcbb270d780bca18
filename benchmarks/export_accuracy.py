"""Accuracy of the exported AAND model in FP32, FP16 and INT8 against torch.

Trains AAND on one MVTec-layout category (or loads ``--ckpt``) and builds the OpenVINO IRs with the calls
``anomalib export --export_type openvino`` makes (``Aand.to_openvino``): FP32, ``--compression_type FP16`` and
``--compression_type INT8_PTQ`` (AAND's recipe), calibrated on the datamodule's validation split taken from the
*training* images (``val_split_mode=from_train``, as the README documents), and ``--compression_type INT8_ACQ``
(AAND's recipe under NNCF's accuracy control: image AUROC on the test split, ``--max-drop``; its test figures
are therefore not independent of its choice, unless ``--acq-holdout``: it then validates on the even-numbered
test images and every figure is computed on the odd-numbered ones). Reports image AUROC, pixel AUROC and
AUPRO (FPR limit 0.3) per runtime, the largest score / map difference from FP32 and how many convolutions
run in INT8, in ``export_accuracy.md`` and ``export_accuracy.json`` (with the command and the machine).

    python -m anomalib_aand.tools.demo --root datasets/demo --categories brick
    python benchmarks/export_accuracy.py --root datasets/demo --category brick --ckpt CKPT --out results/export_accuracy
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.data.utils import read_image, read_mask
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC
from common import auroc, calibration_data, load_average, provenance, provenance_lines

from anomalib_aand import Aand

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def train(args: argparse.Namespace, workdir: Path) -> Path:
    """Fit AAND on the category; returns the checkpoint."""
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = Aand(
        backbone=args.backbone, layers=args.layers, stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs
    )
    engine = Engine(default_root_dir=workdir, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    return Path(engine.trainer.checkpoint_callback.best_model_path)


def test_set(root: Path, category: str, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Raw test images at ``size``, image labels and pixel masks."""
    folder = root / category
    images, labels, masks = [], [], []
    for path in _images(folder / "test"):
        image = read_image(path, as_tensor=True)
        images.append(torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0])
        defect = path.parent.name
        labels.append(defect != "good")
        mask_path = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
        mask = (
            read_mask(mask_path, as_tensor=True).float()[None, None]
            if mask_path.exists()
            else torch.zeros(1, 1, *image.shape[-2:])
        )
        masks.append(torch.nn.functional.interpolate(mask, size=size, mode="nearest")[0, 0].numpy() > 0.5)
    return torch.stack(images), np.asarray(labels), np.stack(masks)


def half_test_root(root: Path, category: str, workdir: Path) -> Path:
    """A dataset root whose ``category`` has the same training images and the even-numbered test images only.

    Numbered in the order of :func:`test_set`; the files are copies (anomalib 2.7's MVTecAD skips links that
    point outside its root).
    """
    source, target = root / category, workdir / "even" / category
    tests = _images(source / "test")[::2]
    masks = [source / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in tests if p.parent.name != "good"]
    for path in [*_images(source / "train"), *tests, *masks]:
        copy = target / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return workdir / "even"


def predict(compiled: Any, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN401
    """Scores and anomaly maps of a compiled OpenVINO IR, one image at a time."""
    result = [compiled(image[None].numpy()) for image in images]
    return np.concatenate([r["pred_score"].reshape(-1) for r in result]), np.concatenate(
        [r["anomaly_map"] for r in result]
    )


def aupro(maps: np.ndarray, masks: np.ndarray) -> float:
    """Anomalib's AUPRO (FPR limit 0.3, as the model's evaluator) over all test images."""
    metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3, strict=False)
    maps_t = torch.as_tensor(maps).reshape(len(maps), *masks.shape[-2:])
    metric.update(
        ImageBatch(
            image=torch.zeros(len(maps), 3, *masks.shape[-2:]), anomaly_map=maps_t, gt_mask=torch.as_tensor(masks)
        )
    )
    return float(metric.compute())


def clamped(scores: np.ndarray, labels: np.ndarray) -> str:
    """How many good and defective images score at anomalib's clamp (normalised score 1.0), where they tie."""
    top = scores >= 1.0
    return f"{int((top & ~labels.astype(bool)).sum())} / {int((top & labels.astype(bool)).sum())}"


def int8_convolutions(model: Any) -> str:  # noqa: ANN401
    """How many of an ``ov.Model``'s convolutions read quantised (FakeQuantize) activations, of how many."""
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() in {"Convolution", "GroupConvolution"}]
    quantised = [op for op in convolutions if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    return f"{len(quantised)} / {len(convolutions)}"


def markdown_table(header: str, rows: list[dict[str, object]]) -> list[str]:
    """The header line, a blank line and ``rows`` as a Markdown table (floats to 4 decimals)."""
    lines = [header, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + [
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in rows
    ]


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--ckpt", type=Path, default=None, help="trained checkpoint (default: train one)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--stage1-epochs", type=int, default=5)
    parser.add_argument("--stage2-epochs", type=int, default=10)
    parser.add_argument("--val-split-ratio", type=float, default=0.5, help="share of training images calibrating INT8")
    parser.add_argument("--calibration-seed", type=int, default=0, help="seed of the random train/validation split")
    parser.add_argument("--max-drop", type=float, default=0.01, help="INT8_ACQ: largest image AUROC drop allowed")
    parser.add_argument(
        "--acq-holdout",
        action="store_true",
        help="INT8_ACQ validates on the even-numbered test images; report every runtime on the odd-numbered ones",
    )
    parser.add_argument("--out", type=Path, default=Path("results/export_accuracy"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source = provenance(__file__, argv)

    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = args.ckpt or train(args, workdir)
        model = Aand.load_from_checkpoint(checkpoint, map_location="cpu").eval()
        size = tuple(model.input_size)
        images, labels, masks = test_set(args.root, args.category, size)
        calibration = calibration_data(args.root, args.category, args.val_split_ratio, args.calibration_seed)
        xml = {
            "fp32": model.to_openvino(workdir / "fp32"),
            "fp16": model.to_openvino(workdir / "fp16", compression_type=CompressionType.FP16),
            "int8": model.to_openvino(
                workdir / "int8", compression_type=CompressionType.INT8_PTQ, datamodule=calibration
            ),
            "int8 acq": model.to_openvino(
                workdir / "int8_acq",
                compression_type=CompressionType.INT8_ACQ,
                datamodule=calibration_data(
                    half_test_root(args.root, args.category, workdir) if args.acq_holdout else args.root,
                    args.category,
                    args.val_split_ratio,
                    args.calibration_seed,
                ),
                metric=AUROC(fields=["pred_score", "gt_label"]),
                max_drop=args.max_drop,
            ),
        }
        core = ov.Core()
        n_calibration = len(calibration.val_dataloader().dataset)
        with torch.no_grad():
            torch_out = model(images)
        outputs = {
            "torch": {
                "pred_score": torch_out.pred_score.numpy().reshape(-1),
                "anomaly_map": torch_out.anomaly_map.numpy(),
            }
        }
        names = {"fp32": "OpenVINO FP32", "fp16": "OpenVINO FP16", "int8": "OpenVINO INT8 (AAND recipe)"}
        names["int8 acq"] = f"OpenVINO INT8_ACQ (AAND recipe, image AUROC max_drop {args.max_drop})"
        for key, name in names.items():
            graph = core.read_model(xml[key])
            scores, maps = predict(core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), images)
            outputs[name] = {"pred_score": scores, "anomaly_map": maps, "int8": int8_convolutions(graph)}
    if args.acq_holdout:
        labels, masks = labels[1::2], masks[1::2]
        outputs = {name: {k: v[1::2] if k != "int8" else v for k, v in out.items()} for name, out in outputs.items()}
    reference = outputs["OpenVINO FP32"]
    rows = []
    for name, out in outputs.items():
        rows.append(
            {
                "runtime": name,
                "image_AUROC": auroc(out["pred_score"], labels),
                "pixel_AUROC": auroc(out["anomaly_map"], masks),
                "AUPRO": aupro(out["anomaly_map"], masks),
                "max |score - FP32|": float(np.abs(out["pred_score"] - reference["pred_score"]).max()),
                "max |map - FP32|": float(np.abs(out["anomaly_map"] - reference["anomaly_map"]).max()),
                "labels = FP32": float(np.mean((out["pred_score"] >= 0.5) == (reference["pred_score"] >= 0.5))),
                "scores at 1.0 (good / defective)": clamped(out["pred_score"], labels),
                "convolutions in INT8": out.get("int8", "-"),
            }
        )
    header = (
        f"{args.category}: {len(labels)} test images ({int(labels.sum())} defective), {model.hparams.backbone}, "
        f"input {size[0]}x{size[1]}, INT8 calibrated on {n_calibration} training images (val_split_mode=from_train, "
        f"split seed {args.calibration_seed})"
    )
    if args.acq_holdout:
        header += "; INT8_ACQ validated on the even-numbered test images, every figure on the odd-numbered ones"
    lines = [*provenance_lines(source), "", *markdown_table(header, rows)]
    (args.out / "export_accuracy.md").write_text("\n".join(lines) + "\n")
    (args.out / "export_accuracy.json").write_text(
        json.dumps({**source, "header": header, "rows": rows, "load": load_average()}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
