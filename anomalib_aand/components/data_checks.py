"""Checks of the data a run will read: the dataset folder, the masks' pairing, every image and mask file.

Each raises ``AandInputError`` with a message that names the files and says what to do, so that a mistake stops
a run before hours of training.
"""

import contextlib
import inspect
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from anomalib.data import AnomalibDataModule, Folder, MVTecAD
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import AandInputError, listing

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.strategies import Strategy

logger = logging.getLogger(__name__)

# PIL modes that anomalib's ``read_image`` (``Image.convert("RGB")``) clips to 8 bits: nearly all white.
HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# A mask marking more of its image than this is probably inverted.
MAX_DEFECT_SHARE = 0.5


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


def _defective_images_and_masks(datamodule: AnomalibDataModule) -> tuple[list[Path], list[Path], str] | None:
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
    pairs = _defective_images_and_masks(datamodule)
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
    problems = [f"{describe(datamodule)} has {len(images)} defective test images but {len(masks)} masks."]
    if unmasked:
        problems.append(
            f"{len(unmasked)} defective test image(s) have no mask (expected {expected}):{listing(unmasked)}\n"
            "Add their masks, or move these images out of the test set."
        )
    if orphans:
        problems.append(
            f"{len(orphans)} mask(s) belong to no defective test image:{listing(orphans)}\n"
            "Remove them, or add their images."
        )
    if not unmasked and not orphans:
        problems.append("Give every defective image exactly one mask named after it (image 000.png: mask 000.png).")
    raise AandInputError("\n".join(problems))


def _inspect_image(path: str, mask: bool = False) -> tuple[str, str | None, tuple[int, int], tuple[int, float]]:
    """``(PIL mode, error, (width, height), (grey levels, non-zero share))`` after decoding the whole file.

    The file is decoded as anomalib will when it reads it; the grey levels (values present after conversion to
    8-bit grey, as anomalib reads masks) and the share of non-zero pixels are counted for masks only.
    """
    try:
        with Image.open(path) as image:
            image.load()
            transparent = image.mode == "P" and "transparency" in image.info
            values = (0, 0.0)
            if mask and image.mode not in HIGH_BIT_DEPTH_MODES:
                histogram = image.convert("L").histogram()
                values = (sum(1 for count in histogram if count), 1 - histogram[0] / max(1, sum(histogram)))
            return ("PA" if transparent else image.mode), None, image.size, values
    except Exception as error:  # noqa: BLE001  PIL raises many types for unreadable files
        return "", f"{type(error).__name__}: {error}", (0, 0), (0, 0.0)


def warn_about_mask_values(masks: Mapping[str, tuple[int, float]], what: str) -> None:
    """Warn about masks that are not binary (JPEG artefacts) or mark most of their image (inverted, probably).

    anomalib counts every non-zero pixel of a mask as defective, so the grey levels that JPEG compression leaves
    around each defect, or an inverted mask, turn most of the image into ground-truth defect and the pixel metrics
    are wrong, without any error. ``masks``: (grey levels, non-zero share) per file.
    """
    grey = [f"{path} ({levels} grey levels)" for path, (levels, _) in masks.items() if levels > 2]
    most = [f"{path} ({share:.0%} marked)" for path, (_, share) in masks.items() if share > MAX_DEFECT_SHARE]
    if grey:
        logger.warning(
            "%d %s are not binary: anomalib counts every non-zero pixel as defective, so their grey levels (JPEG "
            "compression leaves them around every edge) count as defect too:%s\nSave masks losslessly (PNG) with 0 "
            "for normal and 255 for defective pixels.",
            len(grey),
            what,
            listing(grey),
        )
    if most:
        logger.warning(
            "%d %s mark more than %.0f%% of their image as defective; are they inverted? Defects must be non-zero "
            "(white), normal pixels 0 (black):%s",
            len(most),
            what,
            100 * MAX_DEFECT_SHARE,
            listing(most),
        )


