"""Checkpoints: files that are intact and written by Aand, that fit the model and the run, and that are saved safely.

A checkpoint is refused, with what to do, when it is damaged or of another kind (``check_checkpoint_file``,
``CheckedCheckpointIO.load_checkpoint``), of another model (``check_checkpoint``), of an interrupted run where a
finished model is needed (``check_finished``, ``check_thresholds``), or of another stage schedule
(``check_resumable``). A model whose trained tensors are no longer finite is not saved (``check_finite_state``),
and a failed save leaves the previous file as it was (``CheckedCheckpointIO.save_checkpoint``).
"""

import errno
import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.engine.plugins import AnomalibCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from timm.models import split_model_name_tag
from torch import nn

from .errors import AandInputError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

# Modules whose classes a Lightning checkpoint of Aand refers to; anything else is another model's object.
CHECKPOINT_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy", "pathlib", "lightning", "omegaconf")


def _kind_of_file(path: Path, head: bytes) -> str | None:
    """What a file that is not a zip archive is, when it can be told: an export or another kind of weights."""
    suffix = path.suffix.lower()
    if suffix == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head[:64].lower()):
        return "an ONNX model (an export)"
    if suffix in {".xml", ".bin"} or head.lstrip().startswith(b"<?xml"):
        return "an OpenVINO model (an export)"
    if suffix == ".safetensors":
        return "a safetensors weight file"
    if suffix == ".pt" and head[:1] == b"\x80":
        return "a PyTorch file in the legacy (non-zip) format"
    return None


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a checkpoint path that is missing, truncated, or not a PyTorch zip archive (an export, say)."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Checkpoint {str(path)!r} does not exist. Pass the model.ckpt of a finished or interrupted run."
        raise AandInputError(msg)
    with path.open("rb") as file:
        head = file.read(64)
    if not head.startswith(b"PK"):
        kind = _kind_of_file(path, head) or "not a PyTorch checkpoint (a checkpoint is a zip archive)"
        msg = (
            f"{str(path)!r} is {kind}, not a Lightning checkpoint of Aand. Pass the model.ckpt that training wrote "
            "(<results>/Aand/<dataset>/<category>/<version>/weights/lightning/model.ckpt)."
        )
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


def pickled_classes(path: str | Path) -> list[str]:
    """``module.name`` of every class or function a torch zip checkpoint refers to, read without unpickling it."""
    names: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith("data.pkl"):
                continue
            strings: list[str] = []
            for opcode, argument, _ in pickletools.genops(archive.read(member)):
                if opcode.name == "GLOBAL":
                    names.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
    return sorted(set(names))


def foreign_checkpoint_message(path: str | Path) -> str:
    """Why a torch file that ``weights_only`` loading refused is not an Aand checkpoint, and what to pass instead."""
    try:
        foreign = [name for name in pickled_classes(path) if not name.startswith(CHECKPOINT_MODULES)]
    except (zipfile.BadZipFile, OSError, ValueError):
        foreign = []
    models = sorted({name.split(".models.image.")[1].split(".")[0] for name in foreign if ".models.image." in name})
    origin = f" (a checkpoint of anomalib's {', '.join(models)})" if models else ""
    return (
        f"{str(path)!r} is not a checkpoint of Aand{origin}: it holds objects of classes an Aand checkpoint never "
        f"holds ({', '.join(foreign[:4]) or 'unknown'}). They are not loaded, as loading them could run code. Load it "
        "with the model class that trained it, or pass the model.ckpt of an Aand run."
    )


def _shape_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters that decide the model's tensors."""
    settings = {key: hparams[key] for key in ("backbone", "layers", "num_keys") if key in hparams}
    if isinstance(settings.get("backbone"), str):  # the tag only chose the initial weights, which the checkpoint holds
        settings["backbone"] = split_model_name_tag(settings["backbone"])[0]
    if "layers" in settings:
        settings["layers"] = list(settings["layers"])
    if "stage1_epochs" in hparams:
        settings["amplification (stage1_epochs > 0)"] = hparams["stage1_epochs"] > 0
    settings["normalization per category"] = isinstance(hparams.get("normalization"), Mapping)
    return settings


CALIBRATION_PREFIX = "model.anomaly_map_generator.calibration."
BLUR_KERNEL = "model.anomaly_map_generator.blur.kernel"  # any size: the map generator takes the saved one


