"""How much of each training image the automatic foreground mask keeps (``foreground_mask: true``).

For textures the mask must be the whole image; for objects, the object. Reports, per category folder, the
mean, minimum and maximum foreground share over the ``train/good`` images for the estimator as it is
(``ForegroundEstimator()``) and for the same rule without its contrast test (``min_contrast=0``, the rule
before issue 16), which splits textures with an illumination gradient into arbitrary halves.

    python benchmarks/foreground.py datasets/demo/brick datasets/demo/grass datasets/demo/gravel
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from anomalib_aand.components.synthesis import IMAGE_SUFFIXES, ForegroundEstimator


def shares(folder: Path, estimator: ForegroundEstimator, size: int) -> list[float]:
    """Foreground share of every training image of one category, at ``size`` x ``size`` pixels."""
    paths = sorted(p for p in (folder / "train" / "good").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    result = []
    for path in paths:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
        image = F.interpolate(image.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", antialias=True)
        result.append(float(estimator(image).mean()))
    return result


def main(argv: Sequence[str] | None = None) -> str:
    """Print a markdown table of foreground shares per category and rule."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path, help="MVTec-layout category folders")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    rules = {
        "contrast test (now)": ForegroundEstimator(),
        "no contrast test (before)": ForegroundEstimator(min_contrast=0.0),
    }
    lines = ["| category | rule | images | mean share | min | max |", "|---|---|---|---|---|---|"]
    for folder in args.categories:
        for name, estimator in rules.items():
            values = shares(folder, estimator, args.image_size)
            summary = f"{np.mean(values):.3f} | {min(values):.3f} | {max(values):.3f}"
            lines.append(f"| {folder.name} | {name} | {len(values)} | {summary} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
