"""Object categories of the demo dataset, drawn procedurally: a ``hex_nut`` and a ``screw`` seen from above.

Each image is one object on a lightly textured table, as an inspection camera would see it: the pose
(shift of up to 5 % of the image, rotation of up to 5 degrees, size within 3 %), the light direction,
exposure and an illumination ramp change from image to image. The scene is rendered at ``SCENE_SUPERSAMPLE``
times the output size and box-filtered down, then softened by a lens blur, so edges are antialiased.

Defects lie on the object:

- ``scratch``: a thin bright groove with a faint shadow, inside the object's outline;
- ``missing``: a chipped corner of the nut, a broken tip or a bite out of the screw's thread;
- ``contamination``: foreign particles and a fibre on the object;
- ``colour``: a discoloured patch (rust, heat tint, paint) that keeps the metal's shading.

``render`` also returns the object's silhouette in its undamaged pose (the demo writes it beside the
images, for analyses that split a map into object, outline and background).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomalib_aand.tools.drawing import blend, blob, mask, stroke, walk

SCENE_SUPERSAMPLE = 2
OBJECT_DEFECTS = ("scratch", "missing", "contamination", "colour")

RGB = np.ndarray  # (H, W, 3) float in [0, 1]
Mask = np.ndarray  # (H, W) bool
Field = np.ndarray  # (H * SCENE_SUPERSAMPLE, W * SCENE_SUPERSAMPLE) float, in the supersampled frame


@dataclass(frozen=True)
class Pose:
    """Where the object lies and how it is lit, in output pixels and radians."""

    size: int
    centre: tuple[float, float]
    angle: float
    scale: float
    light: float  # direction (image frame) from the object towards the light
    exposure: float
    ramp: tuple[float, float]  # illumination gradient across the image, x and y
    texture_seed: int


def random_pose(size: int, rng: np.random.Generator) -> Pose:
    """A pose and lighting drawn around the nominal placement (object centred, light from the upper left)."""
    shift = 0.05 * size
    return Pose(
        size=size,
        centre=tuple(float(c) for c in size / 2 + rng.uniform(-shift, shift, 2)),
        angle=float(np.deg2rad(rng.uniform(-5, 5))),
        scale=float(rng.uniform(0.97, 1.03)),
        light=float(np.deg2rad(-135 + rng.uniform(-20, 20))),
        exposure=float(rng.uniform(0.9, 1.1)),
        ramp=tuple(float(r) for r in rng.normal(0, 0.05, 2)),
        texture_seed=int(rng.integers(2**31)),
    )


@dataclass
class _Frame:
    """Supersampled pixel grid: image coordinates (x, y) and object coordinates (u along the object, v across)."""

    x: Field
    y: Field
    u: Field
    v: Field

    @classmethod
    def of(cls, pose: Pose) -> "_Frame":
        n = pose.size * SCENE_SUPERSAMPLE
        y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / SCENE_SUPERSAMPLE
        dx = x - pose.centre[0]
        dy = y - pose.centre[1]
        c = np.cos(pose.angle)
        s = np.sin(pose.angle)
        return cls(x, y, (c * dx + s * dy) / pose.scale, (-s * dx + c * dy) / pose.scale)


def _down(field: np.ndarray) -> np.ndarray:
    """Box-filter the supersampled frame to output pixels (antialiasing)."""
    n = field.shape[0] // SCENE_SUPERSAMPLE
    return field.reshape(n, SCENE_SUPERSAMPLE, n, SCENE_SUPERSAMPLE, *field.shape[2:]).mean(axis=(1, 3))


def _tri(phase: np.ndarray) -> np.ndarray:
    """Triangle wave in [0, 1] with period 1."""
    return np.abs(2 * (phase - np.floor(phase)) - 1)


def _irregular(du: Field, dv: Field, radius: float, rng: np.random.Generator, roughness: float = 0.3) -> Field:
    """Inside of an irregular star-shaped outline around (0, 0): a few random harmonics of the radius."""
    theta = np.arctan2(dv, du)
    r = np.ones_like(theta)
    for harmonic in range(2, 7):
        r += roughness / harmonic * rng.normal() * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(du, dv) <= radius * np.clip(r, 0.5, 1.6)


# ----------------------------------------------------------------------------- the two objects
STEEL = np.array([0.93, 0.96, 1.0], dtype=np.float32)


def _hex_nut(frame: _Frame, pose: Pose) -> tuple[Field, RGB]:
    """A hex nut from above: flat face with turning marks, bevelled corners, threaded bore showing the table."""
    size = pose.size
    corner = 0.33 * size
    flat = corner * np.cos(np.pi / 6)
    u = frame.u
    v = frame.v
    r = np.hypot(u, v)
    theta = np.arctan2(v, u) + pose.angle  # image-frame direction of each point from the centre
    hexagon = np.max([np.abs(u * np.cos(k * np.pi / 3) + v * np.sin(k * np.pi / 3)) for k in range(3)], axis=0)
    bore = 0.5 * flat
    body = (hexagon <= flat) & (r <= 0.985 * corner) & (r > bore)
    facing = np.cos(theta - pose.light)  # +1 where a surface tilted outwards faces the light
    face = 0.6 + 0.05 * (r / corner) * facing + 0.02 * np.sin(2 * np.pi * r / (0.006 * size))
    bevel = 0.47 + 0.28 * facing
    thread = 0.2 + 0.14 * np.cos(theta - pose.light - np.pi) + 0.06 * np.sin(2 * np.pi * (r / (0.02 * size) - theta))
    shade = np.where(r > 0.97 * flat, bevel, face)
    shade = np.where(r < 1.17 * bore, thread, shade)
    return body.astype(np.float32), shade[..., None] * STEEL


def _screw_half_width(frame: _Frame, size: int) -> tuple[Field, Field]:
    """Outline of a pan-head screw lying along u: half width at each point, and where the shank is."""
    length = 0.72 * size
    head = 0.11 * size
    tip = 0.09 * size
    start = -length / 2
    end = length / 2
    head_half = 0.085 * size
    shank_half = 0.042 * size
    pitch = 0.04 * size
    u = frame.u
    v = frame.v
    in_head = (u >= start) & (u < start + head)
    rounding = np.sqrt(np.clip(1 - ((start + 0.45 * head - u) / (0.45 * head)) ** 2, 0, 1))
    head_half_width = head_half * np.where(u < start + 0.45 * head, rounding, 1.0)
    side = np.where(v >= 0, 0.25, -0.25)  # the helix: top and bottom crests are half a pitch apart
    crest = shank_half * (1 - 0.16 * _tri(u / pitch + side))
    taper = np.clip((end - u) / tip, 0, 1)
    shank_half_width = np.where(u <= end, crest * np.minimum(1.0, 0.25 + 0.75 * taper), 0.0)
    half = np.where(in_head, head_half_width, np.where(u >= start + head, shank_half_width, 0.0))
    return half, u >= start + head


def _screw(frame: _Frame, pose: Pose) -> tuple[Field, RGB]:
    """A steel pan-head screw on its side: cylinder shading, specular streak, slanted thread grooves."""
    size = pose.size
    half, in_shank = _screw_half_width(frame, size)
    body = (np.abs(frame.v) <= half) & (half > 0)
    across = np.clip(frame.v / np.maximum(half, 1e-3), -1, 1)
    towards = np.sin(pose.light - pose.angle)  # how much the light comes from the +v side
    lit = 0.3 + 0.45 * np.sqrt(1 - across**2) + 0.2 * across * towards
    streak = 0.35 * np.exp(-(((across - 0.45 * towards) / 0.16) ** 2))
    pitch = 0.04 * size
    groove = np.where(in_shank, 0.22 * np.clip(1.4 - 2 * _tri(frame.u / pitch + 0.25 * across), 0, 1), 0.0)
    under_head = 0.25 * np.exp(-(((frame.u + 0.25 * size) / (0.008 * size)) ** 2))
    shade = np.clip(lit + streak - groove - under_head, 0, 1.2)
    return body.astype(np.float32), shade[..., None] * STEEL


def _nut_cut(frame: _Frame, pose: Pose, rng: np.random.Generator) -> Field:
    """A chip off one of the nut's six corners."""
    corner = 0.33 * pose.size
    k = rng.integers(6)
    direction = np.pi / 6 + k * np.pi / 3
    reach = rng.uniform(0.85, 0.95) * corner
    radius = rng.uniform(0.16, 0.26) * corner
    return _irregular(frame.u - reach * np.cos(direction), frame.v - reach * np.sin(direction), radius, rng)


