"""Early checks of what a user hands to AAND: the dataset folder, the image files, checkpoints, losses.

Each input check raises ``AandInputError`` (a ``ValueError``), a non-finite loss ``FloatingPointError``;
the message says what is wrong and what to do, so that a mistake stops a run before hours of training.
"""

import inspect
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.data import AnomalibDataModule, Folder, MVTecAD
from lightning.pytorch import Trainer
from PIL import Image
from timm.models import split_model_name_tag
from torchvision.datasets.folder import IMG_EXTENSIONS

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.strategies import Strategy

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


MVTEC_EXTENSIONS = (".png", ".PNG")  # anomalib 2.7's MVTecAD reads only these


def _files(folder: Path, pattern: str, suffixes: tuple[str, ...], *, lower: bool) -> list[Path]:
    return sorted(
        p for p in folder.glob(pattern) if p.is_file() and (p.suffix.lower() if lower else p.suffix) in suffixes
    )


def _mask_keys(mask: Path) -> set[str]:
    return {mask.stem, mask.stem.removesuffix("_mask")}


def _mask_pairs(datamodule: AnomalibDataModule) -> tuple[list[Path], list[Path], str] | None:
    """Defective test images, masks and the expected mask name, as anomalib lists them; None if no masks apply.

    MVTecAD keeps a mask folder per defect (``ground_truth/<defect>/``), Folder one or more mask folders.
    """
    if isinstance(datamodule, MVTecAD):
        base = Path(datamodule.root) / datamodule.category
        images = [p for p in _files(base / "test", "*/*", MVTEC_EXTENSIONS, lower=False) if p.parent.name != "good"]
        masks = _files(base / "ground_truth", "*/*", MVTEC_EXTENSIONS, lower=False)
        return images, masks, "ground_truth/<defect>/<image name>_mask.png"
    if isinstance(datamodule, Folder) and datamodule.abnormal_dir and datamodule.mask_dir:
        root = Path(datamodule.root) if datamodule.root is not None else Path()
        suffixes = tuple(e.lower() for e in (datamodule.extensions or IMG_EXTENSIONS))

        def listed(folders: str | Path | Sequence[str | Path]) -> list[Path]:
            folders = [folders] if isinstance(folders, str | Path) else folders
            return sorted(f for folder in folders for f in _files(root / folder, "**/*", suffixes, lower=True))

        return (
            listed(datamodule.abnormal_dir),
            listed(datamodule.mask_dir),
            "<image name>.png or <image name>_mask.png in mask_dir",
        )
    return None


def check_masks_present(datamodule: AnomalibDataModule) -> None:
    """Refuse defective test images without a mask, and masks without an image (MVTecAD, Folder).

    anomalib 2.7 pairs the sorted masks with the sorted defective images one to one in
    ``make_mvtec_ad_dataset``/``make_folder_dataset``, which the datamodule's ``setup`` calls before the
    model's ``setup`` hook; when the counts differ it stops with a pandas or numpy error ("Must have equal
    len keys and value when setting with an iterable", "NumPy boolean array indexing assignment cannot
    assign 3 input values to the 4 output values") that names no file. Run this first.
    """
    pairs = _mask_pairs(datamodule)
    if pairs is None:
        return
    images, masks, expected = pairs
    if len(images) == len(masks):
        return  # anomalib pairs them and checks the names itself
    per_defect = expected.startswith("ground_truth")  # MVTecAD: a mask lies in its image's defect folder

    def key(path: Path, stem: str) -> tuple[str, str]:
        return (path.parent.name if per_defect else "", stem)

    mask_keys = {key(m, k) for m in masks for k in _mask_keys(m)}
    image_keys = {key(i, i.stem) for i in images}
    unmasked = [str(i) for i in images if key(i, i.stem) not in mask_keys]
    orphans = [str(m) for m in masks if not {key(m, k) for k in _mask_keys(m)} & image_keys]
    problems = [f"{_describe(datamodule)} has {len(images)} defective test images but {len(masks)} masks."]
    if unmasked:
        problems.append(
            f"{len(unmasked)} defective test image(s) have no mask (expected {expected}):{_listing(unmasked)}\n"
            "Add their masks, or move these images out of the test set."
        )
    if orphans:
        problems.append(
            f"{len(orphans)} mask(s) belong to no defective test image:{_listing(orphans)}\n"
            "Remove them, or add their images."
        )
    if not unmasked and not orphans:
        problems.append("Give every defective image exactly one mask named after it (image 000.png: mask 000.png).")
    raise AandInputError("\n".join(problems))


