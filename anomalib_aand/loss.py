"""AAND losses: focal and amplification (stage 1), hard knowledge distillation (stage 2).

``AmplificationLoss`` and ``DistillationLoss`` are the modules the Lightning model builds; the functions
are their per-scale terms.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .components.synthesis import mask_at


def focal_loss(gate: torch.Tensor, target: torch.Tensor, alpha: float = 0.8, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss of the gate against the 0/1 mask, mean over positions."""
    gate = gate.clamp(1e-6, 1 - 1e-6)
    positive = -alpha * (1 - gate) ** gamma * target * torch.log(gate)
    negative = -(1 - alpha) * gate**gamma * (1 - target) * torch.log(1 - gate)
    return (positive + negative).mean()


def _positions(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B*H*W, C)``."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _sample(index: torch.Tensor, limit: int) -> torch.Tensor:
    if index.numel() <= limit:
        return index
    return index[torch.randperm(index.numel(), device=index.device)[:limit]]


def amplification_loss(
    features: torch.Tensor,
    amplified: torch.Tensor,
    mask: torch.Tensor,
    foreground: torch.Tensor | None = None,
    margin: float = 0.3,
    max_normal: int = 5000,
    max_anomalous: int = 1000,
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
    anomalous_idx = _sample(torch.nonzero(anomalous).squeeze(1), max_anomalous)
    normal_idx = _sample(torch.nonzero(normal).squeeze(1), max_normal)
    if anomalous_idx.numel() == 0 or normal_idx.numel() == 0:
        return amplified.sum() * 0.0
    plain, boosted = _positions(features), _positions(amplified)
    reference = F.normalize(plain[normal_idx], dim=1)
    # cos(F_n, F^A_a) - cos(F_n, F_a) as one product: a single (normal x anomalous) matrix, not three
    shift = F.normalize(boosted[anomalous_idx], dim=1) - F.normalize(plain[anomalous_idx], dim=1)
    return (reference @ shift.t()).add_(margin).relu_().mean()


def cosine_loss(targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor]) -> torch.Tensor:
    """RD4AD's plain distillation loss: mean ``1 - cos`` of the flattened maps, summed over scales."""
    loss = targets[0].new_zeros(())
    for target, student in zip(targets, students, strict=True):
        loss = loss + (1 - F.cosine_similarity(target.flatten(1), student.flatten(1), dim=1)).mean()
    return loss


def hkd_loss(targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor], top_k: int = 10) -> torch.Tensor:
    """Hard knowledge distillation, summed over scales.

    Per scale: the mean of the ``top_k`` largest per-position ``1 - cos`` of each image, plus the
    global term ``cosine_loss`` (mean ``1 - cos`` between each image's flattened maps).
    """
    hard = targets[0].new_zeros(())
    for target, student in zip(targets, students, strict=True):
        distance = 1 - F.cosine_similarity(target, student, dim=1).flatten(1)  # (B, H*W)
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

    def __init__(
        self,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        weight: float = 0.1,
        margin: float = 0.3,
    ) -> None:
        super().__init__()
        self.focal_alpha, self.focal_gamma, self.weight, self.margin = focal_alpha, focal_gamma, weight, margin

    def forward(
        self,
        features: Sequence[torch.Tensor],
        amplified: Sequence[torch.Tensor],
        gates: Sequence[torch.Tensor],
        mask: torch.Tensor,
        foreground: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "focal", "amplification"}`` from per-scale features and gates and image-size 0/1 masks."""
        focal = features[0].new_zeros(())
        amplification = features[0].new_zeros(())
        for plain, boosted, gate in zip(features, amplified, gates, strict=True):
            scale_mask = mask_at(mask, plain.shape[-2:])
            scale_foreground = None if foreground is None else mask_at(foreground, plain.shape[-2:])
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

    def __init__(self, kind: Literal["hkd", "cosine"] = "hkd", top_k: int = 10) -> None:
        super().__init__()
        if kind not in {"hkd", "cosine"}:
            msg = f"distillation_loss must be 'hkd' or 'cosine', got {kind!r}."
            raise ValueError(msg)
        self.kind, self.top_k = kind, top_k

    def forward(self, targets: Sequence[torch.Tensor], students: Sequence[torch.Tensor]) -> torch.Tensor:
        """The loss, summed over scales."""
        if self.kind == "hkd":
            return hkd_loss(targets, students, self.top_k)
        return cosine_loss(targets, students)

    def extra_repr(self) -> str:
        """Shown in the module summary."""
        return f"kind={self.kind!r}, top_k={self.top_k}"
