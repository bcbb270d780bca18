"""Residual Anomaly Amplification (RAA), stage 1 of AAND (Tang et al., arXiv 2405.02068).

One RAA module sits on each teacher scale and adds a residual ``g * D`` to the frozen feature map:
the matching-guided residual gate ``g`` says where, the attribute-scaling residual generator ``D``
says how much.
"""

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def positional_encoding_2d(
    channels: int,
    height: int,
    width: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed 2-D sine/cosine positional encoding of shape ``(1, channels, height, width)`` and ``dtype``.

    Half of the channels encode x, half encode y (base 10^4). Channels beyond the largest multiple of
    four stay zero, so any channel count works. Computed in float32 (the angles need it), then cast.
    """
    usable = channels - channels % 4
    encoding = torch.zeros(1, channels, height, width, device=device)
    if usable == 0:
        return encoding.to(dtype)
    half = usable // 2
    div_term = torch.exp(torch.arange(0, half, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / half))
    pos_x = torch.arange(width, device=device, dtype=torch.float32)[:, None] * div_term  # (W, half/2)
    pos_y = torch.arange(height, device=device, dtype=torch.float32)[:, None] * div_term  # (H, half/2)
    sin_x = torch.sin(pos_x).t()[:, None, :].expand(-1, height, -1)
    cos_x = torch.cos(pos_x).t()[:, None, :].expand(-1, height, -1)
    sin_y = torch.sin(pos_y).t()[:, :, None].expand(-1, -1, width)
    cos_y = torch.cos(pos_y).t()[:, :, None].expand(-1, -1, width)
    encoding[0, 0:half:2] = sin_x
    encoding[0, 1:half:2] = cos_x
    encoding[0, half:usable:2] = sin_y
    encoding[0, half + 1 : usable : 2] = cos_y
    return encoding.to(dtype)


def _pointwise_mlp(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1),
    )


class ResidualAnomalyAmplification(nn.Module):
    """RAA for one scale: ``F^A = F + g * tanh(MLP_r(F)) * F``.

    Args:
        channels: Channels of the teacher feature map.
        num_keys: ``M``; the memory holds ``2M`` keys, the last ``M`` are the "anomaly" keys.
        temperature: Softmax temperature ``tau`` of the key matching.
    """

    def __init__(self, channels: int, num_keys: int, temperature: float) -> None:
        super().__init__()
        hidden = min(2 * channels, 1024)
        self.num_keys = num_keys
        self.temperature = temperature
        self.query = _pointwise_mlp(channels, hidden)
        self.residual = _pointwise_mlp(channels, hidden)
        self.keys = nn.Parameter(torch.randn(2 * num_keys, channels))

    def gate(self, features: torch.Tensor) -> torch.Tensor:
        """Matching-guided residual gate: probability mass on the anomaly keys, ``(B, 1, H, W)`` in [0, 1]."""
        _, channels, height, width = features.shape
        query = self.query(features + positional_encoding_2d(channels, height, width, features.device, features.dtype))
        keys = F.normalize(self.keys, dim=1)[:, :, None, None]
        similarity = F.conv2d(F.normalize(query, dim=1), keys)  # (B, 2M, H, W) cosine similarities
        attention = torch.softmax(similarity / self.temperature, dim=1)
        return attention[:, self.num_keys :].sum(dim=1, keepdim=True)

    def forward(
        self,
        features: torch.Tensor,
        teacher_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplify ``features``; returns ``(amplified, gate)``.

        With ``teacher_mask`` (``(B, 1, H, W)``, stage-1 teacher forcing) the mask replaces the gate in
        the residual; the predicted gate is still returned for the focal loss.
        """
        gate = self.gate(features)
        weight = gate if teacher_mask is None else teacher_mask
        residual = torch.tanh(self.residual(features)) * features
        return features + weight * residual, gate