def _inspect_image(path: str) -> tuple[str, str | None, tuple[int, int]]:
    """``(PIL mode, error, (width, height))`` after decoding the whole file, as anomalib will when it reads it."""
    try:
        with Image.open(path) as image:
            image.load()
            transparent = image.mode == "P" and "transparency" in image.info
            return ("PA" if transparent else image.mode), None, image.size
    except Exception as error:  # noqa: BLE001  PIL raises many types for unreadable files
        return "", f"{type(error).__name__}: {error}", (0, 0)


def check_images(paths: Iterable[str | Path], what: str = "images") -> dict[str, tuple[int, int]]:
    """Decode every file once; refuse unreadable and high-bit-depth files, warn about transparency.

    Grayscale images are fine (anomalib repeats the channel). 16-bit and float images would be
    clipped to 8 bits by anomalib's reader, so they raise; alpha channels are dropped (warning).
    Returns each file's (width, height).
    """
    files = sorted({str(p) for p in paths if isinstance(p, str | Path) and str(p) not in {"", "nan"}})
    if not files:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_inspect_image, files))
    unreadable = [f"{path} ({error})" for path, (_, error, _) in zip(files, results, strict=True) if error]
    deep = [f"{path} (mode {mode})" for path, (mode, _, _) in zip(files, results, strict=True) if mode in DEEP_MODES]
    alpha = [path for path, (mode, _, _) in zip(files, results, strict=True) if mode in ALPHA_MODES]
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
    return {path: size for path, (_, _, size) in zip(files, results, strict=True)}


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
    sizes = check_images(images, what=f"{'/'.join(present)} images of {source}")
    sizes |= check_images(masks, what=f"masks of {source}")
    check_mask_sizes([pair for dataset in present.values() for pair in _mask_pairs_of(dataset)], sizes, source)


def check_datamodule_once(datamodule: "LightningDataModule", stage: str, strategy: "Strategy") -> None:
    """``check_datamodule`` on global rank 0 only; the other processes wait for its verdict and stop with it.

    Under DDP every process would otherwise decode every image, and a bad file would print one error per
    process. ``strategy`` is the trainer's (its ``broadcast`` is a no-op in one process).
    """
    error = None
    if strategy.is_global_zero:
        try:
            check_datamodule(datamodule, stage)
        except AandInputError as found:
            error = str(found)
    error = strategy.broadcast(error, src=0)
    if error is None:
        return
    if strategy.is_global_zero:
        raise AandInputError(error)
    msg = f"Process {strategy.global_rank} stops: the data check on rank 0 failed (see rank 0's message)."
    raise AandInputError(msg)


def _mask_pairs_of(dataset: object) -> list[tuple[str, str]]:
    samples = getattr(dataset, "samples", None)
    if samples is None or not {"image_path", "mask_path"} <= set(getattr(samples, "columns", ())):
        return []
    return [
        (image, mask)
        for image, mask in zip(samples["image_path"].tolist(), samples["mask_path"].tolist(), strict=True)
        if isinstance(image, str) and isinstance(mask, str) and mask not in {"", "nan"}
    ]


