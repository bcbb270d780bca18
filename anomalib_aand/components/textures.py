"""A procedural texture bank: an offline stand-in for DTD as the source of synthetic anomalies.

DTD (the Describable Textures Dataset, which the authors blend into their anomalies) is a few thousand
photographs of 47 texture kinds: banded, blotchy, cracked, crosshatched, dotted, fibrous, grid,
honeycombed, marbled, and so on. Without it, anomalib's generator blends grey Perlin noise. This module
draws colour textures of several of those kinds (stripes, crosshatch, grid, dots, cells, marble,
blotches, fibres), each with a random palette, orientation and scale, so that the anomalies carry
colour, edges and structure as DTD's do. It is not DTD: use the real one when you can
(docs/configuration.md, "Anomaly source").
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BANK_SIZE = 64  # textures in a bank: the generator picks one per anomaly
TEXTURE_SIDE = 256


def _value_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a ``cells x cells`` grid of random values, bicubically enlarged."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255


def _fractal(rng: np.random.Generator, side: int, octaves: int = 4) -> np.ndarray:
    field = sum(_value_noise(rng, side, 2 ** (i + 2)) / 2**i for i in range(octaves))
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def _coordinates(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [0, 1), rotated by a random angle."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, np.pi)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _stripes(rng: np.random.Generator, side: int) -> np.ndarray:
    u, _ = _coordinates(rng, side)
    wave = np.sin(2 * np.pi * rng.uniform(3, 24) * u + 2 * _fractal(rng, side) * rng.uniform(0, 2))
    return (wave > rng.uniform(-0.5, 0.5)).astype(np.float32) if rng.random() < 0.5 else (wave + 1) / 2


def _crosshatch(rng: np.random.Generator, side: int) -> np.ndarray:
    u, v = _coordinates(rng, side)
    frequency = rng.uniform(6, 30)
    width = rng.uniform(0.1, 0.35)
    lines_u = np.abs(np.sin(np.pi * frequency * u)) < width
    lines_v = np.abs(np.sin(np.pi * frequency * (u + v) / np.sqrt(2))) < width
    return (lines_u | lines_v).astype(np.float32)


def _grid(rng: np.random.Generator, side: int) -> np.ndarray:
    u, v = _coordinates(rng, side)
    frequency = rng.uniform(4, 20)
    return ((np.floor(u * frequency) + np.floor(v * frequency)) % 2).astype(np.float32)


def _dots(rng: np.random.Generator, side: int) -> np.ndarray:
    image = Image.new("L", (side, side))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(3, 18)
    for cy, cx in rng.uniform(0, side, (int(rng.uniform(0.2, 0.6) * (side / radius) ** 2), 2)):
        r = radius * rng.uniform(0.6, 1.2)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return np.asarray(image, np.float32) / 255


def _cells(rng: np.random.Generator, side: int) -> np.ndarray:
    """Voronoi cells (honeycombed, cracked, scaly kinds): distance to the nearest of random seeds."""
    half = side // 2  # computed at half resolution, then enlarged: the nearest-seed search is the costly part
    seeds = rng.uniform(0, half, (int(rng.uniform(12, 80)), 2)).astype(np.float32)
    y, x = np.mgrid[0:half, 0:half].astype(np.float32)
    distances = np.partition(np.hypot(y[..., None] - seeds[:, 0], x[..., None] - seeds[:, 1]), 1, axis=-1)
    edge = np.clip((distances[..., 1] - distances[..., 0]) / rng.uniform(2, 10), 0, 1)
    return (
        np.asarray(Image.fromarray((edge * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR), np.float32)
        / 255
    )


def _marble(rng: np.random.Generator, side: int) -> np.ndarray:
    u, _ = _coordinates(rng, side)
    return (np.sin(2 * np.pi * (rng.uniform(2, 8) * u + rng.uniform(2, 6) * _fractal(rng, side))) + 1) / 2


def _blotches(rng: np.random.Generator, side: int) -> np.ndarray:
    field = _fractal(rng, side)
    return (field > rng.uniform(0.35, 0.65)).astype(np.float32) if rng.random() < 0.5 else field


def _fibres(rng: np.random.Generator, side: int) -> np.ndarray:
    """Noise smeared along one direction (fibrous, woven, grainy kinds)."""
    canvas = 2 * side  # rotated, then cropped: no empty corners
    noise = rng.random((canvas, canvas)).astype(np.float32)
    length = int(rng.uniform(8, 48))
    smeared = np.cumsum(np.pad(noise, ((0, 0), (length, 0))), axis=1)
    smeared = (smeared[:, length:] - smeared[:, :-length]) / length
    image = Image.fromarray((np.clip((smeared - 0.5) * 4 * np.sqrt(length / 8) + 0.5, 0, 1) * 255).astype(np.uint8))
    image = image.rotate(rng.uniform(0, 180), resample=Image.BILINEAR).crop(
        (side // 2, side // 2, side * 3 // 2, side * 3 // 2)
    )
    return np.asarray(image, np.float32) / 255


PATTERNS: tuple[Callable[[np.random.Generator, int], np.ndarray], ...] = (
    _stripes,
    _crosshatch,
    _grid,
    _dots,
    _cells,
    _marble,
    _blotches,
    _fibres,
)


def procedural_texture(rng: np.random.Generator, side: int = TEXTURE_SIDE) -> np.ndarray:
    """One ``(side, side, 3)`` uint8 colour texture of a random kind and a random two- or three-colour palette."""
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))](rng, side)
    grey = rng.random((3, 1))
    palette = (grey + rng.uniform(0.2, 1.0) * (rng.random((3, 3)) - grey)).clip(0, 1).astype(np.float32)
    shade = _fractal(rng, side)[..., None]
    colour = palette[0] * (1 - pattern[..., None]) + palette[1] * pattern[..., None]
    colour = colour * (1 - 0.3 * shade) + palette[2] * 0.3 * shade
    grain = rng.normal(0, rng.uniform(0, 0.06), colour.shape).astype(np.float32)
    return (np.clip(colour + grain, 0, 1) * 255).astype(np.uint8)


def write_texture_bank(folder: str | Path, count: int = BANK_SIZE, side: int = TEXTURE_SIDE, seed: int = 0) -> Path:
    """Write ``count`` procedural textures as PNG files into ``folder`` (created); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(procedural_texture(rng, side)).save(folder / f"texture_{index:03d}.png")
    return folder
