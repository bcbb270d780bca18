"""Map calibration: each scale's ``1 - cos`` map measured against its own level on normal images.

AAND's anomaly map adds the three scales' distances with equal weight, although each scale has its own noise on
normal images (a cosine over Lite0's 24 channels at stride 4 is noisier than over 112 channels at stride 16), and
on aligned objects the level also depends on the position (the table under a vignetted light, an illumination
ramp). With calibration, after the last training epoch the model measures each scale's distance on its normal
training images and scores, per scale, before adding the scales:

- ``"scale"``: ``(distance - mean) / spread``, mean and spread over the whole map;
- ``"position"``: ``(distance - mean at the position) / spread``;
- ``"envelope"``: ``max(0, distance - largest normal distance at the position)``: only what exceeds every
  normal training image at that position counts.

Every mode is the same computation, ``max((distance - offset) / spread, floor)``, with buffers that the checkpoint
and the exported graph carry. A model whose checkpoint holds none (written without calibration) scores the plain
distances. The mode can differ by category (``resolve_map_calibration``), as the foreground choice does.

The calibration also holds the map's support (``measure_support``): where the training images showed the object.
On objects photographed on a plain background, the union of the training images' automatic foregrounds (every pose
the line produced, each position counted by its finest feature cell) bounds where a defect can be; the map is
multiplied by it, so the background's grain (which no student predicts) cannot outscore a defect. Only foreground
inside the frame counts: what touches the image border (vignetted corners, shadows at the edges) is background.
Where too few training images show an object inside the frame (textures, objects cut by the border), the support is
the whole image.
"""

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .errors import AandInputError
from .settings import category_choice

logger = logging.getLogger(__name__)