def check_images(paths: Iterable[str | Path], what: str = "images", masks: bool = False) -> dict[str, tuple[int, int]]:
    """Decode every file once; refuse unreadable and high-bit-depth files, warn about transparency.

    Grayscale images are fine (anomalib repeats the channel). 16-bit and float images would be
    clipped to 8 bits by anomalib's reader, so they raise; alpha channels are dropped (warning).
    ``masks``: the files are masks; warn about those that are not binary or mark most of the image.
    Returns each file's (width, height).
    """
    files = sorted({str(p) for p in paths if isinstance(p, str | Path) and str(p) not in {"", "nan"}})
    if not files:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_inspect_image, files, [masks] * len(files)))
    unreadable = [f"{path} ({error})" for path, (_, error, _, _) in zip(files, results, strict=True) if error]
    deep = [
        f"{path} (mode {mode})"
        for path, (mode, _, _, _) in zip(files, results, strict=True)
        if mode in HIGH_BIT_DEPTH_MODES
    ]
    alpha = [path for path, (mode, _, _, _) in zip(files, results, strict=True) if mode in ALPHA_MODES]
    problems = []
    if unreadable:
        problems.append(
            f"{len(unreadable)} of {len(files)} {what} cannot be read (corrupt, truncated or not an image):"
            f"{listing(unreadable)}\nReplace or remove these files."
        )
    if deep:
        problems.append(
            f"{len(deep)} of {len(files)} {what} have 16-bit or float pixels, which anomalib's reader clips to "
            f"8 bits (the images would turn almost white):{listing(deep)}\nConvert them to 8 bits first, scaling "
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
            listing(alpha),
        )
    if masks:
        warn_about_mask_values({path: values for path, (_, _, _, values) in zip(files, results, strict=True)}, what)
    return {path: size for path, (_, _, size, _) in zip(files, results, strict=True)}


def check_pixel_depth(paths: Iterable[str | Path], what: str) -> None:
    """Refuse images deeper than 8 bits, reading only each file's header (for prediction, which decodes them next).

    anomalib's reader (``Image.convert("RGB")``) clips 16-bit and 12-bit images to 8 bits (nearly white) and
    turns float images black, so they would be scored as such.
    """
    deep = []
    for path in sorted({str(p) for p in paths}):
        with contextlib.suppress(OSError), Image.open(path) as image:
            if image.mode in HIGH_BIT_DEPTH_MODES:
                deep.append(f"{path} (mode {image.mode})")
    if deep:
        msg = (
            f"{len(deep)} {what} have 16-bit, 12-bit or float pixels, which anomalib's reader clips to 8 bits (they "
            f"would be scored as a white or black image):{listing(deep)}\nConvert them to 8 bits first, scaling "
            "the values to 0..255, e.g. with numpy: (img / img.max() * 255).astype('uint8')."
        )
        raise AandInputError(msg)


def loader_image_paths(dataloaders: object) -> list[str]:
    """Image paths of the datasets behind one or more dataloaders (anomalib datasets and ``PredictDataset``)."""
    loaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
    paths = []
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        paths += _dataset_paths(dataset, "image_path")
        paths += [str(p) for p in getattr(dataset, "image_filenames", None) or []]
    return paths


def _dataset_paths(dataset: object, column: str) -> list[str]:
    samples = getattr(dataset, "samples", None)
    if samples is None or column not in getattr(samples, "columns", ()):
        return []
    return [p for p in samples[column].tolist() if isinstance(p, str) and p]


def describe(datamodule: object) -> str:
    """``MVTecAD '/data/mvtec/bottle'``: the datamodule's class and category folder, for messages."""
    root = getattr(datamodule, "root", None)
    category = getattr(datamodule, "category", None)
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
            f"The training split of {describe(datamodule)} holds no images, so there is nothing to train on. "
            "Put normal images into its training folder (MVTec layout: <root>/<category>/train/good/) or "
            "point --data.root/--data.category at a dataset that has them."
        )
        raise AandInputError(msg)
    present = {split: dataset for split, dataset in datasets.items() if dataset is not None}
    source = describe(datamodule)
    images = [p for dataset in present.values() for p in _dataset_paths(dataset, "image_path")]
    masks = [p for dataset in present.values() for p in _dataset_paths(dataset, "mask_path")]
    sizes = check_images(images, what=f"{'/'.join(present)} images of {source}")
    sizes |= check_images(masks, what=f"masks of {source}", masks=True)
    check_mask_sizes([pair for dataset in present.values() for pair in _image_mask_pairs(dataset)], sizes, source)


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


def _image_mask_pairs(dataset: object) -> list[tuple[str, str]]:
    """(image, mask) paths of the samples of ``dataset`` that have a mask."""
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
            f"{listing(wrong)}\nEach mask must have its image's size: redraw or resize these masks "
            "(nearest-neighbour, so that they stay binary)."
        )
        raise AandInputError(msg)
