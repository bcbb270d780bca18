"""AAND torch model: teacher -> RAA -> bottleneck -> decoder -> anomaly map.

Tang et al., "Advancing Pre-trained Teacher: Towards Robust Feature Discrepancy for Anomaly
Detection", arXiv 2405.02068. No optimiser, no data synthesis and no Lightning here: the eval-mode
forward is what anomalib exports.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from anomalib.data import InferenceBatch
from torch import nn

from .anomaly_map import AnomalyMapGenerator
from .components.errors import AandInputError
from .components.raa import ResidualAnomalyAmplification
from .components.student import build_student
from .components.synthesis import downsample_mask
from .components.teacher import build_teacher

if TYPE_CHECKING:
    from anomalib.data.utils.tiler import Tiler


class AandModel(nn.Module):
    """Anomaly Amplification and Normality Distillation.

    Args:
        backbone: timm CNN used as the frozen teacher (a pretrained tag is allowed; it does not change the model).
        layers: Teacher layers, shallow to deep.
        num_keys: ``M``, half the number of learnable keys of each residual gate.
        gate_temperature: Softmax temperature of the key matching.
        amplification: Build the RAA modules. Without them the student distils the plain teacher
            features (the paper's "no amplification" ablation, ``stage1_epochs=0``).
        map_calibration: Hold a ``MapCalibration`` of the anomaly map (without one: the paper's plain sum).
        teacher_input: Hold a per-channel ``scale`` and ``shift`` applied to the images before the teacher
            (``set_teacher_input``), for a normalisation chosen per category after the pre-processor was built.
        map_sigma: Standard deviation in pixels of the anomaly map's Gaussian blur (the paper: 4).

    ``tiler`` (set by anomalib's ``TilerConfigurationCallback``, as for its ReverseDistillation) makes the forward
    run the network on tiles of each image and join their features before the anomaly map is computed.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        num_keys: int,
        gate_temperature: float,
        amplification: bool = True,
        map_calibration: bool = False,
        teacher_input: bool = False,
        map_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        self.teacher = build_teacher(backbone, layers)
        self.channels: list[int] = list(self.teacher.out_dims)
        self.reductions: list[int] = list(self.teacher.reductions)
        self.raa = (
            nn.ModuleList(ResidualAnomalyAmplification(c, num_keys, gate_temperature) for c in self.channels)
            if amplification
            else None
        )
        self.bottleneck, self.decoder = build_student(backbone, layers, self.channels, self.reductions)
        self.anomaly_map_generator = AnomalyMapGenerator(
            sigma=map_sigma, calibration=map_calibration, num_scales=len(self.channels)
        )
        self.tiler: Tiler | None = None
        self.teacher_input = teacher_input
        if teacher_input:
            self.register_buffer("teacher_input_scale", torch.ones(1, 3, 1, 1))
            self.register_buffer("teacher_input_shift", torch.zeros(1, 3, 1, 1))

    def set_teacher_input(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """The teacher sees ``images * scale + shift`` (``(3,)`` each); needs ``teacher_input``."""
        self.teacher_input_scale.copy_(scale.view(1, -1, 1, 1))
        self.teacher_input_shift.copy_(shift.view(1, -1, 1, 1))

    @property
    def stride(self) -> int:
        """Image sides must be multiples of this: twice the deepest layer's reduction (the student halves it)."""
        return 2 * self.reductions[-1]

    def check_input_size(self, size: Sequence[int] | None, top_k: int = 1) -> None:
        """Refuse an image size the student cannot mirror, or too small for HKD's ``top_k`` positions per image.

        With a tiler the network sees tiles, so the tile size is checked instead of ``size``; ``None`` (any size)
        passes otherwise. ``top_k`` may not exceed the positions of the coarsest feature map.
        """
        what, fix = "Image", "Set the pre-processor's Resize (or the data's image size) accordingly."
        if self.tiler is not None:
            size = (self.tiler.tile_size_h, self.tiler.tile_size_w)
            what, fix = "Tile", "Set the tiler's tile_size accordingly."
        if size is None:
            return
        height = int(size[0])
        width = int(size[1])
        stride = self.stride
        if height % stride or width % stride:
            ok = [stride * k for k in range(max(1, height // stride), height // stride + 3)]
            msg = (
                f"{what} size {height}x{width} does not suit backbone {self.backbone!r} with layers {self.layers}: "
                f"height and width must be multiples of {stride}, e.g. {ok}. {fix}"
            )
            raise AandInputError(msg)
        smallest = (height // self.reductions[-1]) * (width // self.reductions[-1])
        if top_k > smallest:
            msg = (
                f"hkd_top_k={top_k} exceeds the {smallest} positions of the coarsest feature map at {what.lower()} "
                f"size {height}x{width}; lower it or use larger {what.lower()}s."
            )
            raise AandInputError(msg)
        radius = self.anomaly_map_generator.blur_radius
        if radius >= min(height, width):
            msg = (
                f"{what} size {height}x{width} is too small for the anomaly map's blur, which reaches {radius} pixels "
                f"on each side; lower map_sigma (about {radius / 4:g} now) or use larger {what.lower()}s."
            )
            raise AandInputError(msg)

    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """The tiles of ``images`` (batch-major: image 0's tiles first) when tiling, else ``images``."""
        return images if self.tiler is None else self.tiler.tile(images)

    def train(self, mode: bool = True) -> "AandModel":
        """Set the mode; the teacher's BatchNorm always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen teacher features ``F_s``, shallow to deep."""
        if self.teacher_input:
            images = images * self.teacher_input_scale + self.teacher_input_shift
        return list(self.teacher(images).values())

    def amplify(
        self,
        features: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Amplified features ``F^A_s`` and gates ``g_s``.

        ``mask`` (``(B, 1, H, W)`` at image size, 0/1) forces the gate at each scale (stage-1 teacher forcing).
        """
        if self.raa is None:
            return list(features), [torch.zeros_like(f[:, :1]) for f in features]
        outputs = [
            raa(f, None if mask is None else downsample_mask(mask, f.shape[-2:]))
            for raa, f in zip(self.raa, features, strict=True)
        ]
        return [o[0] for o in outputs], [o[1] for o in outputs]

    def amplified_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher features with the predicted-gate amplification, as the student sees them."""
        return self.amplify(self.extract(images))[0]

    def distill(self, amplified: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student reconstruction of every scale."""
        return self.decoder(self.bottleneck(list(amplified)))

    def teacher_and_student(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(amplified, student)`` features; with a tiler, computed per tile and joined again (``Tiler.untile``)."""
        amplified = self.amplified_features(self.tile(images))
        student = self.distill(amplified)
        if self.tiler is not None:
            amplified = [self.tiler.untile(features) for features in amplified]
            student = [self.tiler.untile(features) for features in student]
        return amplified, student

    def distances(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each scale's plain ``1 - cos`` map between the amplified features and the student's (no calibration)."""
        return self.anomaly_map_generator.distances(*self.teacher_and_student(images))

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Training: ``(amplified, student)`` features. Eval: ``InferenceBatch`` with score and map."""
        amplified, student = self.teacher_and_student(images)
        if self.training:
            return amplified, student
        anomaly_map = self.anomaly_map_generator(amplified, student, images.shape[-2:])
        return InferenceBatch(pred_score=torch.amax(anomaly_map, dim=(-2, -1)), anomaly_map=anomaly_map)
