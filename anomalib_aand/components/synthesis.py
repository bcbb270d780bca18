"""Stage-1 synthetic anomalies: anomalib's DRAEM-style Perlin generator, optional foreground masking.

Images arrive normalised by the pre-processor; synthesis happens in [0, 1] pixel space and the
result is normalised again, so the teacher sees what it sees at inference.
"""

import logging
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.models.components.filters import GaussianBlur2d
from torch import nn
from torchvision.transforms.v2 import Normalize

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def check_anomaly_source(path: str | Path | None) -> None:
    """Fail early, with advice, when ``anomaly_source_path`` names no usable image folder."""
    if path is None:
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        msg = (
            f"anomaly_source_path {str(folder)!r} is not a folder. Point it at a folder of texture images "
            "(the paper uses DTD), or leave it unset to blend Perlin noise instead."
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

    The side of the threshold that covers most of the image border is background. When the split
    leaves under ``min_fraction`` or over ``1 - min_fraction`` of the image as foreground (textures,
    flat images) the whole image counts as foreground.
    """

    def __init__(self, sigma: float = 8.0, min_fraction: float = 0.05) -> None:
        super().__init__()
        self.blur = GaussianBlur2d(sigma=sigma, channels=1)
        self.min_fraction = min_fraction

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] to ``(B, 1, H, W)`` masks in {0, 1}."""
        grey = self.blur(images.mean(dim=1, keepdim=True)).clamp(0, 1)
        masks = []
        for image in grey:
            above = image > _otsu_threshold(image.flatten())
            border = torch.cat([above[0, 0], above[0, -1], above[0, :, 0], above[0, :, -1]]).float().mean()
            foreground = ~above if border > 0.5 else above
            fraction = foreground.float().mean()
            if fraction < self.min_fraction or fraction > 1 - self.min_fraction:
                foreground = torch.ones_like(foreground)
            masks.append(foreground.float())
        return torch.stack(masks)


class AnomalySynthesizer(nn.Module):
    """Add synthetic anomalies to a normalised batch.

    Args:
        probability: Share of images that get an anomaly (paper: 0.8).
        anomaly_source_path: Folder of texture images blended into the anomalies; ``None`` blends noise.
        foreground_mask: Restrict anomalies to the automatic foreground (``ForegroundEstimator``).
        mean: Per-channel mean of the pre-processor's Normalize; ``None`` when images are in [0, 1].
        std: Per-channel std of the pre-processor's Normalize.
    """

    def __init__(
        self,
        probability: float = 0.8,
        anomaly_source_path: str | Path | None = None,
        foreground_mask: bool = False,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_anomaly_source(anomaly_source_path)
        self.generator = PerlinAnomalyGenerator(
            anomaly_source_path=anomaly_source_path,
            probability=probability,
            blend_factor=(0.2, 1.0),
        )
        self.foreground = ForegroundEstimator() if foreground_mask else None
        self.register_buffer(
            "mean", torch.zeros(1, 3, 1, 1) if mean is None else mean.view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.ones(1, 3, 1, 1) if std is None else std.view(1, -1, 1, 1), persistent=False)

    @classmethod
    def for_pre_processor(cls, pre_processor: object, **kwargs: object) -> "AnomalySynthesizer":
        """A synthesizer for images normalised by ``pre_processor``'s Normalize (if it has one)."""
        transform = getattr(pre_processor, "transform", None)
        normalize = extract_transforms_by_type(transform, Normalize) if transform is not None else []
        if normalize:
            kwargs |= {"mean": torch.tensor(normalize[0].mean), "std": torch.tensor(normalize[0].std)}
        return cls(**kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(augmented images, anomaly mask, foreground mask)``; masks are ``(B, 1, H, W)``."""
        pixels = (images * self.std + self.mean).clamp(0, 1)
        augmented, mask = self.generator(pixels)
        foreground = torch.ones_like(mask)
        if self.foreground is not None:
            foreground = self.foreground(pixels)
            mask = mask * foreground
            augmented = pixels + (augmented - pixels) * foreground
        return (augmented - self.mean) / self.std, mask, foreground


def mask_at(mask: torch.Tensor, size: torch.Size | tuple[int, int], threshold: float = 0.3) -> torch.Tensor:
    """Image-size mask to a feature map's size: average-pool, then ``> threshold`` (float 0/1)."""
    return (F.adaptive_avg_pool2d(mask, size) > threshold).float()
