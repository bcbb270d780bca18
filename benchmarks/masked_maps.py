"""What masking the *test* anomaly map with the object's foreground would change, from saved maps (no training).

AAND's false positives on the demo's screw lie on the light table (``benchmarks/map_errors.py``). This script
bounds what a test-time foreground mask could recover, before anyone builds one into the model: it reads the
maps ``benchmarks/accuracy.py --save-maps`` keeps, sets every pixel outside a foreground mask to the map's
minimum, and recomputes image AUROC (image score = the map's maximum), pixel AUROC and AUPRO (FPR limit 0.3).
Two masks, each dilated by ``--margin`` px at 256 px:

- ``estimator``: the package's ``ForegroundEstimator`` (Otsu on a blurred grey image) run on the test image;
- ``silhouette``: the demo generator's true object silhouette (an upper bound: no estimator is this good).

    python benchmarks/masked_maps.py --maps results/benchmark-seeds/maps --data datasets/demo \
        --categories hex_nut screw --models aand patchcore --seeds 0 1 2 --output results/masked_maps.md
"""

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from accuracy import data_root
from export_accuracy import aupro, auroc
from map_errors import image_key, saved_maps
from PIL import Image

from anomalib_aand.components.synthesis import ForegroundEstimator
from anomalib_aand.tools.demo import object_masks

MASKS = ("none", "estimator", "silhouette")
METRICS = ("image_AUROC", "pixel_AUROC", "AUPRO")


def foreground_masks(paths: Sequence[str], silhouettes: dict[str, np.ndarray], size: int, margin: int) -> dict:
    """``{mask name: (N, size, size) bool}`` for the test images at ``paths``, dilated by ``margin`` px."""
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)), np.float32) / 255)
            for p in paths
        ]
    ).permute(0, 3, 1, 2)
    truth = [Image.fromarray(silhouettes[image_key(p)].astype(np.uint8) * 255).resize((size, size)) for p in paths]
    found = {
        "estimator": ForegroundEstimator()(pixels),
        "silhouette": torch.from_numpy(np.stack([np.asarray(t) > 127 for t in truth])).float()[:, None],
    }
    width = round(margin * size / 256)
    grow = {k: F.max_pool2d(v, 2 * width + 1, stride=1, padding=width) if width else v for k, v in found.items()}
    return {"none": np.ones((len(paths), size, size), bool)} | {k: v[:, 0].numpy() > 0 for k, v in grow.items()}


def evaluate(maps_file: Path, silhouettes: dict[str, np.ndarray], margin: int) -> dict[str, dict[str, float]]:
    """``{mask: {metric: value}}`` for one saved map file."""
    with np.load(maps_file) as stored:
        maps = stored["anomaly_map"].astype(np.float32)
        truth = stored["gt_mask"].astype(bool)
        labels = stored["gt_label"].astype(bool)
        paths = [str(p) for p in stored["path"]]
    maps = (maps - maps.min()) / max(float(maps.max() - maps.min()), 1e-12)  # raw maps (PatchCore's) to [0, 1]
    masks = foreground_masks(paths, silhouettes, maps.shape[-1], margin)
    results = {}
    for name, keep in masks.items():
        masked = np.where(keep, maps, maps.min())
        results[name] = {
            "image_AUROC": auroc(masked.reshape(len(masked), -1).max(axis=1), labels),
            "pixel_AUROC": auroc(masked.ravel(), truth.ravel()),
            "AUPRO": aupro(masked, truth),
            "foreground_share": float(keep.mean()),
        }
    return results


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: dict, seeds: Sequence[int], margin: int) -> str:
    """Markdown: per model, category and mask, the mean ± std over seeds of each metric."""
    settings = (
        f"Test maps masked outside the foreground (dilated by {margin} px at 256 px); seeds "
        f"{', '.join(map(str, seeds))}. Image score = the masked map's maximum."
    )
    lines = [
        settings,
        "",
        "| model | category | mask | foreground share | " + " | ".join(METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for (model, category), per_seed in results.items():
        for mask in MASKS:
            rows = [per_seed[s][mask] for s in seeds]
            cells = [_cell([r[m] for r in rows]) for m in METRICS]
            share = statistics.fmean(r["foreground_share"] for r in rows)
            lines.append(f"| {model} | {category} | {mask} | {share:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """Evaluate every (model, category, seed) map file and print / write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=Path, required=True, help="the maps/ folder written by accuracy.py --save-maps")
    parser.add_argument("--data", type=Path, required=True, help="the demo data root of seed 0")
    parser.add_argument("--categories", nargs="+", default=["hex_nut", "screw"])
    parser.add_argument("--models", nargs="+", default=["aand", "patchcore"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--margin", type=int, default=8, help="dilation of every mask, px at 256 px")
    parser.add_argument("--output", type=Path, default=None, help="write the table here (markdown)")
    args = parser.parse_args(argv)
    results: dict = {}
    for model in args.models:
        for category in args.categories:
            for seed in args.seeds:
                maps_file = saved_maps(args.maps, model, category, seed)
                found = evaluate(maps_file, object_masks(data_root(args.data, category, seed) / category), args.margin)
                results.setdefault((model, category), {})[seed] = found
    table = report(results, args.seeds, args.margin)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return table


if __name__ == "__main__":
    main()
