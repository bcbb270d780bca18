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
The statistics are buffers: checkpoints and exported graphs carry them. A model whose checkpoint holds none
(written without calibration) scores the plain distances.
"""

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .errors import AandInputError

CalibrationMode = Literal["none", "scale", "position", "envelope"]
MODES = ("none", "scale", "position", "envelope")


def _this_process(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``MapCalibration.finish``'s ``reduce`` in one process: the value as it is."""
    del op
    return tensor


def _resized(offset: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """A per-position offset brought to a distance map of another size (bilinear); a per-scale one as it is."""
    if offset.shape[-2:] in {(1, 1), size}:
        return offset
    return F.interpolate(offset, size=size, mode="bilinear", align_corners=True)


class MapCalibration(nn.Module):
    """Per-scale ``(distance - offset) / spread`` (floored at 0 for ``"envelope"``), from normal training images.

    Args:
        mode: ``"none"`` (plain distances), ``"scale"``, ``"position"`` or ``"envelope"`` (module docstring).
        num_scales: Scales of the model.
    """

    def __init__(self, mode: CalibrationMode, num_scales: int) -> None:
        super().__init__()
        if mode not in MODES:
            msg = f"map_calibration must be one of {list(MODES)}, got {mode!r}."
            raise AandInputError(msg)
        self.mode = mode
        self.num_scales = num_scales
        for index in range(num_scales if mode != "none" else 0):
            self.register_buffer(f"offset{index}", torch.zeros(1, 1, 1, 1))
            self.register_buffer(f"spread{index}", torch.ones(1, 1, 1, 1))
        self._sums: list[torch.Tensor] = []
        self._squares: list[torch.Tensor] = []
        self._maxima: list[torch.Tensor] = []
        self._count = 0

    def statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(offset, spread)`` of each scale, shallow to deep (identity when nothing was measured)."""
        return [(getattr(self, f"offset{i}"), getattr(self, f"spread{i}")) for i in range(self.num_scales)]

    def forward(self, distances: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Calibrated ``(B, 1, h, w)`` distance maps; the position means are resized to a map of another size."""
        if self.mode == "none":
            return list(distances)
        calibrated = [
            (distance - _resized(offset, distance.shape[-2:])) / spread
            for distance, (offset, spread) in zip(distances, self.statistics(), strict=True)
        ]
        return [torch.relu(d) for d in calibrated] if self.mode == "envelope" else calibrated

    def begin(self) -> None:
        """Start measuring (``update`` with batches of normal images, then ``finish``)."""
        self._sums = []
        self._squares = []
        self._maxima = []
        self._count = 0

    @torch.no_grad()
    def update(self, distances: Sequence[torch.Tensor]) -> None:
        """Add a batch's plain ``(B, 1, h, w)`` distance maps (float64 sums, on their device)."""
        if not self._sums:
            self._sums = [torch.zeros_like(d[0], dtype=torch.float64) for d in distances]
            self._squares = [torch.zeros_like(d[0], dtype=torch.float64) for d in distances]
            self._maxima = [torch.full_like(d[0], -torch.inf, dtype=torch.float64) for d in distances]
        for index, distance in enumerate(distances):
            self._sums[index] += distance.double().sum(dim=0)
            self._squares[index] += distance.double().square().sum(dim=0)
            self._maxima[index] = torch.maximum(self._maxima[index], distance.double().amax(dim=0))
        self._count += len(distances[0])

    @torch.no_grad()
    def finish(self, reduce: Any = None) -> None:  # noqa: ANN401  (callable(tensor, op) combining processes)
        """Set the buffers from what ``update`` saw.

        ``reduce(tensor, op)`` combines the processes' values under DDP (``op``: ``"sum"`` or ``"max"``); without it
        this process's are used.
        """
        if self.mode == "none" or not self._sums:
            return
        reduce = reduce or _this_process
        count = torch.tensor(float(self._count), dtype=torch.float64, device=self._sums[0].device)
        count = reduce(count, "sum")
        for index in range(self.num_scales):
            position_mean = reduce(self._sums[index], "sum") / count
            overall_mean = position_mean.mean()
            squares = reduce(self._squares[index], "sum").sum() / (count * position_mean.numel())
            spread = (squares - overall_mean.square()).clamp_min(1e-12).sqrt()
            offset = {
                "scale": overall_mean.reshape(1, 1),
                "position": position_mean,
                "envelope": reduce(self._maxima[index], "max"),
            }[self.mode]
            spread = spread if self.mode != "envelope" else torch.ones_like(spread)
            setattr(self, f"offset{index}", offset.float().reshape(1, 1, *offset.shape[-2:]).clone())
            setattr(self, f"spread{index}", spread.float().reshape(1, 1, 1, 1).clone())
        self.begin()

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
        return f"mode={self.mode!r}"


@torch.no_grad()
def calibrate(
    calibration: MapCalibration,
    distances: Any,  # noqa: ANN401  (a callable: images -> the model's plain distance maps)
    batches: Any,  # noqa: ANN401  (an iterable of pre-processed image batches)
    reduce: Any = None,  # noqa: ANN401  (a callable(tensor, op) combining processes, see ``MapCalibration.finish``)
) -> None:
    """Measure ``calibration``'s statistics from ``distances(images)`` over the normal image ``batches``."""
    if calibration.mode == "none":
        return
    calibration.begin()
    for images in batches:
        calibration.update(distances(images))
    calibration.finish(reduce)
