"""What the benchmark scripts share: provenance (command, machine), timing, rank AUROC and data.

The scripts run as ``python benchmarks/NAME.py`` and import this file as the sibling module ``common``.
"""

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode
from scipy.stats import rankdata
from torchvision.transforms.v2 import Resize

from anomalib_aand.tools.demo import generate_category

# The vector / matrix extensions that decide INT8 (and bf16) speed on x86.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """``lscpu``'s model name, core count, which of :data:`ISA_FLAGS` it has, GPU, torch, OpenVINO, anomalib."""
    info = _lscpu()
    name = info.get("Model name") or platform.processor() or platform.machine()
    flags = set(info.get("Flags", "").split())
    listed = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ISA_FLAGS) if flags else "unknown (no lscpu)"
    text = f"{name}, {os.cpu_count()} logical cores; flags: {listed}"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return (
        f"{text}; torch {torch.__version__} ({torch.get_num_threads()} threads), openvino {_version('openvino')}, "
        f"anomalib {_version('anomalib')}"
    )


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran ``script`` (``argv``: its arguments; default: ``sys.argv``'s)."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def provenance(script: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    """``{"command": ..., "machine": ...}`` for a results file."""
    return {"command": command(script, argv), "machine": machine()}


def provenance_lines(source: dict[str, str]) -> list[str]:
    """The two Markdown lines every report starts with."""
    return [f"Command: `{source['command']}`", "", f"Machine: {source['machine']}"]


def seconds(run: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``run``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def load_average() -> str:
    """1/5/15-minute load averages: other processes on the machine slow every timing."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve from ranks (ties share their mean rank); NaN for non-finite scores or one class.

    Exact for scores of any range: torchmetrics' BinaryAUROC passes scores outside [0, 1] through a sigmoid,
    which in float32 turns large raw scores (PatchCore's 10-45) into ties.
    """
    values = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(targets).ravel().astype(bool)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0 or not np.isfinite(values).all():
        return float("nan")
    ranks = rankdata(values)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def demo_category(root: Path, n_train: int, size: int = 256, category: str = "brick", seed: int = 0) -> Path:
    """Write a small MVTec-layout ``root/category`` (the package's demo generator; 2 good, 2 defective test images).

    Returns ``root``.
    """
    generate_category(root, category, n_train=n_train, n_good=2, n_defective=2, size=size, seed=seed)
    return root


def calibration_data(
    root: Path, category: str, val_split_ratio: float = 0.5, seed: int | None = None, size: int | None = None
) -> MVTecAD:
    """The datamodule ``anomalib export --compression_type INT8_PTQ --data.val_split_mode from_train`` gets.

    Its validation split, which calibrates INT8, is ``val_split_ratio`` of the training images, drawn with ``seed``;
    ``size`` resizes them to ``size`` x ``size`` (for an IR exported with a fixed input size).
    """
    return MVTecAD(
        root=root,
        category=category,
        eval_batch_size=8,
        num_workers=0,
        val_split_mode=ValSplitMode.FROM_TRAIN,
        val_split_ratio=val_split_ratio,
        val_augmentations=Resize((size, size)) if size else None,
        seed=seed,
    )
