"""Antialiased drawing primitives shared by the demo generators (textures and objects)."""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SUPERSAMPLE = 4  # strokes and outlines are drawn at this multiple of the output size, then box-filtered

RGB = np.ndarray  # (H, W, 3) float in [0, 1]
Mask = np.ndarray  # (H, W) bool


def stroke(size: int, paths: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines ``(points (N, 2) as x, y; width px)``."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, width in paths:
        scaled = [(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in points]
        draw.line(scaled, fill=255, width=max(1, round(width * SUPERSAMPLE)), joint="curve")
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def blob(size: int, centre: np.ndarray, radius: float, rng: np.random.Generator, roughness: float = 0.25) -> np.ndarray:
    """Anti-aliased coverage of an irregular star-shaped outline (a few random harmonics of the radius)."""
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(angles)
    for harmonic in range(2, 7):
        r += roughness / harmonic * rng.normal() * np.cos(harmonic * angles + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.4, 1.8)
    stretch = rng.uniform(0.6, 1.0)
    turn = rng.uniform(0, np.pi)
    x = r * np.cos(angles)
    y = r * stretch * np.sin(angles)
    x, y = x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    outline = [((centre[0] + a) * SUPERSAMPLE, (centre[1] + b) * SUPERSAMPLE) for a, b in zip(x, y, strict=True)]
    ImageDraw.Draw(canvas).polygon(outline, fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def walk(
    start: np.ndarray, heading: float, steps: int, step: float, turn: float, rng: np.random.Generator
) -> np.ndarray:
    """A path of ``steps`` segments whose heading changes by N(0, ``turn``) per segment."""
    points = [start]
    position = start.astype(np.float64)
    for _ in range(steps):
        heading += rng.normal(0.0, turn)
        position = position + step * np.array([np.cos(heading), np.sin(heading)])
        points.append(position)
    return np.asarray(points)


def mask(coverage: np.ndarray, threshold: float = 0.2, grow: int = 1) -> Mask:
    """Ground-truth mask of a drawn coverage: above ``threshold``, grown by ``grow`` pixels."""
    inside = coverage > threshold
    return ndimage.binary_dilation(inside, iterations=grow) if grow else inside


def blend(image: RGB, alpha: np.ndarray, colour: Sequence[float] | np.ndarray) -> RGB:
    """Paint ``colour`` over ``image`` with per-pixel opacity ``alpha``."""
    alpha = alpha[..., None]
    return image * (1 - alpha) + alpha * np.asarray(colour, dtype=np.float32)
