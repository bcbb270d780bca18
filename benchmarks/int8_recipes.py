"""Which NNCF settings keep AAND's accuracy in INT8: one trained checkpoint, several quantisation recipes.

Exports the checkpoint's FP32 IR once (``Aand.to_openvino``), then quantises it with each recipe below, on the
calibration images ``anomalib export --compression_type INT8_PTQ`` uses (the validation split taken from the
training images), and reports image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) of every IR on the category's
test split, with the drop from FP32. Every recipe keeps the float tail of :mod:`anomalib_aand.export` (the
cosine distance and what follows it stay in float) and adds one lever:

- ``tail``: the tail alone (the package's first recipe);
- ``minmax``: activation ranges from the min / max over all calibration images instead of NNCF's mean of the
  per-image extremes (defects drive features past the normal range; a wider range clips them less);
- ``mixed``: NNCF's ``MIXED`` preset (asymmetric activation ranges, for signed feature maps);
- ``bias``: NNCF's full bias correction instead of the fast one;
- ``float-depthwise``: Lite0's depthwise convolutions (``GroupConvolution``) left in float too (the package's
  recipe now);
- ``float-depthwise+minmax``, ``float-depthwise+bias``: two levers together;
- ``float-fine``: ``float-depthwise`` and every convolution at the finest feature scale's resolution or above
  (output of at least 64 x 64 positions: teacher stem to the stride-4 layer, RAA and student at that scale);
- ``float-fine-student``: ``float-depthwise`` and only the student's last convolutions at the finest scale
  (``float-fine`` without the convolutions the package keeps in float);
- ``minmax+mixed``: the two range levers together;
- ``package+overflow``: the package's float operations, and every quantised convolution's weights on 7 bits
  (NNCF's ``overflow_fix=ENABLE``; its default does it for the first layer only): CPUs without VNNI (avx2,
  avx512 before VNNI) multiply 8-bit values through 16-bit intermediate sums that can saturate, which 7-bit
  weights rule out; calibrate it with ``--synthetic-calibration`` to compare it with ``package``;
- ``package``: exactly what ``Aand.to_openvino(compression_type=INT8_PTQ)`` runs
  (:func:`anomalib_aand.export.quantize`): ``float-fine``, calibrated on the calibration images plus a copy of
  each with a synthetic anomaly.

The other recipes calibrate on the calibration images alone, or with ``--synthetic-calibration`` on the package's
calibration set. Besides the accuracy it reports how far INT8 moves the good test images' scores: the mean
``|INT8 - FP32|`` score over the good images divided by the spread (std) of their FP32 scores; at 1 the
quantisation noise is as large as the differences between normal images, and rankings against weak defects
reshuffle.

    python benchmarks/int8_recipes.py --root datasets/demo --category gravel --ckpt CKPT --out results/int8_recipes
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from export_accuracy import aupro, auroc, calibration_data, markdown_table, predict, test_set

from anomalib_aand import Aand
from anomalib_aand.export import SyntheticAnomalyCalibration, fine_convolutions, float_scope, float_tail, quantize


def _recipes() -> dict[str, Callable[[Any], dict[str, Any]]]:
    """Each recipe: a function of the FP32 ``ov.Model`` giving ``nncf.quantize`` keyword arguments."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    def tail(model: Any, types: tuple[str, ...] = (), names: list[str] | None = None) -> nncf.IgnoredScope:  # noqa: ANN401
        return nncf.IgnoredScope(names=float_tail(model) + (names or []), types=list(types), validate=False)

    def fine(model: Any) -> list[str]:  # noqa: ANN401
        """Convolutions whose output has at least the finest feature scale's resolution (stride <= 4 at 256 px)."""
        names = []
        for op in model.get_ordered_ops():
            shape = op.get_output_partial_shape(0)
            if op.get_type_name() in {"Convolution", "GroupConvolution"} and shape.rank.get_length() == 4:
                height, width = shape[2], shape[3]
                if height.is_static and width.is_static and height.get_length() * width.get_length() >= 64 * 64:
                    names.append(op.get_friendly_name())
        return names

    minmax = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    return {
        "tail": lambda m: {"ignored_scope": tail(m)},
        "minmax": lambda m: {"ignored_scope": tail(m), "advanced_parameters": minmax},
        "mixed": lambda m: {"ignored_scope": tail(m), "preset": nncf.QuantizationPreset.MIXED},
        "bias": lambda m: {"ignored_scope": tail(m), "fast_bias_correction": False},
        "float-depthwise": lambda m: {"ignored_scope": tail(m, ("GroupConvolution",))},
        "float-depthwise+minmax": lambda m: {
            "ignored_scope": tail(m, ("GroupConvolution",)),
            "advanced_parameters": minmax,
        },
        "float-depthwise+bias": lambda m: {
            "ignored_scope": tail(m, ("GroupConvolution",)),
            "fast_bias_correction": False,
        },
        "float-fine": lambda m: {"ignored_scope": tail(m, ("GroupConvolution",), fine(m))},
        "float-fine-student": lambda m: {
            "ignored_scope": tail(
                m, ("GroupConvolution",), sorted(set(fine(m)) - set(fine_convolutions(m, float_tail(m))))
            )
        },
        "package+overflow": lambda m: {
            "ignored_scope": float_scope(m),
            "advanced_parameters": AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        },
        "minmax+mixed": lambda m: {
            "ignored_scope": tail(m),
            "preset": nncf.QuantizationPreset.MIXED,
            "advanced_parameters": minmax,
        },
    }