def _screw_cut(frame: _Frame, pose: Pose, rng: np.random.Generator) -> Field:
    """A broken tip or a bite out of the thread."""
    size = pose.size
    if rng.random() < 0.5:
        at = size * (0.36 - rng.uniform(0.08, 0.16))
        edge = at + 0.015 * size * np.sin(frame.v / (0.012 * size) + rng.uniform(0, 2 * np.pi))
        return frame.u > edge
    along = rng.uniform(-0.15, 0.22) * size
    across = rng.choice([-1, 1]) * 0.045 * size
    return _irregular(frame.u - along, frame.v - across, rng.uniform(0.025, 0.04) * size, rng)


@dataclass(frozen=True)
class _Kind:
    shape: Callable[[_Frame, Pose], tuple[Field, RGB]]
    cut: Callable[[_Frame, Pose, np.random.Generator], Field]
    table: tuple[float, float, float]


OBJECTS: dict[str, _Kind] = {
    "hex_nut": _Kind(_hex_nut, _nut_cut, (0.2, 0.21, 0.23)),
    "screw": _Kind(_screw, _screw_cut, (0.8, 0.8, 0.77)),
}


# ----------------------------------------------------------------------------- scene
def _table(pose: Pose, colour: tuple[float, float, float]) -> RGB:
    """A matte table: low-frequency mottling and fine grain, at output resolution."""
    rng = np.random.default_rng(pose.texture_seed)
    size = pose.size
    mottle = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 16)
    grain = ndimage.gaussian_filter(rng.normal(size=(size, size)), 0.7)
    shade = 1 + 0.5 * mottle / (mottle.std() + 1e-6) * 0.04 + 0.03 * grain / (grain.std() + 1e-6)
    return shade[..., None].astype(np.float32) * np.asarray(colour, dtype=np.float32)


