"""An embedded demo dataset in MVTec AD layout: three textures and two objects, all generated.

Texture categories (``brick``, ``grass``, ``gravel``) are made from the textures shipped in
scikit-image. Normal images are random 256 px windows of the 512 px texture with small camera
variation (flips, exposure, sensor noise). Defective images carry one defect of a kind a camera would
see on such a surface, drawn as a physical mark rather than as a noise blob:

- ``scratch``: a thin, smooth, light groove with a faint shadow;
- ``crack``: a jagged dark fracture that branches and tapers;
- ``hole``: a dark pit with an irregular rim, lit from one side;
- ``stain``: a translucent discolouration with a darker drying ring;
- ``contamination``: foreign particles and a fibre in a foreign colour, casting small shadows.

Object categories (``hex_nut``, ``screw``) are drawn procedurally, one object per image with pose
and lighting jitter, and carry ``scratch``, ``missing``, ``contamination`` or ``colour`` defects on
the object (see ``anomalib_aand.tools.demo_objects``).

The layout is what anomalib's ``MVTecAD`` reads unchanged::

    ROOT/CATEGORY/train/good/000.png
    ROOT/CATEGORY/test/good/000.png
    ROOT/CATEGORY/test/<defect>/000.png
    ROOT/CATEGORY/ground_truth/<defect>/000_mask.png

Output is deterministic for a seed. Command line::

    python -m anomalib_aand.tools.demo --root datasets/demo [--seed 0] [--categories brick hex_nut]
    python -m anomalib_aand.tools.demo --list
"""

import argparse
import json
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from anomalib_aand.tools.demo_objects import OBJECT_DEFECTS, OBJECTS, random_pose, render
from anomalib_aand.tools.drawing import blend as _blend
from anomalib_aand.tools.drawing import blob as _blob
from anomalib_aand.tools.drawing import mask as _mask
from anomalib_aand.tools.drawing import stroke as _stroke
from anomalib_aand.tools.drawing import walk as _walk

TEXTURES: dict[str, Callable[[], np.ndarray]] = {"brick": skdata.brick, "grass": skdata.grass, "gravel": skdata.gravel}
TINTS = {"brick": (1.0, 0.66, 0.52), "grass": (0.62, 0.9, 0.45), "gravel": (0.95, 0.9, 0.82)}
DEFECTS = ("scratch", "crack", "hole", "stain", "contamination")
CATEGORIES = (*TEXTURES, *OBJECTS)
MARKER = ".anomalib_aand_demo.json"

RGB = np.ndarray  # (H, W, 3) float in [0, 1]
Mask = np.ndarray  # (H, W) bool


# ----------------------------------------------------------------------------- normal images
def _normal_image(texture: np.ndarray, tint: Sequence[float], size: int, rng: np.random.Generator) -> RGB:
    """A random window of the texture as a tinted colour image, with exposure and orientation jitter."""
    window = texture.shape[0] // 2
    top = rng.integers(0, texture.shape[0] - window + 1)
    left = rng.integers(0, texture.shape[1] - window + 1)
    grey = texture[top : top + window, left : left + window].astype(np.float32) / 255.0
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    if rng.random() < 0.5:
        grey = grey[::-1, :]
    if window != size:
        grey = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
    grey = np.clip(grey * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03), 0, 1)
    return grey[..., None] * np.asarray(tint, dtype=np.float32)


def _camera_noise(image: RGB, rng: np.random.Generator) -> np.ndarray:
    noisy = image + rng.normal(0.0, 0.012, image.shape)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- defects
def _scratch(image: RGB, rng: np.random.Generator) -> tuple[RGB, Mask]:
    size = image.shape[0]
    unit = size / 256
    start = rng.uniform(0.2, 0.8, 2) * size
    path = _walk(start, rng.uniform(0, 2 * np.pi), int(rng.integers(12, 30)), 4 * unit, 0.06, rng)
    width = rng.uniform(1.0, 2.2) * unit
    groove = _stroke(size, [(path, width)])
    shadow = _stroke(size, [(path + np.array([1.0, 1.0]) * unit, width + unit)])
    image = image * (1 - 0.35 * shadow[..., None])
    light = np.minimum(image.mean(axis=(0, 1)) * 1.9 + 0.15, 1.0)
    image = _blend(image, 0.85 * groove, light)
    return image, _mask(np.maximum(groove, shadow))