CalibrationMode = Literal["none", "scale", "position", "envelope"]
MODES = ("none", "scale", "position", "envelope")
NO_FLOOR = torch.finfo(torch.float32).min
MIN_OBJECT_SHARE = 0.1  # share of training images that must show an object on a background for a support
MIN_INSIDE_SHARE = 0.01  # share of an image its foreground inside the frame must cover to show an object
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def _this_process(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``calibrate``'s ``reduce`` in one process: the value as it is."""
    del op
    return tensor


def _resized(offset: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """A per-position offset brought to a distance map of another size (bilinear); a per-scale one as it is."""
    if offset.shape[-2:] in {(1, 1), size}:
        return offset
    return F.interpolate(offset, size=size, mode="bilinear", align_corners=True)


def inside_the_frame(masks: torch.Tensor) -> torch.Tensor:
    """The foreground of ``(B, 1, H, W)`` 0/1 masks that is not connected (8 neighbours) to the image border."""
    border = torch.ones_like(masks)
    border[..., 1:-1, 1:-1] = 0
    reached = masks * border
    grown = F.max_pool2d(reached, kernel_size=3, stride=1, padding=1) * masks
    while not torch.equal(grown, reached):
        reached = grown
        grown = F.max_pool2d(reached, kernel_size=3, stride=1, padding=1) * masks
    return masks - reached


def check_map_calibration(setting: str | Mapping[str, str]) -> None:
    """Refuse a mode, or a per-category mapping of modes, that ``MapCalibration`` does not know."""
    modes = [setting] if isinstance(setting, str) else list(setting.values())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        msg = (
            f"map_calibration must be one of {list(MODES)}, or a mapping of categories (and 'default') to those, "
            f"got {setting!r}."
        )
        raise AandInputError(msg)


def resolve_map_calibration(setting: str | Mapping[str, str], datamodule: object) -> CalibrationMode:
    """The mode for ``datamodule``'s category: ``setting`` itself, or its entry (else ``"default"``, else ``"none"``).

    A mapping lets one config carry a per-category choice (aligned objects by position, textures by scale) that
    ``--data.category`` selects.
    """
    return category_choice(setting, datamodule, "none", "map calibration")


class MapCalibration(nn.Module):
    """Per-scale ``max((distance - offset) / spread, floor)``, the statistics measured on normal training images.

    Args:
        enabled: Hold the statistics (buffers); without them the plain distances pass through.
        num_scales: Scales of the model.
    """

    def __init__(self, enabled: bool, num_scales: int) -> None:
        super().__init__()
        self.enabled = enabled
        self.num_scales = num_scales
        for index in range(num_scales if enabled else 0):
            self.register_buffer(f"offset{index}", torch.zeros(1, 1, 1, 1))
            self.register_buffer(f"spread{index}", torch.ones(1, 1, 1, 1))
            self.register_buffer(f"floor{index}", torch.full((1, 1, 1, 1), NO_FLOOR))
        if enabled:
            self.register_buffer("support", torch.ones(1, 1, 1, 1))

    def take_shapes(self, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Give each offset and the support the shape of ``state_dict``'s (per position: its map's size), to load it."""
        names = [f"offset{index}" for index in range(self.num_scales)] + ["support"] if self.enabled else []
        for name in names:
            stored = state_dict.get(f"{prefix}{name}")
            current = getattr(self, name)
            if isinstance(stored, torch.Tensor) and stored.dim() == current.dim() and stored.shape[:2] == (1, 1):
                setattr(self, name, current.new_zeros(stored.shape))

    def statistics(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(offset, spread, floor)`` of each scale, shallow to deep."""
        return [
            (getattr(self, f"offset{i}"), getattr(self, f"spread{i}"), getattr(self, f"floor{i}"))
            for i in range(self.num_scales if self.enabled else 0)
        ]

    def forward(self, distances: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Calibrated ``(B, 1, h, w)`` distance maps; per-position offsets are resized to a map of another size."""
        if not self.enabled:
            return list(distances)
        return [
            torch.maximum((distance - _resized(offset, distance.shape[-2:])) / spread, floor)
            for distance, (offset, spread, floor) in zip(distances, self.statistics(), strict=True)
        ]

    def restrict(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """``anomaly_map`` ``(B, 1, H, W)`` times the support, resized to it (bilinear); unchanged without a support."""
        if not self.enabled or self.support.shape[-2:] == (1, 1):
            return anomaly_map
        size = anomaly_map.shape[-2:]
        return anomaly_map * F.interpolate(self.support, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def measure_support(self, foregrounds: Iterable[torch.Tensor], cell: int, reduce: Reduce | None = None) -> None:
        """Set the support from the training images' ``(B, 1, H, W)`` foreground masks (``ForegroundEstimator``).

        An image shows an object when its foreground inside the frame (``inside_the_frame``: foreground touching
        the border is background) covers at least ``MIN_INSIDE_SHARE`` of it. With at least ``MIN_OBJECT_SHARE`` of
        the images showing one, the support is the union of those foregrounds, a position counting when any pixel of
        its ``cell`` x ``cell`` cell (the finest feature stride) was foreground; otherwise the whole image.
        """
        if not self.enabled:
            return
        reduce = reduce or _this_process
        union: torch.Tensor | None = None
        objects = 0
        count = 0
        for masks in foregrounds:
            inside = inside_the_frame(masks.float())
            cells = F.max_pool2d(inside, kernel_size=cell, stride=cell, ceil_mode=True)
            shows_object = inside.flatten(1).mean(dim=1) >= MIN_INSIDE_SHARE
            union = torch.zeros_like(cells[:1]) if union is None else union
            union = torch.cat([union, cells[shows_object]]).amax(dim=0, keepdim=True)
            objects += int(shows_object.sum())
            count += len(masks)
        support = torch.ones(1, 1, 1, 1, device=self.support.device)
        if union is not None:
            totals = reduce(torch.tensor([objects, count], dtype=torch.float64, device=union.device), "sum")
            union = reduce(union, "max")
            share = float(totals[0] / totals[1].clamp_min(1))
            if share >= MIN_OBJECT_SHARE:
                support = union
            logger.info(
                "Map support: %d of %d training images show an object inside the frame; scoring %s.",
                int(totals[0]),
                int(totals[1]),
                f"{float(support.mean()):.0%} of the image, where they showed it"
                if support.numel() > 1
                else "the whole image",
            )
        with torch.inference_mode(mode=False):
            self.support = support.float().clone()

    @torch.no_grad()
    def measure(
        self, mode: CalibrationMode, batches: Iterable[Sequence[torch.Tensor]], reduce: Reduce | None = None
    ) -> None:
        """Set the buffers for ``mode`` from the plain distance maps of normal image ``batches``.

        ``reduce(tensor, op)`` combines the processes' values under DDP (``op``: ``"sum"`` or ``"max"``).
        ``"none"`` sets the identity.
        """
        if not self.enabled:
            return
        reduce = reduce or _this_process
        sums: list[torch.Tensor] = []
        squares: list[torch.Tensor] = []
        maxima: list[torch.Tensor] = []
        count = 0
        for distances in batches if mode != "none" else ():
            if not sums:
                sums = [torch.zeros_like(d[0], dtype=torch.float64) for d in distances]
                squares = [torch.zeros_like(d[0], dtype=torch.float64) for d in distances]
                maxima = [torch.full_like(d[0], -torch.inf, dtype=torch.float64) for d in distances]
            for index, distance in enumerate(distances):
                sums[index] += distance.double().sum(dim=0)
                squares[index] += distance.double().square().sum(dim=0)
                maxima[index] = torch.maximum(maxima[index], distance.double().amax(dim=0))
            count += len(distances[0])
        for index in range(self.num_scales):
            offset, spread, floor = self._identity(index)
            if sums:
                total = reduce(torch.tensor(float(count), dtype=torch.float64, device=sums[index].device), "sum")
                position_mean = reduce(sums[index], "sum") / total
                overall_mean = position_mean.mean()
                mean_square = reduce(squares[index], "sum").sum() / (total * position_mean.numel())
                spread = (mean_square - overall_mean.square()).clamp_min(1e-12).sqrt().reshape(1, 1)
                offset = {"scale": overall_mean.reshape(1, 1), "position": position_mean}.get(mode)
                if mode == "envelope":
                    offset = reduce(maxima[index], "max")
                    spread = torch.ones_like(spread)
                    floor = torch.zeros_like(spread)
            with torch.inference_mode(mode=False):  # validation runs in inference mode; buffers must stay exportable
                setattr(self, f"offset{index}", offset.float().reshape(1, 1, *offset.shape[-2:]).clone())
                setattr(self, f"spread{index}", spread.float().reshape(1, 1, 1, 1).clone())
                setattr(self, f"floor{index}", floor.float().reshape(1, 1, 1, 1).clone())

    def _identity(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = getattr(self, f"offset{index}").device
        zero = torch.zeros(1, 1, device=device)
        return zero, torch.ones_like(zero), torch.full_like(zero, NO_FLOOR)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # noqa: ANN401
        """Take the statistics at their saved shape; a checkpoint without them keeps the identity."""
        missing = args[2]  # local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        for name, buffer in list(self.named_buffers(recurse=False)):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=buffer.device))
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing[:] = [key for key in missing if not key.startswith(prefix)]

    def extra_repr(self) -> str:
        """Shown in the module summary."""
        return f"enabled={self.enabled}"


def calibration_enabled(setting: str | Mapping[str, str]) -> bool:
    """Whether any category gets a calibration other than ``"none"``."""
    return any(mode != "none" for mode in ([setting] if isinstance(setting, str) else setting.values()))
