"""Early checks of what a user hands to AAND: the dataset folder, the image files, checkpoints, losses.

Each input check raises ``AandInputError`` (a ``ValueError``), a non-finite loss ``FloatingPointError``;
the message says what is wrong and what to do, so that a mistake stops a run before hours of training.
"""

import inspect
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from timm.models import split_model_name_tag

if TYPE_CHECKING:
    from anomalib_aand.torch_model import AandModel

logger = logging.getLogger(__name__)

# PIL modes that anomalib's ``read_image`` (``Image.convert("RGB")``) clips to 8 bits: nearly all white.
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
MAX_LISTED = 5


class AandInputError(ValueError):
    """A dataset, file or setting that AAND cannot use as given."""


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


# ------------------------------------------------------------------------------------------- data
def check_dataset_folder(datamodule: object) -> None:
    """Refuse a dataset category folder that does not exist, before anomalib tries to download it.

    Applies to datamodules with ``root`` and ``category`` (MVTecAD, Visa, MVTec3D, ...). With the
    datamodule's default ``root`` left unchanged and no dataset there yet, anomalib's download is
    what the user asked for: it goes ahead with a warning. A ``root`` the user chose, or one holding
    other categories, means a wrong path or a typo: that raises.
    """
    root, category = getattr(datamodule, "root", None), getattr(datamodule, "category", None)
    if root is None or not isinstance(category, str):
        return
    root = Path(root)
    candidates = [root / category]
    if getattr(datamodule, "split_root", None) is not None:
        candidates.append(Path(datamodule.split_root) / category)
    if any(path.is_dir() for path in candidates):
        return
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    default = inspect.signature(type(datamodule)).parameters.get("root")
    default_root = None if default is None or default.default is inspect.Parameter.empty else Path(default.default)
    name = type(datamodule).__name__
    if present or default_root is None or root.resolve() != default_root.resolve():
        state = "is empty" if root.is_dir() else "does not exist"
        where = f"Categories found there: {present}." if present else f"{str(root)!r} itself {state}."
        msg = (
            f"Dataset folder {str(root / category)!r} does not exist: category {category!r} is not under "
            f"data root {str(root)!r}. {where} Check --data.root and --data.category (anomalib would now "
            f"try to download {name} into {str(root)!r} instead)."
        )
        raise AandInputError(msg)
    logger.warning(
        "Dataset folder %s does not exist: anomalib will now download %s into %s. If your data lies "
        "elsewhere, stop and set --data.root.",
        root / category,
        name,
        root,
    )


def _inspect_image(path: str) -> tuple[str, str | None]:
    """``(PIL mode, error)`` after decoding the whole file, as anomalib will when it reads it."""
    try:
        with Image.open(path) as image:
            image.load()
            transparent = image.mode == "P" and "transparency" in image.info
            return ("PA" if transparent else image.mode), None
    except Exception as error:  # noqa: BLE001  PIL raises many types for unreadable files
        return "", f"{type(error).__name__}: {error}"


def check_images(paths: Iterable[str | Path], what: str = "images") -> None:
    """Decode every file once; refuse unreadable and high-bit-depth files, warn about transparency.

    Grayscale images are fine (anomalib repeats the channel). 16-bit and float images would be
    clipped to 8 bits by anomalib's reader, so they raise; alpha channels are dropped (warning).
    """
    files = sorted({str(p) for p in paths if isinstance(p, str | Path) and str(p) not in {"", "nan"}})
    if not files:
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_inspect_image, files))
    unreadable = [f"{path} ({error})" for path, (_, error) in zip(files, results, strict=True) if error]
    deep = [f"{path} (mode {mode})" for path, (mode, _) in zip(files, results, strict=True) if mode in DEEP_MODES]
    alpha = [path for path, (mode, _) in zip(files, results, strict=True) if mode in ALPHA_MODES]
    problems = []
    if unreadable:
        problems.append(
            f"{len(unreadable)} of {len(files)} {what} cannot be read (corrupt, truncated or not an image):"
            f"{_listing(unreadable)}\nReplace or remove these files."
        )
    if deep:
        problems.append(
            f"{len(deep)} of {len(files)} {what} have 16-bit or float pixels, which anomalib's reader clips to "
            f"8 bits (the images would turn almost white):{_listing(deep)}\nConvert them to 8 bits first, scaling "
            "the values to 0..255, e.g. with numpy: (img / img.max() * 255).astype('uint8')."
        )
    if problems:
        raise AandInputError("\n".join(problems))
    if alpha:
        logger.warning(
            "%d of %d %s have an alpha channel; it is dropped (anomalib reads RGB), transparent pixels keep "
            "whatever colour they store:%s",
            len(alpha),
            len(files),
            what,
            _listing(alpha),
        )


