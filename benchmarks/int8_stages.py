"""Where does INT8 lose AAND's signal? FP32 against NNCF INT8, stage by stage, on a trained checkpoint.

The exported chain (pre-process -> teacher -> RAA -> student -> ``1 - cos`` map -> anomalib's post-processing)
is rebuilt as one graph whose outputs are every intermediate stage: teacher features, gates, amplified
features, student features, per-scale ``1 - cos``, the raw map and score, and anomalib's normalised score.
That graph goes through ONNX -> OpenVINO like anomalib's export and is quantised by ``--recipe``:

- ``anomalib``: ``nncf.quantize(model, dataset)`` with no option, which is what ``anomalib export
  --compression_type INT8_PTQ`` runs (anomalib 2.7, ``ExportMixin._post_training_quantization_ov``);
- ``aand``: the recipe of :func:`anomalib_aand.export.quantize` (what ``Aand.to_openvino`` runs).

Both calibrate on the category's training images (anomalib's ``val_split_mode=from_train``). Per stage it
prints how far INT8 is from FP32 (relative L2 error, mean per-location cosine of the channel vectors) and
the image AUROC of that stage's signal (per-scale and raw map: max over the image), so the table shows where
the anomaly signal dies. ``1 - cos (float, from INT8 features)`` recomputes the distance in float64 from
the INT8 graph's amplified and student features: it separates the error of the quantised convolutions from
the error of quantising the cosine itself.

    python benchmarks/int8_stages.py --ckpt CKPT --root datasets/demo --category brick --recipe anomalib
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.data.utils import read_image
from export_accuracy import auroc
from torch import nn

from anomalib_aand import Aand

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


class StageProbe(nn.Module):
    """The exported chain of an ``Aand`` module, returning every stage as a named output."""

    def __init__(self, module: Aand) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Outputs in the order of :meth:`names`."""
        model = self.module.model
        inputs = self.module.pre_processor(images)
        teacher = model.extract(inputs)
        amplified, gates = model.amplify(teacher)
        student = model.distill(amplified)
        distances = [1 - F.cosine_similarity(a, s, dim=1).unsqueeze(1) for a, s in zip(amplified, student, strict=True)]
        anomaly_map = model.anomaly_map_generator(amplified, student, inputs.shape[-2:])
        score = torch.amax(anomaly_map, dim=(-2, -1))
        post = self.module.post_processor(InferenceBatch(pred_score=score, anomaly_map=anomaly_map))
        return (*teacher, *gates, *amplified, *student, *distances, anomaly_map, score, post.pred_score)

    @staticmethod
    def names(scales: int) -> list[str]:
        """Output names, shallow scale first."""
        per_scale = ("teacher", "gate", "amplified", "student", "1 - cos")
        return [f"{stage} s{s}" for stage in per_scale for s in range(1, scales + 1)] + [
            "raw map",
            "raw score",
            "normalised score",
        ]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """Raw images in [0, 1], resized to ``size``, as one NCHW batch."""
    return torch.stack(
        [F.interpolate(read_image(p, as_tensor=True)[None], size=size, mode="bilinear")[0] for p in paths]
    )


def image_signal(values: np.ndarray) -> np.ndarray:
    """One number per image: the maximum of a map, the value of a score."""
    return values.reshape(len(values), -1).max(axis=1)


def compare(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    """Relative L2 error and, for feature maps, the mean cosine of INT8 and FP32 channel vectors per location."""
    fp32, int8 = fp32.astype(np.float64), int8.astype(np.float64)
    row = {"rel. L2 error": float(np.linalg.norm(int8 - fp32) / max(np.linalg.norm(fp32), 1e-30))}
    if fp32.ndim == 4 and fp32.shape[1] > 1:
        dot = (fp32 * int8).sum(1)
        norms = np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1)
        row["cos(INT8, FP32)"] = float(np.mean(dot / np.maximum(norms, 1e-30)))
    return row


def float_distance(amplified: np.ndarray, student: np.ndarray) -> np.ndarray:
    """``1 - cos`` over channels in float64."""
    a, s = amplified.astype(np.float64), student.astype(np.float64)
    cos = (a * s).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(s, axis=1), 1e-8)
    return (1 - cos)[:, None]


def run(args: argparse.Namespace) -> tuple[list[dict[str, object]], str]:
    """Rows of the stage table and its header."""
    import openvino as ov

    from anomalib_aand.export import quantize

    module = Aand.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    size = tuple(module.input_size or (256, 256))
    scales = len(module.model.channels)
    names = StageProbe.names(scales)
    folder = args.root / args.category
    test_paths = _images(folder / "test")
    labels = np.asarray([p.parent.name != "good" for p in test_paths])
    test = load(test_paths, size)
    calibration = load(_images(folder / "train")[: args.calibration_size], size)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "probe.onnx"
        torch.onnx.export(
            StageProbe(module).eval(),
            (test[:1],),
            str(onnx_path),
            input_names=["input"],
            output_names=[n.replace(" ", "_") for n in names],
            opset_version=18,
            dynamo=True,
        )
        fp32_model = ov.convert_model(onnx_path)
        int8_model = quantize(fp32_model, [image[None].numpy() for image in calibration], recipe=args.recipe)
        core = ov.Core()
        outputs = {}
        for precision, graph in (("FP32", fp32_model), ("INT8", int8_model)):
            compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            results = [compiled(image[None].numpy()) for image in test]
            outputs[precision] = {
                name: np.concatenate([r[compiled.outputs[i]] for r in results]) for i, name in enumerate(names)
            }
    for s in range(1, scales + 1):
        for out in outputs.values():
            out[f"1 - cos (float, from INT8 features) s{s}"] = float_distance(
                out[f"amplified s{s}"], out[f"student s{s}"]
            )
    rows = []
    for name in outputs["INT8"]:
        fp32 = outputs["FP32"][name]
        int8 = outputs["INT8"][name]
        row: dict[str, object] = {"stage": name, **compare(fp32, int8)}
        row["FP32 mean"] = float(fp32.mean())
        row["INT8 mean"] = float(int8.mean())
        if name.startswith(("gate", "1 - cos", "raw", "normalised")):
            row["image AUROC FP32"] = auroc(image_signal(fp32), labels)
            row["image AUROC INT8"] = auroc(image_signal(int8), labels)
        rows.append(row)
    post = module.post_processor
    header = (
        f"{args.category}: {len(labels)} test images ({int(labels.sum())} defective), backbone "
        f"{module.hparams.backbone}, input {size[0]}x{size[1]}, INT8 recipe {args.recipe!r} calibrated on "
        f"{len(calibration)} training images. Normalisation baked in the graph: image min/max/threshold "
        f"{float(post.image_min):.4f} / {float(post.image_max):.4f} / {float(post.image_threshold):.4f}; "
        f"raw score FP32 {outputs['FP32']['raw score'].min():.4f}..{outputs['FP32']['raw score'].max():.4f}, "
        f"INT8 {outputs['INT8']['raw score'].min():.4f}..{outputs['INT8']['raw score'].max():.4f}"
    )
    return rows, header


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--recipe", choices=["anomalib", "aand"], default="anomalib")
    parser.add_argument("--calibration-size", type=int, default=30, help="anomalib: half the 60 training images")
    parser.add_argument("--out", type=Path, default=None, help="folder for int8_stages-<recipe>.md/.json")
    args = parser.parse_args()
    rows, header = run(args)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"int8_stages-{args.category}-{args.recipe}.md").write_text("\n".join(lines) + "\n")
        (args.out / f"int8_stages-{args.category}-{args.recipe}.json").write_text(
            json.dumps({"header": header, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
