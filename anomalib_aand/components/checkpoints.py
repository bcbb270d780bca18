"""Checks of checkpoint files: intact, written by Aand, and fitting the model they are loaded into."""

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.models import split_model_name_tag

from .errors import AandInputError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a checkpoint path that is missing, truncated or not a PyTorch zip archive."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Checkpoint {str(path)!r} does not exist. Pass the model.ckpt of a finished or interrupted run."
        raise AandInputError(msg)
    bad = None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        bad = f"{type(error).__name__}: {error}"
    if bad is not None:
        msg = (
            f"Checkpoint {str(path)!r} is damaged ({bad}); it was probably cut short while being written or "
            "copied. Use an intact copy, or the checkpoint of an earlier epoch."
        )
        raise AandInputError(msg)


def _shape_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters that decide the model's tensors."""
    settings = {key: hparams[key] for key in ("backbone", "layers", "num_keys") if key in hparams}
    if isinstance(settings.get("backbone"), str):  # the tag only chose the initial weights, which the checkpoint holds
        settings["backbone"] = split_model_name_tag(settings["backbone"])[0]
    if "layers" in settings:
        settings["layers"] = list(settings["layers"])
    if "stage1_epochs" in hparams:
        settings["amplification (stage1_epochs > 0)"] = hparams["stage1_epochs"] > 0
    return settings


def check_checkpoint(
    checkpoint: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    hparams: Mapping[str, Any],
) -> None:
    """Refuse a checkpoint whose weights do not fit this model, naming the settings that differ.

    ``state_dict`` and ``hparams`` are the receiving model's.
    """
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping):
        msg = "This file is not a Lightning checkpoint (no 'state_dict'). Pass the model.ckpt written by training."
        raise AandInputError(msg)
    if not any(key.startswith("model.teacher.") for key in saved):
        prefixes = sorted({key.split(".")[1] for key in saved if key.startswith("model.") and key.count(".") > 1})
        msg = (
            "This checkpoint was not saved by Aand: it holds no AAND teacher weights (its model has parts "
            f"{prefixes[:8]}). Load it with the model class that trained it, or pass an Aand checkpoint."
        )
        raise AandInputError(msg)
    theirs, ours = _shape_settings(checkpoint.get("hyper_parameters", {})), _shape_settings(hparams)
    differences = [
        f"{key}: checkpoint {value!r}, this model {ours[key]!r}"
        for key, value in theirs.items()
        if key in ours and value != ours[key]
    ]
    missing = [key for key in state_dict if key.startswith("model.") and key not in saved]
    extra = [key for key in saved if key.startswith("model.") and key not in state_dict]
    wrong = [key for key in state_dict if key in saved and saved[key].shape != state_dict[key].shape]
    if missing or extra or wrong or differences:
        detail = "; ".join(differences) or (
            f"{len(missing)} tensors missing, {len(extra)} unexpected, {len(wrong)} of other shapes, "
            f"e.g. {(missing + extra + wrong)[:3]}"
        )
        msg = (
            f"This Aand checkpoint does not fit the model it is loaded into ({detail}). Build the model with the "
            "settings used for training (--model.backbone, --model.layers, ..., or --config <run>/config.yaml), "
            "or load it with Aand.load_from_checkpoint(path), which restores them."
        )
        raise AandInputError(msg)


def saved_checkpoints(trainer: "Trainer") -> list[str]:
    """Checkpoint paths the trainer's checkpoint callbacks have written so far (last, then best)."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
    return [path for path in paths if path]