def _dataset_paths(dataset: object, column: str) -> list[str]:
    samples = getattr(dataset, "samples", None)
    if samples is None or column not in getattr(samples, "columns", ()):
        return []
    return [p for p in samples[column].tolist() if isinstance(p, str) and p]


def _describe(datamodule: object) -> str:
    root, category = getattr(datamodule, "root", None), getattr(datamodule, "category", None)
    if root is not None and isinstance(category, str):
        return f"{type(datamodule).__name__} {str(Path(root) / category)!r}"
    return type(datamodule).__name__


def check_datamodule(datamodule: object, stage: str) -> None:
    """Check the splits a stage will read: a non-empty training set, readable 8-bit images.

    ``fit`` checks every split (a bad test image would otherwise stop the run after training).
    """
    splits = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",)}.get(stage, ())
    datasets = {split: getattr(datamodule, f"{split}_data", None) for split in splits}
    train = datasets.get("train")
    if stage == "fit" and train is not None and len(train) == 0:
        msg = (
            f"The training split of {_describe(datamodule)} holds no images, so there is nothing to train on. "
            "Put normal images into its training folder (MVTec layout: <root>/<category>/train/good/) or "
            "point --data.root/--data.category at a dataset that has them."
        )
        raise AandInputError(msg)
    present = {split: dataset for split, dataset in datasets.items() if dataset is not None}
    source = _describe(datamodule)
    images = [p for dataset in present.values() for p in _dataset_paths(dataset, "image_path")]
    masks = [p for dataset in present.values() for p in _dataset_paths(dataset, "mask_path")]
    check_images(images, what=f"{'/'.join(present)} images of {source}")
    check_images(masks, what=f"masks of {source}")


# ---------------------------------------------------------------------------------------- settings
def check_hyperparameters(
    stage1_epochs: int,
    stage2_epochs: int,
    learning_rate: float,
    num_keys: int,
    hkd_top_k: int,
    distillation_loss: str,
    anomaly_probability: float,
    cache_budget_gb: float,
) -> None:
    """Refuse ``Aand`` arguments outside their ranges, saying which value is expected."""
    rules = [  # (name, value, accepted, what is expected)
        (
            "stage1_epochs",
            stage1_epochs,
            isinstance(stage1_epochs, int) and stage1_epochs >= 0,
            "must be an integer >= 0 (0 skips amplification; the paper uses 100)",
        ),
        (
            "stage2_epochs",
            stage2_epochs,
            isinstance(stage2_epochs, int) and stage2_epochs >= 1,
            "must be an integer >= 1 (the paper uses 120)",
        ),
        (
            "learning_rate",
            learning_rate,
            isinstance(learning_rate, int | float) and math.isfinite(learning_rate) and learning_rate > 0,
            "must be a positive number (the paper uses 0.005)",
        ),
        ("distillation_loss", distillation_loss, distillation_loss in {"hkd", "cosine"}, "must be 'hkd' or 'cosine'"),
        ("num_keys", num_keys, num_keys >= 1, "must be at least 1 (the paper uses 50)"),
        ("hkd_top_k", hkd_top_k, hkd_top_k >= 1, "must be at least 1 (the paper uses 10)"),
        ("anomaly_probability", anomaly_probability, 0.0 <= anomaly_probability <= 1.0, "must lie in [0, 1]"),
        (
            "cache_budget_gb",
            cache_budget_gb,
            isinstance(cache_budget_gb, int | float) and math.isfinite(cache_budget_gb) and cache_budget_gb >= 0,
            "must be a number of gigabytes >= 0",
        ),
    ]
    for name, value, accepted, expected in rules:
        if not accepted:
            msg = f"{name} {expected}, got {value!r}."
            raise ValueError(msg)


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


# ------------------------------------------------------------------------------------ checkpoints
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


# ----------------------------------------------------------------------------------------- losses
def check_finite_losses(
    losses: Mapping[str, torch.Tensor],
    stage: int,
    epoch: int,
    step: int,
    learning_rate: float,
) -> None:
    """Stop training with a clear message when a loss term is NaN or infinite."""
    total = losses["loss"]
    if bool(torch.isfinite(total)):
        return
    values = {name: float(value.detach()) for name, value in losses.items()}
    bad = [name for name, value in values.items() if not math.isfinite(value) and name != "loss"] or ["loss"]
    msg = (
        f"AAND stage {stage}: the loss term(s) {bad} became non-finite at epoch {epoch}, optimiser step {step} "
        f"(values {values}). Training stops here instead of producing a NaN model; the last saved checkpoint "
        f"(model.ckpt of the last finished epoch) is intact. Lower the learning rate (now {learning_rate}), check "
        "the images for NaN/Inf values, and resume with --ckpt_path or start again."
    )
    raise FloatingPointError(msg)
