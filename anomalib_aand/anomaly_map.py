"""Anomaly map and image score from the amplified teacher and the student."""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .components.blur import SeparableGaussianBlur, gaussian_kernel
from .components.calibration import MapCalibration


def without_autocast(device_type: str) -> AbstractContextManager:
    """Autocast switched off where it is on (steps under mixed precision); otherwise nothing, so exports stay plain."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class AnomalyMapGenerator(nn.Module):
    """Sum over scales of ``1 - cos`` (calibrated, see ``MapCalibration``), upsampled, supported, blurred.

    The calibration's support (where the training images showed the object) multiplies the sum before the blur.

    Computed in the module's own precision (float32 unless the model was converted), also under mixed precision,
    so that the thresholds and normalisation statistics that validation stores (and an export carries) come from
    full-precision maps.

    The blur (``SeparableGaussianBlur``: anomalib's ``GaussianBlur2d`` result in two 1-D passes, so that a wide
    kernel stays cheap) keeps its kernel in a buffer: the checkpoint and the exported graph carry it, and a
    checkpoint's kernel is taken at its saved size (``set_sigma`` chose it per category when that model trained; a
    checkpoint holding ``GaussianBlur2d``'s 2-D kernel loads it as its 1-D factor).

    Args:
        sigma: Standard deviation of the Gaussian blur in pixels (the paper: 4).
        calibration: Hold a ``MapCalibration``'s statistics.
        num_scales: Scales of the model (for the calibration's statistics).
    """

    def __init__(self, sigma: float = 4.0, calibration: bool = False, num_scales: int = 3) -> None:
        super().__init__()
        self.blur = SeparableGaussianBlur(sigma)
        self.calibration = MapCalibration(calibration, num_scales)

    @property
    def blur_radius(self) -> int:
        """Pixels the blur reaches on each side; the map's sides must exceed it (reflected borders)."""
        return self.blur.radius

    def set_sigma(self, sigma: float) -> None:
        """Blur with ``sigma`` from now on (its kernel on the current one's device and dtype)."""
        self.blur.kernel = gaussian_kernel(sigma).to(self.blur.kernel)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # noqa: ANN401
        """Take the saved blur kernel at its size (a per-category sigma may differ from the constructor's).

        Checkpoints written with anomalib's ``GaussianBlur2d`` hold its 2-D kernel: its column sums are the 1-D one.
        """
        key = f"{prefix}blur.kernel"
        saved = state_dict.get(key)
        if isinstance(saved, torch.Tensor):
            if saved.dim() == 4 and saved.shape[-2] > 1:
                saved = state_dict[key] = saved.sum(dim=-2, keepdim=True)
            if saved.shape != self.blur.kernel.shape:
                self.blur.kernel = torch.empty_like(saved, device=self.blur.kernel.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def distances(self, targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale's ``(B, 1, h, w)`` map of ``1 - cos`` between target and student features, in the module dtype."""
        dtype = self.blur.kernel.dtype
        with without_autocast(targets[0].device.type):
            return [
                1 - F.cosine_similarity(target.to(dtype), student.to(dtype), dim=1).unsqueeze(1)
                for target, student in zip(targets, students, strict=True)
            ]

    def forward(
        self,
        targets: Sequence[torch.Tensor],
        students: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
    ) -> torch.Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map in the module's dtype."""
        with without_autocast(targets[0].device.type):
            upsampled = [
                F.interpolate(distance, size=tuple(image_size), mode="bilinear", align_corners=True)
                for distance in self.calibration(self.distances(targets, students))
            ]
            return self.blur(self.calibration.restrict(torch.stack(upsampled).sum(dim=0)))