def check_checkpoint(
    checkpoint: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    hparams: Mapping[str, Any],
) -> None:
    """Refuse a checkpoint whose weights do not fit this model, naming the settings that differ.

    ``state_dict`` and ``hparams`` are the receiving model's. A checkpoint without map calibration statistics fits
    a calibrated model (it scores the plain sum it was trained with); one with them needs a calibrated model.
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
    if any(key.startswith(CALIBRATION_PREFIX) and key not in state_dict for key in saved):
        differences.append("map_calibration: the checkpoint holds calibration statistics, this model is 'none'")
    missing = [
        key
        for key in state_dict
        if key.startswith("model.") and key not in saved and not key.startswith(CALIBRATION_PREFIX)
    ]
    extra = [key for key in saved if key.startswith("model.") and key not in state_dict]
    wrong = [
        key for key in state_dict if key in saved and key != BLUR_KERNEL and saved[key].shape != state_dict[key].shape
    ]
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


def check_finished(checkpoint: Mapping[str, Any], trainer: "Trainer | None") -> None:
    """Refuse to test or predict with the checkpoint of an interrupted run: its thresholds are not computed yet.

    Validation, which sets the thresholds and normalisation, runs once after the last epoch; a checkpoint saved
    before it would call every image anomalous while its image AUROC looks plausible.
    """
    if trainer is None or trainer.state.fn not in {TrainerFn.TESTING, TrainerFn.PREDICTING}:
        return
    threshold = checkpoint.get("state_dict", {}).get("post_processor._image_threshold")
    if threshold is None or torch.isfinite(threshold).all():
        return
    hparams = checkpoint.get("hyper_parameters", {})
    epochs = hparams.get("stage1_epochs", 0) + hparams.get("stage2_epochs", 0)
    done = checkpoint.get("epoch", -1) + 1
    msg = (
        f"Checkpoint {str(trainer.ckpt_path)!r} is from an interrupted run (saved after epoch {done} of {epochs}): "
        "its thresholds are not computed yet (validation does that after the last epoch), so every image would "
        f"be called anomalous. Finish the run first: `anomalib train` with its settings and --ckpt_path "
        f"{trainer.ckpt_path} (Python: Engine().train(model, datamodule, ckpt_path=...)), then {trainer.state.fn} "
        "with the model.ckpt it writes."
    )
    raise AandInputError(msg)


def check_thresholds(post_processor: nn.Module | None) -> None:
    """Refuse to export a model without thresholds (never validated: an interrupted run's checkpoint)."""
    threshold = getattr(post_processor, "image_threshold", None)
    if not isinstance(threshold, torch.Tensor) or torch.isfinite(threshold).all():
        return
    msg = (
        "This model has no thresholds: it was never validated, which training does after its last epoch (a "
        "checkpoint of an interrupted run, or an untrained model). Its export would call every image anomalous. "
        "Finish the run first (`anomalib train` with its settings and --ckpt_path <its model.ckpt>), then export "
        "the model.ckpt that run writes."
    )
    raise AandInputError(msg)


def check_resumable(checkpoint: Mapping[str, Any], stage1_epochs: int) -> None:
    """Refuse to resume a run with a ``stage1_epochs`` that would move epochs already trained into the other stage.

    Training longer (a larger ``stage2_epochs``) is fine; so is a new ``stage1_epochs`` while stage 1 is not over.
    """
    saved = checkpoint.get("hyper_parameters", {}).get("stage1_epochs")
    done = checkpoint.get("epoch", -1) + 1
    if saved is None or saved == stage1_epochs or done <= min(saved, stage1_epochs):
        return
    msg = (
        f"This run cannot resume with stage1_epochs={stage1_epochs}: its checkpoint has trained {done} epochs with "
        f"stage1_epochs={saved}, so epochs already trained would change stage. Keep --model.stage1_epochs {saved} "
        "(raise stage2_epochs to train longer), or start a new run without --ckpt_path."
    )
    raise AandInputError(msg)


def check_finite_state(
    module: nn.Module,
    stage: int,
    epoch: int,
    learning_rate: float,
    checkpoints: Sequence[str | Path] = (),
) -> None:
    """Raise ``FloatingPointError`` before a model with NaN or infinite weights or buffers is saved.

    The loss can stay finite while the student's BatchNorm statistics overflow (a learning rate far too high):
    the checkpoint would then score every image NaN.
    """
    tensors = [(name, t) for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not tensors or torch.stack([torch.isfinite(t).all() for _, t in tensors]).all():
        return
    bad = [name for name, t in tensors if not torch.isfinite(t).all()]
    saved = next((str(path) for path in checkpoints if Path(path).is_file()), None)
    kept = (
        f"the last saved checkpoint ({saved}) is intact: resume from it with --ckpt_path, or start again"
        if saved
        else "no checkpoint has been saved yet in this run, so start again"
    )
    msg = (
        f"AAND stage {stage}: {len(bad)} trained tensor(s) became NaN or infinite at epoch {epoch} although the loss "
        f"stayed finite, e.g. {bad[:3]}. Training stops before this epoch's checkpoint is saved; {kept} after "
        f"lowering the learning rate (now {learning_rate})."
    )
    raise FloatingPointError(msg)


def save_beside(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` into ``<path>.partial`` beside ``path``, then rename it over ``path``.

    On the same filesystem the rename is atomic, so ``path`` is either the old checkpoint or the new one. A write
    that fails (a full disk) removes the partial file and raises ``OSError`` saying that the old file is kept.
    """
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # in memory first, as Lightning does: torch's writer hides the OSError of a file
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        partial.unlink(missing_ok=True)
        kept = (
            f"the previous checkpoint {str(path)!r} is kept as it was: free space, then resume from it with "
            f"--ckpt_path {path}"
            if path.is_file()
            else "no earlier checkpoint was at that path"
        )
        msg = f"Cannot save checkpoint {str(path)!r} ({os.strerror(error.errno or errno.EIO)}); {kept}."
        raise OSError(error.errno, msg) from error
    partial.replace(path)


class CheckedCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint IO (Lightning's, with anomalib's types allowed under ``weights_only``), made safer.

    Save: ``save_beside`` for local paths (others go to Lightning). Load: ``check_checkpoint_file``, then anomalib's
    ``weights_only`` loading; a file holding classes that an Aand checkpoint never holds is refused with
    ``foreign_checkpoint_message`` (torch's own message would advise ``weights_only=False``, which must never be
    used on a file of unknown origin).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:  # noqa: ANN401
        """Save ``checkpoint`` to ``path``; the file it replaces stays intact if the save fails."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_beside(checkpoint, Path(path))

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | str | torch.device | dict | None = None,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Load ``path`` after checking that it is an intact checkpoint of Aand."""
        if "://" not in str(path):
            check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError:
            raise AandInputError(foreign_checkpoint_message(path)) from None


def saved_checkpoints(trainer: "Trainer") -> list[str]:
    """Checkpoint paths the trainer's checkpoint callbacks have written so far (last, then best)."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
    return [path for path in paths if path]
