"""How the teacher sees background and object under ImageNet's and its own normalisation (demo object categories).

AAND's anomaly map is ``1 - cos`` between teacher and student features, so what matters is how much a feature
vector's *direction* varies where the image does not: on a flat, evenly lit table a teacher whose features turn
from one position to the next (sensor grain, illumination ramp) gives the student nothing predictable to learn,
and the map fires there. For each normalisation, teacher layer and object category this script reports, on the
first training images, the median feature norm on background and object, and the mean cosine between
horizontally neighbouring background positions (1 = the same direction everywhere on the table).

    python benchmarks/teacher_features.py --data datasets/demo --categories screw hex_nut \
        --output benchmarks/results/teacher_features.md
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from anomalib_aand.components.teacher import build_teacher, load_teacher_weights, teacher_normalization
from anomalib_aand.tools.demo import object_masks


def load_images(root: Path, keys: Sequence[str], size: int) -> torch.Tensor:
    """``(N, 3, size, size)`` pixels in [0, 1] of the images named by ``object_masks.npz`` keys."""
    images = [Image.open(root / f"{key}.png").convert("RGB").resize((size, size)) for key in keys]
    return torch.stack([torch.from_numpy(np.asarray(i, np.float32) / 255).permute(2, 0, 1) for i in images])


def layer_statistics(features: torch.Tensor, silhouette: torch.Tensor) -> dict[str, float]:
    """Median norm on background / object, and background neighbour cosine, of one layer's ``(N, C, h, w)``."""
    cover = F.interpolate(silhouette, size=features.shape[-2:], mode="area")
    background, inside = cover == 0, cover > 0.5
    norm = features.norm(dim=1, keepdim=True)
    unit = F.normalize(features, dim=1)
    neighbours = (unit[..., 1:] * unit[..., :-1]).sum(1, keepdim=True)
    both = background[..., 1:] & background[..., :-1]
    return {
        "norm_background": float(norm[background].median()),
        "norm_object": float(norm[inside].median()),
        "neighbour_cos_background": float(neighbours[both].mean()),
    }


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    """One row per category, normalisation and layer."""
    torch.set_num_threads(args.threads)
    teacher = build_teacher(args.backbone, args.layers).eval()
    load_teacher_weights(teacher, args.backbone, args.weights)
    normalisations = {
        "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        "teacher": teacher_normalization(args.backbone),
    }
    rows = []
    for category in args.categories:
        masks = object_masks(args.data / category)
        keys = sorted(k for k in masks if k.startswith("train/good/"))[: args.images]
        if not keys:
            msg = f"No training silhouettes for {category!r} under {args.data}: generate it with anomalib_aand.demo."
            raise SystemExit(msg)
        pixels = load_images(args.data / category, keys, args.image_size)
        silhouette = torch.stack([torch.from_numpy(masks[k].astype(np.float32)) for k in keys])[:, None]
        for name, (mean, std) in normalisations.items():
            images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            with torch.no_grad():
                features = teacher(images)
            for layer, values in zip(args.layers, features.values(), strict=True):
                rows.append({"category": category, "normalization": name, "layer": layer})
                rows[-1].update(layer_statistics(values, silhouette))
    return rows


def report(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    """Markdown table of ``rows`` with the settings."""
    settings = (
        f"Teacher {args.backbone}, layers {', '.join(args.layers)}, first {args.images} training images per "
        f"category of {args.data}, {args.image_size} px."
    )
    header = (
        "| category | normalisation | layer | median norm, background | median norm, object | background/object "
        "| neighbour cosine, background |"
    )
    lines = [settings, "", header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["norm_background"] / r["norm_object"]
        lines.append(
            f"| {r['category']} | {r['normalization']} | {r['layer']} | {r['norm_background']:.1f} | "
            f"{r['norm_object']:.1f} | {ratio:.2f} | {r['neighbour_cos_background']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("datasets/demo"), help="demo data root")
    parser.add_argument("--categories", nargs="+", default=["screw", "hex_nut"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    parser.add_argument("--weights", default=None, help="local teacher weight file (default: offline package / hub)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="write the table here (markdown)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Measure and print (and optionally write) the table."""
    args = parse_args(argv)
    table = report(measure(args), args)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return table


if __name__ == "__main__":
    main()