def _illumination(pose: Pose) -> np.ndarray:
    size = pose.size
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    vignette = 1 - 0.25 * (x**2 + y**2)
    return (pose.exposure * vignette * (1 + pose.ramp[0] * x + pose.ramp[1] * y))[..., None].astype(np.float32)


def _on_object(coverage: np.ndarray, rng: np.random.Generator, margin: int = 2) -> np.ndarray:
    """A random point (x, y) well inside the object."""
    inside = ndimage.binary_erosion(coverage > 0.5, iterations=margin)
    ys, xs = np.nonzero(inside if inside.any() else coverage > 0.5)
    pick = rng.integers(len(xs))
    return np.array([xs[pick], ys[pick]], dtype=np.float64)


def render(category: str, pose: Pose, defect: str | None = None, rng: np.random.Generator | None = None) -> tuple:
    """Image (float RGB), defect mask and undamaged object mask of one object in ``pose``.

    ``rng`` draws the defect (required when ``defect`` is given); the scene itself depends only on ``pose``.
    """
    if category not in OBJECTS:
        msg = f"Unknown object category {category!r}; choose from {sorted(OBJECTS)}."
        raise ValueError(msg)
    if defect is not None and (defect not in OBJECT_DEFECTS or rng is None):
        msg = f"Defect {defect!r} needs a generator and one of {list(OBJECT_DEFECTS)}."
        raise ValueError(msg)
    kind = OBJECTS[category]
    size = pose.size
    unit = size / 256
    frame = _Frame.of(pose)
    alpha, colour = kind.shape(frame, pose)
    whole = _down(alpha)
    cut = kind.cut(frame, pose, rng).astype(np.float32) if defect == "missing" else None
    if cut is not None:
        alpha = alpha * (1 - cut)
    coverage = _down(alpha)
    offset = -np.array([np.sin(pose.light), np.cos(pose.light)]) * 2.5 * unit
    shadow = ndimage.gaussian_filter(ndimage.shift(coverage, offset, order=1), 2.0 * unit)
    image = _table(pose, kind.table) * (1 - 0.45 * shadow[..., None])
    image = image * (1 - coverage[..., None]) + _down(alpha[..., None] * colour)
    object_mask = whole > 0.5
    defect_mask = np.zeros((size, size), dtype=bool)
    if cut is not None:
        defect_mask = mask(whole * _down(cut), threshold=0.3, grow=0)
    elif defect == "scratch":
        start = _on_object(whole, rng, margin=int(4 * unit))
        path = walk(start, rng.uniform(0, 2 * np.pi), int(rng.integers(5, 12)), 2.5 * unit, 0.08, rng)
        width = rng.uniform(0.9, 1.6) * unit
        groove = stroke(size, [(path, width)]) * whole
        trough = stroke(size, [(path + 0.8 * unit, width + 0.6 * unit)]) * whole
        image = image * (1 - 0.4 * trough[..., None])
        image = blend(image, 0.9 * groove, np.minimum(image.max(axis=(0, 1)) * 1.1, 1.0))
        defect_mask = mask(np.maximum(groove, trough), threshold=0.15) & object_mask
    elif defect == "contamination":
        centre = _on_object(whole, rng, margin=int(6 * unit))
        particles = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(2, 6))):
            where = centre + rng.normal(0, 5 * unit, 2)
            particles = np.maximum(particles, blob(size, where, rng.uniform(1.8, 4.0) * unit, rng, roughness=0.3))
        if rng.random() < 0.6:
            fibre = walk(centre, rng.uniform(0, 2 * np.pi), int(rng.integers(4, 9)), 2.5 * unit, 0.3, rng)
            particles = np.maximum(particles, stroke(size, [(fibre, 1.0 * unit)]))
        particles = particles * whole
        colours = np.array([(0.08, 0.06, 0.05), (0.55, 0.35, 0.15), (0.15, 0.3, 0.8), (0.9, 0.85, 0.7)], np.float32)
        image = blend(image, particles, rng.choice(colours) * pose.exposure)
        defect_mask = mask(particles) & object_mask
    elif defect == "colour":
        centre = _on_object(whole, rng, margin=int(6 * unit))
        patch = blob(size, centre, rng.uniform(6, 12) * unit, rng, roughness=0.4)
        patch = ndimage.gaussian_filter(patch, 1.0 * unit) * whole
        hues = np.array([(0.85, 0.45, 0.2), (0.35, 0.45, 0.95), (0.8, 0.75, 0.25), (0.8, 0.2, 0.2)], np.float32)
        grey = image.mean(axis=2, keepdims=True)
        tinted = grey * rng.choice(hues) * 1.4
        strength = rng.uniform(0.6, 0.85)
        image = image * (1 - strength * patch[..., None]) + strength * patch[..., None] * tinted
        defect_mask = mask(patch, threshold=0.3, grow=0) & object_mask
    lens = ndimage.gaussian_filter(image, (0.5 * unit, 0.5 * unit, 0))
    return np.clip(lens * _illumination(pose), 0, 1), defect_mask, object_mask
