"""AAND losses: focal and amplification (stage 1), hard knowledge distillation (stage 2), and their guard.

``AmplificationLoss`` and ``DistillationLoss`` are the modules the Lightning model builds; the functions
are their per-scale terms. ``NonFiniteLossGuard`` stops training when a loss becomes NaN or infinite.
The paper's values are the defaults of ``Aand``'s constructor; here every setting is an argument.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .components.errors import AandInputError
from .components.synthesis import downsample_mask

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

# Most normal and anomalous positions per scale that the amplification loss compares (the authors' numbers).
MAX_NORMAL_POSITIONS = 5000
MAX_ANOMALOUS_POSITIONS = 1000


def focal_loss(gate: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Binary focal loss of the gate against the 0/1 mask, mean over positions, in float32.

    float32 whatever the gate's precision: ``1 - 1e-6`` rounds to 1 in bfloat16 and float16, where a saturated gate
    would give ``log(0)``.
    """
    gate = gate.float().clamp(1e-6, 1 - 1e-6)
    positive = -alpha * (1 - gate) ** gamma * target * torch.log(gate)
    negative = -(1 - alpha) * gate**gamma * (1 - target) * torch.log(1 - gate)
    return (positive + negative).mean()


def _positions(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B*H*W, C)``."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def sample_positions(
    candidates: torch.Tensor, limit: int, *, read_device: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``limit`` positions drawn uniformly among the ``True`` entries of ``candidates``, and which are valid.

    On an accelerator without reading the device: the ``True`` entries get random keys in [0, 1), the others 2, and
    the ``min(limit, candidates.numel())`` smallest keys win, so every candidate is taken before any non-candidate,
    and the second value says which drawn positions are candidates. On the CPU, where reading costs nothing, only
    candidates are drawn (second value ``None``), so that the loss's matrix is no larger than needed.
    ``read_device`` chooses the way (default: read on the CPU only).
    """
    if read_device is None:
        read_device = candidates.device.type == "cpu"
    if read_device:
        index = torch.nonzero(candidates).squeeze(1)
        if index.numel() > limit:
            index = index[torch.randperm(index.numel())[:limit]]
        return index, None
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill_(~candidates, 2.0)
    index = keys.topk(min(limit, candidates.numel()), largest=False, sorted=False).indices
    return index, candidates[index]


def amplification_loss(
    features: torch.Tensor,
    amplified: torch.Tensor,
    mask: torch.Tensor,
    foreground: torch.Tensor | None,
    margin: float,
    max_normal: int = MAX_NORMAL_POSITIONS,
    max_anomalous: int = MAX_ANOMALOUS_POSITIONS,
) -> torch.Tensor:
    """Push amplified anomalous features ``margin`` further from normal ones than the teacher's.

    ``mean(relu(cos(F_n, F^A_a) - (cos(F_n, F_a) - margin)))`` over up to ``max_normal`` normal
    (foreground) and ``max_anomalous`` anomalous positions; zero when either set is empty.
    ``mask`` and ``foreground`` are 0/1 maps at the features' size.
    """
    anomalous = mask.flatten() > 0.5
    normal = ~anomalous
    if foreground is not None:
        normal &= foreground.flatten() > 0.5
    anomalous_idx, anomalous_valid = sample_positions(anomalous, max_anomalous)
    normal_idx, normal_valid = sample_positions(normal, max_normal)
    plain = _positions(features)
    boosted = _positions(amplified)
    reference = F.normalize(plain[normal_idx], dim=1)
    # cos(F_n, F^A_a) - cos(F_n, F_a) as one product: a single (normal x anomalous) matrix, not three
    shift = F.normalize(boosted[anomalous_idx], dim=1) - F.normalize(plain[anomalous_idx], dim=1)
    terms = (reference @ shift.t()).add_(margin).relu_()
    if normal_valid is None or anomalous_valid is None:  # CPU: every drawn position is valid
        return terms.mean(dtype=torch.float32) if terms.numel() else amplified.sum() * 0.0
    pairs = normal_valid[:, None] & anomalous_valid[None, :]
    return (terms * pairs).sum(dtype=torch.float32) / pairs.sum().clamp_min(1)


def cosine_loss(targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor]) -> torch.Tensor:
    """RD4AD's plain distillation loss: mean ``1 - cos`` of the flattened maps, summed over scales."""
    loss = targets[0].new_zeros((), dtype=torch.float32)
    for target, student in zip(targets, students, strict=True):
        loss = loss + (1 - F.cosine_similarity(target.flatten(1).float(), student.flatten(1).float(), dim=1)).mean()
    return loss


