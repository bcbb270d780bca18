"""Where a model's false-positive pixels sit on the demo's object categories: outline, object or background.

Reads the test anomaly maps that ``benchmarks/accuracy.py --save-maps`` keeps and the silhouettes the
demo generator writes beside each object category (``object_masks.npz``). For each model and category,
the maps are thresholded where a fixed fraction ``--fpr`` of all defect-free test pixels (good images,
and defective images outside their masks) lie above the threshold; those false-positive pixels are then
split by where they lie relative to the object's outline (band half-width ``--band`` px at 256 px, scaled):

- ``outline (object side)`` and ``outline (table side)``: within the band, inside / outside the silhouette;
- ``object interior``: on the object, farther from the outline;
- ``background``: the table, farther from the outline.

For each region: its share of the false positives, its share of the defect-free pixels (area), its own
false-positive rate, and its share of the false-positive mass (score above the threshold, summed).
A second table gives pixel AUROC on all pixels and on the object and outline band only.

    python benchmarks/map_errors.py --maps results/pilot-objects/maps --data datasets/demo \
        --categories hex_nut screw --models aand patchcore --seed 0 --output results/pilot-objects
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from accuracy import data_root
from export_accuracy import auroc
from PIL import Image
from scipy import ndimage

from anomalib_aand.tools.demo import object_masks

REGIONS = ("outline (object side)", "outline (table side)", "object interior", "background")


def regions(silhouette: np.ndarray, band: int) -> dict[str, np.ndarray]:
    """The four disjoint regions of an image around an object silhouette."""
    inner = ndimage.binary_erosion(silhouette, iterations=band, border_value=1)
    outer = ndimage.binary_dilation(silhouette, iterations=band)
    return {
        REGIONS[0]: silhouette & ~inner,
        REGIONS[1]: outer & ~silhouette,
        REGIONS[2]: inner,
        REGIONS[3]: ~outer,
    }


def image_key(image_path: str) -> str:
    """``.../test/good/000.png`` -> ``test/good/000`` (the key of ``object_masks.npz``)."""
    parts = Path(image_path).with_suffix("").parts
    return "/".join(parts[-3:])


def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)) > 127


def saved_maps(maps: Path, model: str, category: str, seed: int) -> Path:
    """The map file ``accuracy.py --save-maps`` wrote for (model, category, seed); exits with advice when missing."""
    maps_file = maps / model / f"{category}-seed{seed}.npz"
    if not maps_file.is_file():
        msg = f"{maps_file} is missing; run benchmarks/accuracy.py with --save-maps for {model} on {category}."
        raise SystemExit(msg)
    return maps_file


def analyse(maps_file: Path, silhouettes: dict[str, np.ndarray], fpr: float, band: int) -> dict:
    """False-positive split by region and pixel AUROC (all pixels / object and outline band) for one map file."""
    with np.load(maps_file) as stored:
        maps = stored["anomaly_map"].astype(np.float32)
        truth = stored["gt_mask"].astype(bool)
        paths = [str(p) for p in stored["path"]]
    size = maps.shape[-1]
    width = max(1, round(band * size / 256))
    where = {name: [] for name in REGIONS}
    for path in paths:
        split = regions(_fit(silhouettes[image_key(path)], maps.shape[-2:]), width)
        for name in REGIONS:
            where[name].append(split[name])
    where = {name: np.stack(masks) for name, masks in where.items()}
    negative = ~truth
    threshold = float(np.quantile(maps[negative], 1 - fpr))
    false_positive = negative & (maps > threshold)
    excess = np.where(false_positive, maps - threshold, 0.0)
    total_fp, total_mass, total_negative = false_positive.sum(), excess.sum(), negative.sum()
    split = {}
    for name, region in where.items():
        negatives_here = (negative & region).sum()
        split[name] = {
            "fp_share": float((false_positive & region).sum() / max(total_fp, 1)),
            "area_share": float(negatives_here / total_negative),
            "fpr": float((false_positive & region).sum() / max(negatives_here, 1)),
            "mass_share": float(excess[region].sum() / max(total_mass, 1e-12)),
        }
    on_object = where[REGIONS[0]] | where[REGIONS[1]] | where[REGIONS[2]]
    return {
        "threshold": threshold,
        "fpr": fpr,
        "band_px": width,
        "regions": split,
        "pixel_AUROC": auroc(maps.ravel(), truth.ravel()),
        "pixel_AUROC_object": auroc(maps[on_object], truth[on_object]),
    }


def report(results: dict, fpr: float, band: int) -> str:
    """Markdown tables of ``{model: {category: analyse(...)}}``."""
    lines = [
        (
            f"False-positive pixels at a fixed false-positive rate of {fpr:.0%} (over all defect-free test pixels), "
            f"split by region; outline band ±{band} px at 256 px. Each cell: share of the false positives "
            "(share of the defect-free area; the region's own FPR)."
        ),
        "",
        "| model | category | " + " | ".join(REGIONS) + " |",
        "|" + "---|" * (len(REGIONS) + 2),
    ]
    for model, per_category in results.items():
        for category, found in per_category.items():
            cells = [
                f"{r['fp_share']:.0%} ({r['area_share']:.0%}; {r['fpr']:.1%})"
                for r in (found["regions"][name] for name in REGIONS)
            ]
            lines.append(f"| {model} | {category} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Share of the false-positive mass (score above the threshold, summed) per region:",
        "",
        "| model | category | " + " | ".join(REGIONS) + " |",
        "|" + "---|" * (len(REGIONS) + 2),
    ]
    for model, per_category in results.items():
        for category, found in per_category.items():
            cells = [f"{found['regions'][name]['mass_share']:.0%}" for name in REGIONS]
            lines.append(f"| {model} | {category} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | category | pixel AUROC (all pixels) | pixel AUROC (object and outline band only) |",
        "|---|---|---|---|",
    ]
    for model, per_category in results.items():
        for category, found in per_category.items():
            lines.append(f"| {model} | {category} | {found['pixel_AUROC']:.3f} | {found['pixel_AUROC_object']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Analyse every (model, category) map file of one seed and write ``map_errors.md`` / ``.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=Path, required=True, help="the maps/ folder written by accuracy.py --save-maps")
    parser.add_argument("--data", type=Path, required=True, help="the demo data root the maps were made on")
    parser.add_argument("--categories", nargs="+", default=["hex_nut", "screw"])
    parser.add_argument("--models", nargs="+", default=["aand", "patchcore"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr", type=float, default=0.05, help="false-positive rate that sets each threshold")
    parser.add_argument("--band", type=int, default=4, help="outline band half-width in px at 256 px")
    parser.add_argument("--output", type=Path, default=None, help="folder for map_errors.md/.json (default: --maps/..)")
    args = parser.parse_args(argv)
    results: dict = {}
    for model in args.models:
        for category in args.categories:
            maps_file = saved_maps(args.maps, model, category, args.seed)
            silhouettes = object_masks(data_root(args.data, category, args.seed) / category)
            found = analyse(maps_file, silhouettes, args.fpr, args.band)
            results.setdefault(model, {})[category] = found
    table = report(results, args.fpr, args.band)
    output = args.output or args.maps.parent
    output.mkdir(parents=True, exist_ok=True)
    (output / "map_errors.md").write_text(table + "\n")
    (output / "map_errors.json").write_text(json.dumps(results, indent=1))
    print(table)
    return table


if __name__ == "__main__":
    main()
