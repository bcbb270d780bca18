"""Checks of AAND's settings: each hyper-parameter's valid range, and the image size of an export.

The paper's values are the defaults of ``Aand``'s constructor, the one place they are written; the messages here
quote them from there (``paper_defaults``).
"""

import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import AandInputError

if TYPE_CHECKING:
    from anomalib_aand.torch_model import AandModel

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ValidRange:
    """Valid values of one hyper-parameter: an integer or a finite number within bounds.

    ``paper``: whether the constructor's default is the paper's value (quoted in the message) or a setting of
    this implementation (``note`` then says what it is).
    """

    low: float
    high: float = math.inf
    integer: bool = False
    open_low: bool = False
    paper: bool = True
    note: str = ""

    def holds(self, value: object) -> bool:
        """Whether ``value`` is a finite number (an integer if required) within the bounds."""
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def describe(self, default: object) -> str:
        """``an integer >= 1 (the paper uses 50)``: the kind, the bounds, the note and the default."""
        kind = "an integer" if self.integer else "a number"
        if self.high < math.inf:
            bounds = f"in [{self.low:g}, {self.high:g}]"
        else:
            bounds = f"{'>' if self.open_low else '>='} {self.low:g}"
        origin = f"the paper uses {default}" if self.paper else f"default {default}"
        details = "; ".join(filter(None, [self.note, origin]))
        return f"{kind} {bounds} ({details})"


VALID_RANGES = {
    "stage1_epochs": ValidRange(0, integer=True, note="0 skips amplification"),
    "stage2_epochs": ValidRange(1, integer=True),
    "learning_rate": ValidRange(0, open_low=True),
    "num_keys": ValidRange(1, integer=True),
    "gate_temperature": ValidRange(0, open_low=True),
    "focal_alpha": ValidRange(0, 1),
    "focal_gamma": ValidRange(0),
    "amplification_weight": ValidRange(0),
    "amplification_margin": ValidRange(0),
    "hkd_top_k": ValidRange(1, integer=True),
    "anomaly_probability": ValidRange(0, 1),
    "cache_budget_gb": ValidRange(0, paper=False, note="gigabytes of host memory; not a setting of the paper"),
    "map_sigma": ValidRange(0, open_low=True, note="pixels; or a mapping of categories (and 'default') to those"),
}


def category_choice(setting: T | Mapping[str, T], datamodule: object, fallback: T, name: str) -> T:
    """``setting`` itself, or its entry for ``datamodule``'s category (else its ``"default"``, else ``fallback``).

    A mapping lets one config carry a per-category choice that ``--data.category`` selects; ``name`` (the
    argument's) goes into the log line that reports the choice.
    """
    if not isinstance(setting, Mapping):
        return setting
    category = getattr(datamodule, "category", None) or getattr(datamodule, "name", None)
    choice = setting.get(str(category), setting.get("default", fallback))
    logger.info("Category %r: %s %r.", category, name, choice)
    return choice


def paper_defaults(model_class: type) -> dict[str, Any]:
    """The defaults of ``model_class``'s constructor (for ``Aand``: the paper's values), by argument name."""
    parameters = inspect.signature(model_class).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def check_hyperparameters(hparams: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse ``Aand`` arguments outside their valid range, naming the range and the default.

    ``defaults``: the constructor's defaults (``paper_defaults(Aand)``). Warns about settings that make part of
    the training do nothing.
    """
    for name, valid in VALID_RANGES.items():
        if name not in hparams:
            continue
        values = list(hparams[name].values()) if isinstance(hparams[name], Mapping) else [hparams[name]]
        if not values or not all(valid.holds(value) for value in values):
            msg = f"{name} must be {valid.describe(defaults.get(name))}, got {hparams[name]!r}."
            raise AandInputError(msg)
    if hparams.get("backbone_weights") is not None and not hparams.get("pre_trained", True):
        logger.warning(
            "pre_trained=False with backbone_weights %r: the teacher loads that file when training starts. Remove "
            "backbone_weights to keep random teacher weights.",
            hparams["backbone_weights"],
        )
    stage1_epochs = hparams.get("stage1_epochs", 0)
    if stage1_epochs > 0 and hparams.get("anomaly_probability") == 0:
        logger.warning(
            "anomaly_probability=0: no stage-1 image gets a synthetic anomaly, so the gate and the amplification "
            "loss never see an anomalous position and the %d stage-1 epochs learn nothing. Set it above 0 (the "
            "paper uses %s), or stage1_epochs=0 to skip stage 1.",
            stage1_epochs,
            defaults.get("anomaly_probability"),
        )
    if stage1_epochs == 0 and hparams.get("anomaly_source_path") is not None:
        logger.warning(
            "anomaly_source_path %r is not used: stage1_epochs=0 skips anomaly amplification, the only stage that "
            "synthesises anomalies. Set stage1_epochs > 0 (the paper uses %s) to use the textures.",
            hparams["anomaly_source_path"],
            defaults.get("stage1_epochs"),
        )


def check_export_size(model: "AandModel", input_size: tuple[int, int] | None, top_k: int) -> None:
    """Refuse an ONNX export of a model without a Resize in its pre-processor unless ``input_size`` suits it.

    The ``AandModel`` knows the accepted sizes.
    """
    if input_size is None:
        stride = model.stride
        msg = (
            "Dynamic input size needs a Resize in the pre-processor. This model's pre-processor has none, so "
            f"the exported graph would see raw images, and backbone {model.backbone!r} with layers "
            f"{model.layers} only takes heights and widths that are multiples of {stride} "
            f"(e.g. {2 * stride}, {4 * stride}, 256). Export with a fixed size (`--input_size '[256,256]'`, "
            "`input_size=(256, 256)`), or train with the default pre-processor (Resize + Normalize), whose "
            "exported graph takes any image size."
        )
        raise ValueError(msg)
    model.check_input_size(input_size, top_k)
