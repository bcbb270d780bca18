"""Stage-1 synthetic anomalies: anomalib's DRAEM-style Perlin generator, optional foreground masking.

Images arrive normalised by the pre-processor; synthesis happens in [0, 1] pixel space and the
result is normalised again, so the teacher sees what it sees at inference. As in the authors' code,
an anomaly that falls (almost) entirely on background is drawn again, up to ``MAX_TRIES`` times, so
the share of anomalous images stays at ``probability``.
"""

import atexit
import functools
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.models.components.filters import GaussianBlur2d
from torch import nn
from torchvision.transforms.v2 import Normalize

from .textures import write_texture_bank

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PROCEDURAL = "procedural"  # anomaly_source_path value: a texture bank generated when stage 1 starts
MAX_TRIES = 10  # draws of an anomaly before an image stays normal (the authors' limit)
MIN_ANOMALY_PIXELS = 5  # an anomaly smaller than this on the foreground counts as missed (authors: > 4)


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


def _otsu_threshold(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of the values in [0, 1] (one image)."""
    histogram = torch.histc(values, bins=bins, min=0.0, max=1.0)
    probability = histogram / histogram.sum().clamp_min(1)
    centres = (torch.arange(bins, device=values.device, dtype=values.dtype) + 0.5) / bins
    weight_low = torch.cumsum(probability, 0)
    mean_low = torch.cumsum(probability * centres, 0)
    total_mean = mean_low[-1]
    between = (total_mean * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    return centres[int(torch.argmax(between))]


class ForegroundEstimator(nn.Module):
    """Automatic foreground mask: sigma-8 blurred grey levels split by Otsu's threshold.

    The side of the threshold that covers most of the image border is background. The whole image
    counts as foreground when the split is not an object on a background: when the two sides' mean grey
    levels differ by less than ``min_contrast`` (textures, also under a gentle illumination gradient,
    which Otsu would otherwise cut into arbitrary halves), or when it leaves under ``min_fraction`` or over
    ``1 - min_fraction`` of the image as foreground.
    """

    def __init__(self, sigma: float = 8.0, min_fraction: float = 0.05, min_contrast: float = 0.1) -> None:
        super().__init__()
        self.blur = GaussianBlur2d(sigma=sigma, channels=1)
        self.min_fraction = min_fraction
        self.min_contrast = min_contrast

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] to ``(B, 1, H, W)`` masks in {0, 1}."""
        grey = self.blur(images.mean(dim=1, keepdim=True)).clamp(0, 1)
        masks = []
        for image in grey:
            above = image > _otsu_threshold(image.flatten())
            if not above.any() or above.all() or image[above].mean() - image[~above].mean() < self.min_contrast:
                masks.append(torch.ones_like(image))
                continue
            border = torch.cat([above[0, 0], above[0, -1], above[0, :, 0], above[0, :, -1]]).float().mean()
            foreground = ~above if border > 0.5 else above
            fraction = foreground.float().mean()
            if fraction < self.min_fraction or fraction > 1 - self.min_fraction:
                foreground = torch.ones_like(foreground)
            masks.append(foreground.float())
        return torch.stack(masks)


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
        # the generator always draws an anomaly; which images get one is decided here, so retries keep the share
        self.generator = PerlinAnomalyGenerator(
            anomaly_source_path=anomaly_source_path,
            probability=1.0,
            blend_factor=(0.2, 1.0),
        )
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
        transform = getattr(pre_processor, "transform", None)
        normalize = extract_transforms_by_type(transform, Normalize) if transform is not None else []
        if normalize:
            kwargs |= {"mean": torch.tensor(normalize[0].mean), "std": torch.tensor(normalize[0].std)}
        return cls(**kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(augmented images, anomaly mask, foreground mask)``; masks are ``(B, 1, H, W)``."""
        pixels = (images * self.std + self.mean).clamp(0, 1)
        foreground = torch.ones_like(pixels[:, :1])
        if self.foreground is not None:
            foreground = self.foreground(pixels)
        augmented = pixels.clone()
        mask = torch.zeros_like(foreground)
        chosen = torch.rand(len(pixels)) < self.probability
        for index in torch.nonzero(chosen).flatten().tolist():
            image = pixels[index : index + 1]
            region = foreground[index : index + 1]
            for _ in range(MAX_TRIES):
                candidate, candidate_mask = self.generator(image)
                candidate_mask = candidate_mask * region
                if candidate_mask.sum() >= MIN_ANOMALY_PIXELS:
                    augmented[index] = (image + (candidate - image) * candidate_mask)[0]
                    mask[index] = candidate_mask[0]
                    break
        return (augmented - self.mean) / self.std, mask, foreground


def downsample_mask(mask: torch.Tensor, size: torch.Size | tuple[int, int], threshold: float = 0.3) -> torch.Tensor:
    """Image-size mask to a feature map's size: average-pool, then ``> threshold`` (float 0/1)."""
    return (F.adaptive_avg_pool2d(mask, size) > threshold).float()