def _crack(image: RGB, rng: np.random.Generator) -> tuple[RGB, Mask]:
    size = image.shape[0]
    unit = size / 256
    start = rng.uniform(0.25, 0.75, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    trunk = _walk(start, heading, int(rng.integers(15, 30)), 4 * unit, 0.45, rng)
    paths = [(trunk[: len(trunk) // 2 + 1], 2.4 * unit), (trunk[len(trunk) // 2 :], 1.4 * unit)]
    for _ in range(int(rng.integers(1, 3))):
        fork = trunk[int(rng.integers(2, len(trunk) - 2))]
        branch = _walk(
            fork, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), int(rng.integers(5, 12)), 3.5 * unit, 0.5, rng
        )
        paths.append((branch, 1.0 * unit))
    fracture = _stroke(size, paths)
    darkening = ndimage.gaussian_filter(fracture, 1.5 * unit)
    image = image * (1 - 0.4 * np.clip(darkening * 2, 0, 1)[..., None])
    image = _blend(image, 0.9 * fracture, (0.03, 0.03, 0.03))
    return image, _mask(fracture)


def _hole(image: RGB, rng: np.random.Generator) -> tuple[RGB, Mask]:
    size = image.shape[0]
    unit = size / 256
    centre = rng.uniform(0.2, 0.8, 2) * size
    radius = rng.uniform(8, 18) * unit
    pit = _blob(size, centre, radius, rng, roughness=0.35)
    light = rng.uniform(0, 2 * np.pi)
    offset = np.array([np.cos(light), np.sin(light)]) * 0.25 * radius
    rim = _blob(size, centre + offset, radius * 1.15, rng, roughness=0.2)
    rim = np.clip(rim - pit, 0, 1)
    yy, xx = np.mgrid[0:size, 0:size]
    depth = np.clip(1 - np.hypot(xx - centre[0] - offset[0], yy - centre[1] - offset[1]) / (1.5 * radius), 0, 1)
    inside = (0.02 + 0.12 * (1 - depth))[..., None] * np.ones(3, dtype=np.float32)
    image = image * (1 - pit[..., None]) + pit[..., None] * inside
    image = np.clip(image * (1 + 0.45 * rim[..., None]), 0, 1)
    return image, _mask(np.maximum(pit, rim))


def _stain(image: RGB, rng: np.random.Generator) -> tuple[RGB, Mask]:
    size = image.shape[0]
    unit = size / 256
    centre = rng.uniform(0.25, 0.75, 2) * size
    spot = ndimage.gaussian_filter(_blob(size, centre, rng.uniform(14, 34) * unit, rng, roughness=0.4), 1.5 * unit)
    ring = np.clip(spot - ndimage.gaussian_filter(spot, 3 * unit), 0, 1) * 3
    colour = rng.choice(np.array([(0.42, 0.26, 0.12), (0.25, 0.25, 0.3), (0.55, 0.5, 0.2)], dtype=np.float32))
    strength = rng.uniform(0.35, 0.6)
    alpha = np.clip(strength * spot + 0.35 * ring, 0, 0.95)
    image = image * (1 - alpha[..., None]) + alpha[..., None] * image * 0.7 * colour / colour.max()
    return image, _mask(spot, threshold=0.3, grow=0)


def _contamination(image: RGB, rng: np.random.Generator) -> tuple[RGB, Mask]:
    size = image.shape[0]
    unit = size / 256
    colour = rng.choice(
        np.array([(0.95, 0.95, 0.9), (0.15, 0.3, 0.85), (0.05, 0.05, 0.05), (0.9, 0.75, 0.1)], dtype=np.float32)
    )
    centre = rng.uniform(0.25, 0.75, 2) * size
    particles = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 9))):
        where = centre + rng.normal(0, 10 * unit, 2)
        particles = np.maximum(particles, _blob(size, where, rng.uniform(1.5, 4.5) * unit, rng, roughness=0.3))
    if rng.random() < 0.7:
        fibre = _walk(
            centre + rng.normal(0, 6 * unit, 2),
            rng.uniform(0, 2 * np.pi),
            int(rng.integers(8, 16)),
            3.5 * unit,
            0.25,
            rng,
        )
        particles = np.maximum(particles, _stroke(size, [(fibre, 1.3 * unit)]))
    shadow = ndimage.shift(ndimage.gaussian_filter(particles, unit), (1.5 * unit, 1.5 * unit), order=1)
    image = image * (1 - 0.4 * shadow[..., None])
    image = _blend(image, particles, colour)
    return image, _mask(particles)


