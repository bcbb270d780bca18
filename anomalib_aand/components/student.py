"""Reverse-distillation student: One-Class Bottleneck Embedding (OCBE) and decoder.

For ResNet teachers tapped at ``layer1..layer3`` the student is anomalib's own RD4AD bottleneck and
ResNet decoder; Wide ResNets get the bottleneck at their own width (``width_per_group=128``, as RD4AD's
and the AAND authors' ``BN_layer``). For any other timm CNN the same shape is built from the teacher's ``feature_info``:
every scale is brought to the coarsest one with stride-2 convolutions, fused, and squeezed one
stride further into the embedding; the decoder climbs back with transposed convolutions and
returns one map per teacher scale, with the teacher's channels and resolution.
"""

import math
from collections.abc import Sequence

import torch
from anomalib.models.components.backbone import get_decoder
from anomalib.models.image.reverse_distillation.components import get_bottleneck_layer
from timm.models import split_model_name_tag
from torch import nn

RESNET_LAYERS = ("layer1", "layer2", "layer3")
RESNET_DECODERS = frozenset(
    {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "wide_resnet50_2",
        "wide_resnet101_2",
    }
)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _up_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Basic residual block (two 3x3 convolutions), optionally strided."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return torch.relu(self.body(x) + self.shortcut(x))


def _halvings(reduction: int, target: int) -> int:
    steps = math.log2(target / reduction)
    if steps != int(steps) or steps < 0:
        msg = f"Feature reductions must be powers of two apart, got {reduction} and {target}."
        raise ValueError(msg)
    return int(steps)


class Bottleneck(nn.Module):
    """OCBE for any teacher: ``(B, 2*C_last, H / (2*r_last), W / (2*r_last))`` from all scales."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        super().__init__()
        last_channels = channels[-1]
        last_reduction = reductions[-1]
        self.align = nn.ModuleList()
        for in_channels, reduction in zip(channels, reductions, strict=True):
            steps = _halvings(reduction, last_reduction)
            layers = []
            current = in_channels
            for step in range(steps):
                out_channels = last_channels if step == steps - 1 else min(2 * current, last_channels)
                layers.append(_conv_bn_relu(current, out_channels, stride=2))
                current = out_channels
            self.align.append(nn.Sequential(*layers))
        self.embed = nn.Sequential(
            ResidualBlock(len(channels) * last_channels, 2 * last_channels, stride=2),
            ResidualBlock(2 * last_channels, 2 * last_channels),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse the multi-scale features into the one-class embedding."""
        return self.embed(torch.cat([align(f) for align, f in zip(self.align, features, strict=True)], dim=1))


class Decoder(nn.Module):
    """Mirror of the teacher: one reconstructed map per scale, shallowest first."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        current = 2 * channels[-1]
        reduction = 2 * reductions[-1]
        for out_channels, target in zip(reversed(channels), reversed(reductions), strict=True):
            steps = _halvings(target, reduction)
            layers = [_up_bn_relu(current if i == 0 else out_channels, out_channels) for i in range(steps)]
            layers.append(ResidualBlock(out_channels if steps else current, out_channels))
            self.stages.append(nn.Sequential(*layers))
            current = out_channels
            reduction = target

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Reconstruct every scale from the embedding."""
        outputs = []
        x = embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


def uses_resnet_student(backbone: str, layers: Sequence[str]) -> bool:
    """Whether anomalib's RD4AD bottleneck and ResNet decoder fit this teacher (a timm pretrained tag is ignored)."""
    return split_model_name_tag(backbone)[0] in RESNET_DECODERS and tuple(layers) == RESNET_LAYERS


def resnet_bottleneck(architecture: str) -> nn.Module:
    """The RD4AD bottleneck (anomalib's ``OCBE``); Wide ResNets at their width: ``width_per_group=128``, not 64."""
    width = {"width_per_group": 128} if architecture.startswith("wide_resnet") else {}
    return get_bottleneck_layer(architecture, **width)


def build_student(
    backbone: str,
    layers: Sequence[str],
    channels: Sequence[int],
    reductions: Sequence[int],
) -> tuple[nn.Module, nn.Module]:
    """Return ``(bottleneck, decoder)`` for the teacher."""
    if uses_resnet_student(backbone, layers):
        architecture = split_model_name_tag(backbone)[0]
        return resnet_bottleneck(architecture), get_decoder(architecture)
    return Bottleneck(channels, reductions), Decoder(channels, reductions)