def hkd_loss(targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Hard knowledge distillation, summed over scales.

    Per scale: the mean of the ``top_k`` largest per-position ``1 - cos`` of each image, plus the
    global term ``cosine_loss`` (mean ``1 - cos`` between each image's flattened maps).
    """
    hard = targets[0].new_zeros((), dtype=torch.float32)
    for target, student in zip(targets, students, strict=True):
        distance = 1 - F.cosine_similarity(target.float(), student.float(), dim=1).flatten(1)  # (B, H*W)
        hard = hard + distance.topk(top_k, dim=1).values.mean()
    return hard + cosine_loss(targets, students)


class AmplificationLoss(nn.Module):
    """Stage-1 loss: focal loss of each scale's gate plus ``weight`` x the amplification loss.

    Args:
        focal_alpha: Focal loss alpha.
        focal_gamma: Focal loss gamma.
        weight: Weight of the amplification term.
        margin: Margin of the amplification term.
    """

    def __init__(self, focal_alpha: float, focal_gamma: float, weight: float, margin: float) -> None:
        super().__init__()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight = weight
        self.margin = margin

    def forward(
        self,
        features: Sequence[torch.Tensor],
        amplified: Sequence[torch.Tensor],
        gates: Sequence[torch.Tensor],
        mask: torch.Tensor,
        foreground: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "focal", "amplification"}`` from per-scale features and gates and image-size 0/1 masks."""
        focal = features[0].new_zeros((), dtype=torch.float32)
        amplification = features[0].new_zeros((), dtype=torch.float32)
        for plain, boosted, gate in zip(features, amplified, gates, strict=True):
            scale_mask = downsample_mask(mask, plain.shape[-2:])
            scale_foreground = None if foreground is None else downsample_mask(foreground, plain.shape[-2:])
            focal = focal + focal_loss(gate, scale_mask, self.focal_alpha, self.focal_gamma)
            amplification = amplification + amplification_loss(
                plain, boosted, scale_mask, scale_foreground, margin=self.margin
            )
        return {"loss": focal + self.weight * amplification, "focal": focal, "amplification": amplification}


class DistillationLoss(nn.Module):
    """Stage-2 loss between the amplified teacher features and the student's reconstruction.

    Args:
        kind: ``"hkd"`` (AAND's hard knowledge distillation) or ``"cosine"`` (RD4AD's plain loss, for ablations).
        top_k: Positions per image in HKD's hard term.
    """

    def __init__(self, kind: Literal["hkd", "cosine"], top_k: int) -> None:
        super().__init__()
        if kind not in {"hkd", "cosine"}:
            msg = f"distillation_loss must be 'hkd' or 'cosine' (the paper uses 'hkd'), got {kind!r}."
            raise AandInputError(msg)
        self.kind = kind
        self.top_k = top_k

    def forward(self, targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor]) -> torch.Tensor:
        """The loss, summed over scales."""
        if self.kind == "hkd":
            return hkd_loss(targets, students, self.top_k)
        return cosine_loss(targets, students)

    def extra_repr(self) -> str:
        """Shown in the module summary."""
        return f"kind={self.kind!r}, top_k={self.top_k}"


def non_finite_loss_message(
    values: Mapping[str, float],
    stage: int,
    epoch: int,
    step: int,
    learning_rate: float,
    checkpoints: Sequence[str | Path] = (),
) -> str:
    """What to tell a user whose loss became NaN or infinite: where, which terms, and whether a checkpoint is intact.

    ``checkpoints``: paths the run has saved; the message says one is intact only if it is on disk.
    """
    bad = [name for name, value in values.items() if not math.isfinite(value) and name != "loss"] or ["loss"]
    saved = next((str(path) for path in checkpoints if Path(path).is_file()), None)
    kept = (
        f"the last saved checkpoint ({saved}) is intact: resume from it with --ckpt_path, or start again"
        if saved
        else "no checkpoint has been saved yet in this run, so start again"
    )
    return (
        f"AAND stage {stage}: the loss term(s) {bad} became non-finite at epoch {epoch}, optimiser step {step} "
        f"(values {dict(values)}). Training stops here instead of producing a NaN model; {kept} after lowering the "
        f"learning rate (now {learning_rate}) and checking the images for NaN/Inf values."
    )


class NonFiniteLossGuard:
    """Stops training when the total loss becomes NaN or infinite, without reading the device at every step.

    ``record`` keeps, on the losses' device, the terms of the first step since the last ``check`` whose total is
    not finite, and says when a check is due: every ``interval`` steps on an accelerator, every step on the CPU
    (where reading costs nothing). ``check`` reads that record once and raises ``FloatingPointError`` naming the
    stage, epoch, step and terms; call it also at each epoch's end, before the checkpoint is saved. Under DDP every
    process learns whether any process saw a non-finite loss, so all stop together.

    Args:
        interval: Steps between two reads of the record on an accelerator.
    """

    def __init__(self, interval: int = 50) -> None:
        self.interval = interval
        self._steps: list[tuple[int, int, int, tuple[str, ...]]] = []
        self._first: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def record(self, losses: Mapping[str, torch.Tensor], stage: int, epoch: int, step: int) -> bool:
        """Remember this step's loss terms (``losses["loss"]`` is the total); ``True`` when a check is due."""
        values = torch.stack([value.detach().float().reshape(()) for value in losses.values()])
        if self._first is None or self._values is None or self._values.shape != values.shape:
            self._first = torch.full((), -1, dtype=torch.long, device=values.device)
            self._values = torch.zeros_like(values)
        first = ~torch.isfinite(values[list(losses).index("loss")]) & (self._first < 0)
        self._first = torch.where(first, len(self._steps), self._first)
        self._values = torch.where(first, values, self._values)
        self._steps.append((stage, epoch, step, tuple(losses)))
        return values.device.type == "cpu" or len(self._steps) >= self.interval

    def check(
        self, learning_rate: float, checkpoints: Sequence[str | Path] = (), strategy: "Strategy | None" = None
    ) -> None:
        """Raise ``FloatingPointError`` if a step recorded since the last check had a non-finite loss."""
        if not self._steps or self._first is None or self._values is None:
            return
        steps = self._steps
        index = int(self._first)
        values = self._values.tolist()
        self._steps = []
        self._first = None
        self._values = None
        anywhere = index >= 0 if strategy is None else strategy.reduce_boolean_decision(index >= 0, all=False)
        if not anywhere:
            return
        if index < 0:
            stage, epoch, _, _ = steps[-1]
            msg = (
                f"AAND stage {stage}, epoch {epoch}: the loss became non-finite on another process of this run (see "
                "its message). Training stops on every process."
            )
            raise FloatingPointError(msg)
        stage, epoch, step, names = steps[index]
        terms = dict(zip(names, values, strict=True))
        raise FloatingPointError(non_finite_loss_message(terms, stage, epoch, step, learning_rate, checkpoints))