DRAW: dict[str, Callable[[RGB, np.random.Generator], tuple[RGB, Mask]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "contamination": _contamination,
}


# ----------------------------------------------------------------------------- dataset
def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def defects_of(category: str) -> tuple[str, ...]:
    """The defect kinds a demo category can carry."""
    if category in TEXTURES:
        return DEFECTS
    if category in OBJECTS:
        return OBJECT_DEFECTS
    msg = f"Unknown demo category {category!r}; choose from {list(CATEGORIES)} (see --list)."
    raise ValueError(msg)


def _texture_images(
    category: str, n_train: int, n_good: int, defects: Sequence[str], size: int, rng: np.random.Generator
) -> Iterator[tuple[str, np.ndarray, Mask | None]]:
    """``(relative path without suffix, image uint8, defect mask or None)`` per image."""
    texture = TEXTURES[category]()
    tint = TINTS[category]
    for i in range(n_train):
        yield f"train/good/{i:03d}", _camera_noise(_normal_image(texture, tint, size, rng), rng), None
    for i in range(n_good):
        yield f"test/good/{i:03d}", _camera_noise(_normal_image(texture, tint, size, rng), rng), None
    counts = dict.fromkeys(defects, 0)
    for kind in defects:
        image, mask = DRAW[kind](_normal_image(texture, tint, size, rng), rng)
        yield f"test/{kind}/{counts[kind]:03d}", _camera_noise(image, rng), mask
        counts[kind] += 1


def _object_images(
    category: str, n_train: int, n_good: int, defects: Sequence[str], size: int, rng: np.random.Generator
) -> Iterator[tuple[str, np.ndarray, Mask | None]]:
    """As ``_texture_images``, for a procedurally drawn object."""
    names = [f"train/good/{i:03d}" for i in range(n_train)] + [f"test/good/{i:03d}" for i in range(n_good)]
    for name in names:
        image, _, _ = render(category, random_pose(size, rng))
        yield name, _camera_noise(image, rng), None
    counts = dict.fromkeys(defects, 0)
    for kind in defects:
        image, mask, _ = render(category, random_pose(size, rng), kind, rng)
        yield f"test/{kind}/{counts[kind]:03d}", _camera_noise(image, rng), mask
        counts[kind] += 1


def generate_category(
    root: str | Path,
    category: str,
    n_train: int = 60,
    n_good: int = 20,
    n_defective: int = 30,
    size: int = 256,
    seed: int = 0,
    defects: Sequence[str] | None = None,
) -> Path:
    """Write one category; ``n_defective`` images are spread evenly over ``defects`` (default: all of the category's).

    Returns its folder.
    """
    allowed = defects_of(category)
    defects = tuple(allowed if defects is None else defects)
    unknown = [d for d in defects if d not in allowed]
    if unknown or not defects:
        msg = f"Unknown or no defect kinds {unknown or list(defects)} for {category}; choose from {list(allowed)}."
        raise ValueError(msg)
    if min(n_train, n_good, n_defective) < 1 or size < 64:
        msg = (
            f"Need at least one image of each split and size >= 64; got {n_train}/{n_good}/{n_defective}, size {size}."
        )
        raise ValueError(msg)
    settings = {
        "category": category,
        "train": n_train,
        "good": n_good,
        "defective": n_defective,
        "size": size,
        "seed": seed,
        "defects": list(defects),
    }
    folder = Path(root).expanduser() / category
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return folder
    if folder.exists() and any(folder.iterdir()):
        if not marker.is_file():
            msg = f"{folder} exists and was not written by this generator; remove it or choose another --root."
            raise FileExistsError(msg)
        shutil.rmtree(folder)
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    draw = _texture_images if category in TEXTURES else _object_images
    kinds = [defects[i % len(defects)] for i in range(n_defective)]
    for name, image, mask in draw(category, n_train, n_good, kinds, size, rng):
        _save(image, folder / f"{name}.png")
        if mask is not None:
            _, kind, index = name.split("/")
            _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / kind / f"{index}_mask.png")
    marker.write_text(json.dumps(settings))
    return folder


def generate_demo_dataset(
    root: str | Path,
    categories: Sequence[str] = tuple(TEXTURES),
    n_train: int = 60,
    n_good: int = 20,
    n_defective: int = 30,
    size: int = 256,
    seed: int = 0,
) -> list[Path]:
    """Write the demo categories under ``root`` (kept as they are when already written with the same settings)."""
    return [generate_category(root, c, n_train, n_good, n_defective, size, seed) for c in categories]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m anomalib_aand.tools.demo --root DIR [--seed N] [--categories ...] | --list``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", help="output folder; categories go to ROOT/CATEGORY")
    parser.add_argument("--list", action="store_true", help="print the categories and their defect kinds, then exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--categories",
        nargs="+",
        default=list(TEXTURES),
        choices=list(CATEGORIES),
        help="default: the textures (brick grass gravel)",
    )
    parser.add_argument("--train", type=int, default=60, help="normal training images per category")
    parser.add_argument("--good", type=int, default=20, help="normal test images per category")
    parser.add_argument("--defective", type=int, default=30, help="defective test images per category")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.list:
        for category in CATEGORIES:
            kind = "texture" if category in TEXTURES else "object"
            print(f"{category:8s} {kind:8s} defects: {' '.join(defects_of(category))}")
        return
    if args.root is None:
        parser.error("--root is required (or --list to see the categories)")
    for folder in generate_demo_dataset(
        args.root, args.categories, args.train, args.good, args.defective, args.size, args.seed
    ):
        print(f"{folder}: {args.train} train/good, {args.good} test/good, {args.defective} defective")


if __name__ == "__main__":
    main()
