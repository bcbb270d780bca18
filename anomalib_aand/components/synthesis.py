"""Stage-1 synthetic anomalies: DRAEM-style Perlin masks for a whole batch, optional foreground masking.

Images arrive normalised by the pre-processor; synthesis happens in [0, 1] pixel space, in float32 (also
under mixed precision), and the result is normalised again, so the teacher sees what it sees at inference.
The masks follow anomalib's ``PerlinAnomalyGenerator`` (same noise, rotation, threshold and blend), drawn for
the batch at once so that a step reads the device once per round of redraws instead of several times per image;
each anomaly's content goes through that generator's own texture list and augmentations. As in the authors'
code, an anomaly that falls (almost) entirely on background is drawn again, up to ``MAX_TRIES`` times, so the
share of anomalous images stays at ``probability``.
"""

import atexit
import functools
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.data.utils import read_image
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn
from torchvision.transforms.v2 import Normalize
from torchvision.transforms.v2.functional import resize

from .blur import SeparableGaussianBlur
from .textures import write_texture_bank

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PROCEDURAL = "procedural"  # anomaly_source_path value: a texture bank generated when stage 1 starts
MAX_TRIES = 10  # draws of an anomaly before an image stays normal (the authors' limit)
MIN_ANOMALY_PIXELS = 5  # an anomaly smaller than this on the foreground counts as missed (authors: > 4)
# anomalib's PerlinAnomalyGenerator settings: lattice scales 2^0 .. 2^5, rotation, blend factor range
PERLIN_MAX_OCTAVE = 5
ROTATION_DEGREES = (-90.0, 90.0)
BLEND_FACTOR = (0.2, 1.0)


def check_anomaly_source(path: str | Path | None) -> None:
    """Fail early, with advice, when ``anomaly_source_path`` names no usable image folder."""
    if path is None or path == PROCEDURAL:
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        msg = (
            f"anomaly_source_path {str(folder)!r} is not a folder. Point it at a folder of texture images "
            f"(the paper uses DTD), {PROCEDURAL!r} for generated textures, or leave it unset to blend Perlin noise."
        )
        raise ValueError(msg)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")):
        msg = (
            f"anomaly_source_path {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}). "
            "Add texture images or unset it."
        )
        raise ValueError(msg)


