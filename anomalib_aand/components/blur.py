"""Gaussian blur as two 1-D passes: what anomalib's ``GaussianBlur2d`` computes, at a fraction of its cost."""

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``sigma`` over anomalib's kernel size ``2 * int(4 * sigma + 0.5) + 1``.

    Shaped ``(1, 1, 1, K)``: a horizontal convolution kernel; transposed, the vertical one.
    """
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).view(1, 1, 1, -1)


class SeparableGaussianBlur(nn.Module):
    """Gaussian blur of ``(B, 1, H, W)``: a horizontal, then a vertical 1-D convolution, borders reflected.

    The result of anomalib's ``GaussianBlur2d`` (same kernel size and borders: its 2-D kernel is the outer product
    of this one) with ``2 K`` instead of ``K^2`` multiply-adds per pixel (``K`` = 33 at sigma 4, 65 at sigma 8).
    Images no larger than the kernel's radius cannot be reflected that far: their borders are replicated.

    Args:
        sigma: Standard deviation in pixels.
        persistent: Keep the kernel in the state dict (a checkpoint then carries the blur).
    """

    def __init__(self, sigma: float, persistent: bool = True) -> None:
        super().__init__()
        self.register_buffer("kernel", gaussian_kernel(sigma), persistent=persistent)

    @property
    def radius(self) -> int:
        """Pixels the blur reaches on each side."""
        return self.kernel.shape[-1] // 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Blurred ``images``, same shape and dtype as the kernel's."""
        radius = self.radius
        mode = "reflect" if radius < min(images.shape[-2:]) else "replicate"
        padded = F.pad(images, (radius, radius, radius, radius), mode=mode)
        return F.conv2d(F.conv2d(padded, self.kernel), self.kernel.transpose(-1, -2))