def evaluate(compiled: Any, images: Any, labels: np.ndarray, masks: np.ndarray) -> tuple[dict[str, float], np.ndarray]:  # noqa: ANN401
    """Image AUROC, pixel AUROC and AUPRO of one compiled IR on the test split, and its image scores."""
    scores, maps = predict(compiled, images)
    metrics = {"image_AUROC": auroc(scores, labels), "pixel_AUROC": auroc(maps, masks), "AUPRO": aupro(maps, masks)}
    return metrics, scores


def good_score_shift(scores: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> float:
    """Mean |scores - reference| over the good images, in units of the reference scores' std over them."""
    good = ~labels.astype(bool)
    return float(np.abs(scores[good] - reference[good]).mean() / reference[good].std())


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint trained by configs/demo.yaml")
    parser.add_argument("--recipes", nargs="+", default=None, help="default: all")
    parser.add_argument("--val-split-ratio", type=float, default=0.5, help="share of training images calibrating INT8")
    parser.add_argument(
        "--calibration-seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds of the random train/validation split: each gives another calibration subset",
    )
    parser.add_argument(
        "--synthetic-calibration",
        action="store_true",
        help="calibrate every recipe on the package's set: the images plus a copy of each with a synthetic anomaly",
    )
    parser.add_argument("--out", type=Path, default=Path("results/int8_recipes"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import nncf
    import openvino as ov

    recipes = {**_recipes(), "package": None}
    chosen = args.recipes or list(recipes)
    unknown = sorted(set(chosen) - set(recipes))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {list(recipes)}")
    model = Aand.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    images, labels, masks = test_set(args.root, args.category, tuple(model.input_size))
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ["FP32", *chosen]}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = core.read_model(model.to_openvino(Path(tmp)))
        metrics, reference_scores = evaluate(core.compile_model(fp32, "CPU", config), images, labels, masks)
        runs["FP32"].append({**metrics, "good_score_shift": 0.0, "seed": -1})
        for seed in args.calibration_seeds:
            calibration = calibration_data(args.root, args.category, args.val_split_ratio, seed)
            calibration.setup("fit")
            for name in chosen:
                start = time.perf_counter()
                if name == "package":
                    quantised = quantize(fp32.clone(), calibration.val_dataloader(), transform=lambda b: b["image"])
                else:
                    loader = calibration.val_dataloader()
                    if args.synthetic_calibration:
                        dataset = nncf.Dataset(SyntheticAnomalyCalibration(loader, lambda b: b["image"]))
                    else:
                        dataset = nncf.Dataset(loader, lambda batch: batch["image"])
                    quantised = nncf.quantize(fp32.clone(), dataset, **recipes[name](fp32))
                seconds = time.perf_counter() - start
                metrics, scores = evaluate(core.compile_model(quantised, "CPU", config), images, labels, masks)
                shift = good_score_shift(scores, reference_scores, labels)
                runs[name].append({**metrics, "good_score_shift": shift, "seed": seed, "quantise_s": seconds})
                print(name, runs[name][-1], flush=True)
    reference = runs["FP32"][0]
    rows = []
    for name, values in runs.items():
        row: dict[str, object] = {"recipe": name}
        for key in ("image_AUROC", "pixel_AUROC", "AUPRO"):
            series = [v[key] for v in values]
            spread = f" ± {statistics.stdev(series):.4f}" if len(series) > 1 else ""
            row[key] = f"{statistics.fmean(series):.4f}{spread}"
            row[f"{key} drop (worst)"] = max(reference[key] - v for v in series)
        row["good score shift / spread"] = statistics.fmean(v["good_score_shift"] for v in values)
        rows.append(row)
    header = (
        f"{args.category}: {len(labels)} test images ({int(labels.sum())} defective), checkpoint {args.ckpt}; INT8 "
        f"calibrated on {len(calibration.val_dataloader().dataset)} training images"
        f"{' and a synthetic-anomaly copy of each' if args.synthetic_calibration else ''} (val_split_ratio "
        f"{args.val_split_ratio}), split seeds {args.calibration_seeds}: cells are mean ± std over the seeds, "
        f"drops the largest over the seeds. CPU {platform.processor() or platform.machine()}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    lines = markdown_table(header, rows)
    (args.out / "int8_recipes.md").write_text("\n".join(lines) + "\n")
    (args.out / "int8_recipes.json").write_text(json.dumps({"header": header, "runs": runs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