def otsu_thresholds(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` (``(B, N)``, in [0, 1]): ``(B,)`` bin centres.

    The histogram comes from ``torch.bincount`` (deterministic, any dtype, any device; ``torch.histc`` has no CUDA
    kernel for half precision and refuses deterministic mode) with ``histc``'s bins; the cumulative sums run on
    integer counts, so they are exact everywhere.
    """
    rows = values.shape[0]
    index = (values.float() * bins).long().clamp_(0, bins - 1)
    index += torch.arange(rows, device=values.device)[:, None] * bins
    counts = torch.bincount(index.flatten(), minlength=rows * bins).view(rows, bins)
    below = counts.cumsum(1)
    below_sum = (counts * torch.arange(bins, device=values.device)).cumsum(1)
    total = below[:, -1:].clamp_min(1).float()
    weight_low = below / total
    mean_low = (below_sum + 0.5 * below) / (bins * total)
    between = (mean_low[:, -1:] * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    return (between.argmax(dim=1) + 0.5) / bins


class ForegroundEstimator(nn.Module):
    """Automatic foreground mask: sigma-8 blurred grey levels split by Otsu's threshold.

    The side of the threshold that covers most of the image border is background. The whole image
    counts as foreground when the split is not an object on a background: when the two sides' mean grey
    levels differ by less than ``min_contrast`` (textures, also under a gentle illumination gradient,
    which Otsu would otherwise cut into arbitrary halves), or when it leaves under ``min_fraction`` or over
    ``1 - min_fraction`` of the image as foreground. The whole batch at once, in float32 (also under autocast),
    without reading the device.
    """

    def __init__(self, sigma: float = 8.0, min_fraction: float = 0.05, min_contrast: float = 0.1) -> None:
        super().__init__()
        self.blur = SeparableGaussianBlur(sigma, persistent=False)
        self.min_fraction = min_fraction
        self.min_contrast = min_contrast

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] to ``(B, 1, H, W)`` float32 masks in {0, 1}."""
        with torch.autocast(images.device.type, enabled=False):
            grey = self.blur(images.float().mean(dim=1, keepdim=True)).clamp(0, 1)
        above = grey > otsu_thresholds(grey.flatten(1)).view(-1, 1, 1, 1)
        count_above = above.flatten(1).sum(1)
        count_below = above[0].numel() - count_above
        mean_above = (grey * above).flatten(1).sum(1) / count_above.clamp_min(1)
        mean_below = (grey * ~above).flatten(1).sum(1) / count_below.clamp_min(1)
        whole = (count_above == 0) | (count_below == 0) | (mean_above - mean_below < self.min_contrast)
        border = torch.cat([above[:, 0, 0], above[:, 0, -1], above[:, 0, :, 0], above[:, 0, :, -1]], dim=1)
        outside_is_above = border.float().mean(dim=1) > 0.5
        foreground = torch.where(outside_is_above.view(-1, 1, 1, 1), ~above, above)
        fraction = foreground.flatten(1).float().mean(dim=1)
        whole |= (fraction < self.min_fraction) | (fraction > 1 - self.min_fraction)
        return torch.where(whole.view(-1, 1, 1, 1), torch.ones_like(grey), foreground.float())


def perlin_noise(count: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``count`` Perlin noise maps ``(count, height, width)``, drawn on ``device`` without reading it.

    The distribution of anomalib's ``generate_perlin_noise`` (random lattice scales ``2^0 .. 2^5`` per axis over the
    next power-of-two size, quintic fade; a map with no value above 0.5 is stretched to [-1, 1]), for a whole batch.
    """
    pad_h = 1 << max(height - 1, 0).bit_length()
    pad_w = 1 << max(width - 1, 0).bit_length()
    lattice = 2**PERLIN_MAX_OCTAVE + 1
    scales = 2 ** torch.randint(0, PERLIN_MAX_OCTAVE + 1, (count, 2), device=device)
    rows = torch.arange(pad_h, device=device)[None, :] * scales[:, :1] / pad_h  # (count, pad_h) lattice units
    cols = torch.arange(pad_w, device=device)[None, :] * scales[:, 1:] / pad_w
    row0 = rows.floor().long()
    col0 = cols.floor().long()
    row_t = rows - row0
    col_t = cols - col0
    angles = 2 * math.pi * torch.rand(count, lattice * lattice, device=device)

    def corner(d_row: int, d_col: int) -> torch.Tensor:
        index = (row0[:, :, None] + d_row) * lattice + (col0[:, None, :] + d_col)
        angle = angles.gather(1, index.flatten(1)).view(count, pad_h, pad_w)
        return angle.cos() * (row_t[:, :, None] - d_row) + angle.sin() * (col_t[:, None, :] - d_col)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    fade_row = fade(row_t)[:, :, None]
    fade_col = fade(col_t)[:, None, :]
    top = torch.lerp(corner(0, 0), corner(1, 0), fade_row)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), fade_row)
    noise = (math.sqrt(2) * torch.lerp(top, bottom, fade_col))[:, :height, :width]
    low = noise.flatten(1).amin(1).view(-1, 1, 1)
    spread = noise.flatten(1).amax(1).view(-1, 1, 1) - low
    stretched = torch.where(spread > 0, (noise - low) / spread.clamp_min(1e-12), torch.zeros_like(noise)) * 2 - 1
    peakless = ~(noise > 0.5).flatten(1).any(1).view(-1, 1, 1)
    return torch.where(peakless, stretched, noise)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each ``(B, C, H, W)`` image about its centre by its angle (bilinear, zeros outside)."""
    height, width = images.shape[-2:]
    radians = degrees * (math.pi / 180)
    cos = radians.cos()
    sin = radians.sin()
    theta = torch.stack(
        [
            torch.stack([cos, -sin * height / width, torch.zeros_like(cos)], dim=1),
            torch.stack([sin * width / height, cos, torch.zeros_like(cos)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resolve_foreground_mask(setting: bool | Sequence[str], datamodule: Any) -> bool:  # noqa: ANN401
    """Whether to mask: ``setting`` itself, or, for a list of categories, whether the datamodule's category is in it.

    A list lets one config carry a per-category choice (the authors mask objects and keep textures whole) that
    ``--data.category`` selects; ``--model.init_args.foreground_mask true|false`` overrides it for every category.
    """
    if isinstance(setting, bool):
        return setting
    categories = {str(c) for c in setting}
    category = getattr(datamodule, "category", None) or getattr(datamodule, "name", None)
    if category is None:
        logger.warning(
            "foreground_mask lists categories %s, but the data has no category name: using the whole image. "
            "Set foreground_mask to true or false.",
            sorted(categories),
        )
        return False
    masked = str(category) in categories
    logger.info("Category %r: synthetic anomalies %s.", category, "on the foreground" if masked else "anywhere")
    return masked


@functools.cache
def procedural_texture_bank() -> Path:
    """The process's procedural texture bank: written once into a temporary folder, removed at interpreter exit.

    One bank per process rather than per synthesizer, so that copies of a model (``copy.deepcopy``, Lightning's
    strategies) keep reading textures after the original is gone.
    """
    folder = tempfile.mkdtemp(prefix="aand_textures_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_texture_bank(folder)


def normalize_statistics(pre_processor: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std)`` of ``pre_processor``'s Normalize as ``(3,)`` tensors; ``None`` when it has none."""
    transform = getattr(pre_processor, "transform", None)
    normalize = extract_transforms_by_type(transform, Normalize) if transform is not None else []
    if not normalize:
        return None
    return torch.tensor(normalize[0].mean), torch.tensor(normalize[0].std)


class AnomalySynthesizer(nn.Module):
    """Add synthetic anomalies to a normalised batch.

    Args:
        probability: Share of images that get an anomaly (``Aand``'s ``anomaly_probability``).
        anomaly_source_path: Folder of texture images blended into the anomalies; ``"procedural"`` uses the
            process's bank of generated textures (``procedural_texture_bank``); ``None`` blends noise.
        foreground_mask: Restrict anomalies to the automatic foreground (``ForegroundEstimator``).
        mean: Per-channel mean of the pre-processor's Normalize; ``None`` when images are in [0, 1].
        std: Per-channel std of the pre-processor's Normalize.
    """

    def __init__(
        self,
        probability: float,
        anomaly_source_path: str | Path | None = None,
        foreground_mask: bool = False,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_anomaly_source(anomaly_source_path)
        if anomaly_source_path == PROCEDURAL:
            anomaly_source_path = procedural_texture_bank()
        self.probability = probability
        # anomalib's generator supplies the texture list and the augmentations of each anomaly's content; the masks
        # are drawn here for the whole batch (its own draws are per image, each reading the device several times)
        self.generator = PerlinAnomalyGenerator(anomaly_source_path=anomaly_source_path)
        self.foreground = ForegroundEstimator() if foreground_mask else None
        self.register_buffer(
            "mean", torch.zeros(1, 3, 1, 1) if mean is None else mean.view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.ones(1, 3, 1, 1) if std is None else std.view(1, -1, 1, 1), persistent=False)

    @classmethod
    def for_pre_processor(
        cls, pre_processor: object, datamodule: object = None, **kwargs: object
    ) -> "AnomalySynthesizer":
        """A synthesizer for images normalised by ``pre_processor``'s Normalize (if it has one).

        A ``foreground_mask`` list of categories is resolved against ``datamodule`` (``resolve_foreground_mask``).
        """
        kwargs["foreground_mask"] = resolve_foreground_mask(kwargs.get("foreground_mask", False), datamodule)
        statistics = normalize_statistics(pre_processor)
        if statistics is not None:
            kwargs |= {"mean": statistics[0], "std": statistics[1]}
        return cls(**kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(augmented images, anomaly mask, foreground mask)``; masks are ``(B, 1, H, W)``, all float32.

        Masks are drawn for the whole batch at once; each round of redraws reads the device once (which images
        still lack an anomaly). Only the anomaly sources (anomalib's random augmentations) are made per image.
        """
        with torch.autocast(images.device.type, enabled=False):
            pixels = (images.float() * self.std + self.mean).clamp(0, 1)
            foreground = torch.ones_like(pixels[:, :1]) if self.foreground is None else self.foreground(pixels)
            mask, noise, anomalous = self._masks(foreground)
            sources = torch.zeros_like(pixels)
            for index in anomalous:
                sources[index] = self._source(noise[index])
            blend = torch.empty(len(pixels), 1, 1, 1, device=pixels.device).uniform_(*BLEND_FACTOR)
            augmented = pixels + blend * mask * (sources - pixels)
            return (augmented - self.mean) / self.std, mask, foreground

    def _masks(self, foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Anomaly masks ``(B, 1, H, W)`` inside ``foreground``, their rotated noise ``(B, H, W)``, anomalous images.

        ``probability`` of the images get a mask; one that leaves fewer than ``MIN_ANOMALY_PIXELS`` on the
        foreground is drawn again, up to ``MAX_TRIES`` times.
        """
        count, _, height, width = foreground.shape
        device = foreground.device
        pending = torch.rand(count, device=device) < self.probability
        drawn = torch.zeros_like(pending)
        mask = torch.zeros_like(foreground)
        noise = torch.zeros_like(foreground[:, 0])
        for _ in range(MAX_TRIES):
            angles = torch.empty(count, device=device).uniform_(*ROTATION_DEGREES)
            candidate_noise = rotate(perlin_noise(count, height, width, device)[:, None], angles)
            candidate = (candidate_noise > 0.5).float() * foreground
            accepted = pending & (candidate.flatten(1).sum(1) >= MIN_ANOMALY_PIXELS)
            mask = torch.where(accepted.view(-1, 1, 1, 1), candidate, mask)
            noise = torch.where(accepted.view(-1, 1, 1), candidate_noise[:, 0], noise)
            pending &= ~accepted
            drawn |= accepted
            waiting, anomalous = torch.stack([pending, drawn]).tolist()
            if not any(waiting):
                break
        return mask, noise, [index for index, anomaly in enumerate(anomalous) if anomaly]

    def _source(self, noise: torch.Tensor) -> torch.Tensor:
        """One anomaly's content ``(3, H, W)``, as ``PerlinAnomalyGenerator`` makes it.

        A random texture of the anomaly source, or the grey noise itself, through three random augmentations.
        """
        height, width = noise.shape
        paths = self.generator.anomaly_source_paths
        if paths:
            path = paths[int(torch.randint(len(paths), (1,)))]
            source = read_image(path, as_tensor=True)
            if source.shape[-2:] != (height, width):
                source = resize(source, [height, width], antialias=True)
            source = source.to(noise.device, non_blocking=True)
        else:
            source = noise.expand(3, height, width) * 0.5 + 0.25
        return self.generator.augmenters(source)


def drop_synthesizer_state(checkpoint: dict[str, Any]) -> None:
    """Remove the stage-1 synthesizer's entries from a checkpoint's state dict.

    The synthesizer is built when stage 1 starts and has nothing to restore, but a checkpoint may carry its buffers
    (``synthesizer.foreground.blur.kernel`` from a model trained with foreground masks), which a strict load
    (``load_from_checkpoint``, resuming before stage 1 starts again) would refuse as unexpected keys.
    """
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        for key in [key for key in state if key.startswith("synthesizer.")]:
            del state[key]


def downsample_mask(mask: torch.Tensor, size: torch.Size | tuple[int, int], threshold: float = 0.3) -> torch.Tensor:
    """Image-size mask to a feature map's size: average-pool, then ``> threshold`` (float 0/1)."""
    return (F.adaptive_avg_pool2d(mask, size) > threshold).float()
