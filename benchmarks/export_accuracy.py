"""Accuracy of the exported AAND model in FP32, FP16 and INT8 (NNCF post-training quantisation) against torch.

Trains AAND on one MVTec-layout category (or loads ``--ckpt``), exports the whole anomalib chain to ONNX
once, and builds the three OpenVINO IRs with the calls anomalib's export makes: ``convert_model`` and
``save_model`` (``compress_to_fp16`` for FP16), and ``nncf.quantize`` for INT8, calibrated on the
category's *training* images (anomalib's ``INT8_PTQ`` calibrates on the validation split). Reports
image and pixel AUROC per runtime and the largest score / map difference from FP32.

    python -m anomalib_aand.tools.demo --root datasets/demo --categories brick
    python benchmarks/export_accuracy.py --root datasets/demo --category brick --out results/export_accuracy
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image, read_mask
from anomalib.engine import Engine
from torchmetrics.classification import BinaryAUROC

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


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve."""
    return float(BinaryAUROC()(torch.as_tensor(scores).flatten(), torch.as_tensor(targets).flatten().long()))


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--ckpt", type=Path, default=None, help="trained checkpoint (default: train one)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--stage1-epochs", type=int, default=5)
    parser.add_argument("--stage2-epochs", type=int, default=10)
    parser.add_argument("--calibration-size", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("results/export_accuracy"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import nncf
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = args.ckpt or train(args, workdir)
        model = Aand.load_from_checkpoint(checkpoint, map_location="cpu").eval()
        size = tuple(model.input_size)
        images, labels, masks = test_set(args.root, args.category, size)
        onnx_path = model.to_onnx(workdir / "export")
        fp32 = ov.convert_model(onnx_path)
        calibration = [
            torch.nn.functional.interpolate(read_image(p, as_tensor=True)[None], size=size, mode="bilinear").numpy()
            for p in _images(args.root / args.category / "train")[: args.calibration_size]
        ]
        int8 = nncf.quantize(fp32, nncf.Dataset(calibration), subset_size=len(calibration))
        core = ov.Core()
        ov.save_model(fp32, workdir / "fp32.xml", compress_to_fp16=False)
        ov.save_model(fp32, workdir / "fp16.xml", compress_to_fp16=True)
        ov.save_model(int8, workdir / "int8.xml", compress_to_fp16=False)
        with torch.no_grad():
            torch_out = model(images)
        outputs = {
            "torch": {
                "pred_score": torch_out.pred_score.numpy().reshape(-1),
                "anomaly_map": torch_out.anomaly_map.numpy(),
            }
        }
        for name in ("fp32", "fp16", "int8"):
            compiled = core.compile_model(workdir / f"{name}.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            result = [compiled(image[None].numpy()) for image in images]
            outputs[f"OpenVINO {name.upper()}"] = {
                "pred_score": np.concatenate([r["pred_score"].reshape(-1) for r in result]),
                "anomaly_map": np.concatenate([r["anomaly_map"] for r in result]),
            }
    reference = outputs["OpenVINO FP32"]
    rows = []
    for name, out in outputs.items():
        rows.append(
            {
                "runtime": name,
                "image_AUROC": auroc(out["pred_score"], labels),
                "pixel_AUROC": auroc(out["anomaly_map"], masks),
                "max |score - FP32|": float(np.abs(out["pred_score"] - reference["pred_score"]).max()),
                "max |map - FP32|": float(np.abs(out["anomaly_map"] - reference["anomaly_map"]).max()),
                "labels = FP32": float(np.mean((out["pred_score"] >= 0.5) == (reference["pred_score"] >= 0.5))),
            }
        )
    header = (
        f"{args.category}: {len(labels)} test images ({int(labels.sum())} defective), {args.backbone}, "
        f"input {size[0]}x{size[1]}, INT8 calibrated on {len(calibration)} training images"
    )
    lines = [header, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += [
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in rows
    ]
    (args.out / "export_accuracy.md").write_text("\n".join(lines) + "\n")
    (args.out / "export_accuracy.json").write_text(
        json.dumps({"header": header, "rows": rows, "load": os.getloadavg()}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