def check_mask_sizes(pairs: Iterable[tuple[str, str]], sizes: Mapping[str, tuple[int, int]], source: str) -> None:
    """Refuse masks of another size than their image.

    anomalib would stretch them silently, and pixel AUROC and AUPRO would be computed against misplaced
    defects. ``sizes``: (width, height) per file.
    """
    wrong = sorted(
        {
            f"{image} is {sizes[image][0]}x{sizes[image][1]}, its mask {mask} is {sizes[mask][0]}x{sizes[mask][1]}"
            for image, mask in pairs
            if image in sizes and mask in sizes and sizes[image] != sizes[mask]
        }
    )
    if wrong:
        msg = (
            f"{len(wrong)} mask(s) of {source} do not have the size of their image (width x height):"
            f"{_listing(wrong)}\nEach mask must have its image's size: redraw or resize these masks "
            "(nearest-neighbour, so that they stay binary)."
        )
        raise AandInputError(msg)


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class _Range:
    """Valid values of one hyper-parameter: an integer or a finite number, bounds, and the paper's value."""

    paper: float | None
    low: float
    high: float = math.inf
    integer: bool = False
    open_low: bool = False
    note: str = ""

    def holds(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = (
            f"in [{self.low:g}, {self.high:g}]"
            if self.high < math.inf
            else f"{'>' if self.open_low else '>='} {self.low:g}"
        )
        details = "; ".join(filter(None, [self.note, None if self.paper is None else f"the paper uses {self.paper}"]))
        return f"{kind} {bounds} ({details})"


SETTINGS = {
    "stage1_epochs": _Range(100, 0, integer=True, note="0 skips amplification"),
    "stage2_epochs": _Range(120, 1, integer=True),
    "learning_rate": _Range(0.005, 0, open_low=True),
    "num_keys": _Range(50, 1, integer=True),
    "gate_temperature": _Range(0.2, 0, open_low=True),
    "focal_alpha": _Range(0.8, 0, 1),
    "focal_gamma": _Range(2.0, 0),
    "amplification_weight": _Range(0.1, 0),
    "amplification_margin": _Range(0.3, 0),
    "hkd_top_k": _Range(10, 1, integer=True),
    "anomaly_probability": _Range(0.8, 0, 1),
    "cache_budget_gb": _Range(None, 0, note="gigabytes of host memory; not a setting of the paper, default 4"),
}


def check_hyperparameters(hparams: Mapping[str, Any]) -> None:
    """Refuse ``Aand`` arguments outside their valid range, naming the range and the paper's value.

    Warns about settings that make part of the training do nothing.
    """
    for name, valid in SETTINGS.items():
        if name in hparams and not valid.holds(hparams[name]):
            msg = f"{name} must be {valid.describe()}, got {hparams[name]!r}."
            raise AandInputError(msg)
    if hparams.get("distillation_loss", "hkd") not in {"hkd", "cosine"}:
        msg = (
            f"distillation_loss must be 'hkd' or 'cosine' (the paper uses 'hkd'), got {hparams['distillation_loss']!r}."
        )
        raise AandInputError(msg)
    stage1_epochs = hparams.get("stage1_epochs", 0)
    if stage1_epochs > 0 and hparams.get("anomaly_probability") == 0:
        logger.warning(
            "anomaly_probability=0: no stage-1 image gets a synthetic anomaly, so the gate and the amplification "
            "loss never see an anomalous position and the %d stage-1 epochs learn nothing. Set it above 0 (the "
            "paper uses 0.8), or stage1_epochs=0 to skip stage 1.",
            stage1_epochs,
        )
    if stage1_epochs == 0 and hparams.get("anomaly_source_path") is not None:
        logger.warning(
            "anomaly_source_path %r is not used: stage1_epochs=0 skips anomaly amplification, the only stage that "
            "synthesises anomalies. Set stage1_epochs > 0 (the paper uses 100) to use the textures.",
            hparams["anomaly_source_path"],
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
def saved_checkpoints(trainer: Trainer) -> list[str]:
    """Checkpoint paths the trainer's checkpoint callbacks have written so far (last, then best)."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
    return [path for path in paths if path]


def check_finite_losses(
    losses: Mapping[str, torch.Tensor],
    stage: int,
    epoch: int,
    step: int,
    learning_rate: float,
    checkpoints: Sequence[str | Path] = (),
) -> None:
    """Stop training with a clear message when a loss term is NaN or infinite.

    ``checkpoints``: paths the run has saved; the message says one is intact only if it is on disk.
    """
    total = losses["loss"]
    if bool(torch.isfinite(total)):
        return
    values = {name: float(value.detach()) for name, value in losses.items()}
    bad = [name for name, value in values.items() if not math.isfinite(value) and name != "loss"] or ["loss"]
    saved = next((str(path) for path in checkpoints if Path(path).is_file()), None)
    kept = (
        f"the last saved checkpoint ({saved}) is intact: resume from it with --ckpt_path, or start again"
        if saved
        else "no checkpoint has been saved yet in this run, so start again"
    )
    msg = (
        f"AAND stage {stage}: the loss term(s) {bad} became non-finite at epoch {epoch}, optimiser step {step} "
        f"(values {values}). Training stops here instead of producing a NaN model; {kept} after lowering the "
        f"learning rate (now {learning_rate}) and checking the images for NaN/Inf values."
    )
    raise FloatingPointError(msg)
