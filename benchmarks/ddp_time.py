"""Seconds per training step and epoch of AAND in one process and under DDP (2 CPU processes, gloo).

Configurations, each a fresh ``Engine.fit`` on generated MVTec-layout data (``tests/conftest.py``):

- ``single``: one process (all torch threads), batch ``--batch-size``; ``single-1thread``: the same on one
  thread, what each DDP process gets here (Lightning gives each CPU process cores / processes threads).
- ``ddp``: two processes, ``--batch-size`` each (global batch x2), as shipped: DDP looks for unused
  parameters (``find_unused_parameters=True``, set by the model) and reduces the idle stage's gradient
  buckets as zeros.
- ``ddp-stage1-min``: stage 1 with the student frozen before DDP wraps the model and no unused-parameter
  search: the least any restructuring could cost in stage 1 (only the RAA's gradients are reduced).
- ``ddp-stage2-search`` / ``ddp-stage2-nosearch``: a model without RAA (``stage1_epochs=0``); the second
  freezes the three parameters anomalib's RD4AD bottleneck never uses (``conv4``, ``bn4``) and turns the
  search off, so the two differ only by DDP's unused-parameter search (one graph traversal per step).

The stage-2 feature cache is off (every step computes the teacher), so steps of a stage cost the same.
Per-step times are medians over each process's steps of a stage, leaving out each stage's first step.

    flock /work/wt/notes/heavy.lock python benchmarks/ddp_time.py --json benchmarks/results/ddp-time.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch, MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from anomalib_aand import Aand
from anomalib_aand.torch_model import AandModel

CONFIGS = ("single", "single-1thread", "ddp", "ddp-stage1-min", "ddp-stage2-search", "ddp-stage2-nosearch")


class StepTimer(Callback):
    """Wall-clock seconds of every training step and epoch of this process, with the stage."""

    def __init__(self, out: Path, stop_after_stage1: bool) -> None:
        self.out, self.stop_after_stage1 = out, stop_after_stage1
        self.steps: list[tuple[int, int, float]] = []
        self.epochs: list[tuple[int, float]] = []
        self._step = self._epoch = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._epoch = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, batch_idx: int) -> None:
        del trainer, pl_module, batch, batch_idx
        self._step = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        del args
        self.steps.append((pl_module.stage, trainer.current_epoch, time.perf_counter() - self._step))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs.append((pl_module.stage, time.perf_counter() - self._epoch))
        if self.stop_after_stage1 and pl_module.stage == 1 and trainer.current_epoch == pl_module.stage1_epochs - 1:
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        record = {"steps": self.steps, "epochs": self.epochs, "threads": torch.get_num_threads()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class FrozenIdleStage(Aand):
    """Benchmark only: the idle stage's modules are frozen before DDP wraps the model, and no unused search."""

    def setup(self, stage: str) -> None:
        """Freeze the student (stage 1 is the only stage this variant trains); plain DDP."""
        super().setup(stage)
        self.model.bottleneck.requires_grad_(requires_grad=False)
        self.model.decoder.requires_grad_(requires_grad=False)
        self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = False  # noqa: SLF001


class NoSearch(Aand):
    """Benchmark only: DDP without the unused-parameter search (valid when every parameter is used)."""

    def setup(self, stage: str) -> None:
        """Plain DDP; anomalib's RD4AD bottleneck defines ``conv4``/``bn4`` but never uses them: frozen here."""
        super().setup(stage)
        for name in ("conv4", "bn4"):
            if hasattr(self.model.bottleneck, name):
                getattr(self.model.bottleneck, name).requires_grad_(requires_grad=False)
        self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = False  # noqa: SLF001


def worker(args: argparse.Namespace) -> None:
    """One configuration (this function also runs in the processes DDP starts)."""
    seed_everything(0)
    config, out = args.worker, Path(args.out)
    if config == "single-1thread":
        torch.set_num_threads(1)
    cls = {"ddp-stage1-min": FrozenIdleStage, "ddp-stage2-nosearch": NoSearch}.get(config, Aand)
    stage1 = 0 if config.startswith("ddp-stage2") else args.stage1_epochs
    model = cls(
        backbone=args.backbone,
        pre_trained=False,
        stage1_epochs=stage1,
        stage2_epochs=args.stage2_epochs,
        cache_features=False,
        pre_processor=Aand.configure_pre_processor(image_size=(args.image_size, args.image_size)),
    )
    datamodule = MVTecAD(
        root=args.root, category="toy", train_batch_size=args.batch_size, eval_batch_size=args.batch_size, num_workers=0
    )
    devices = 1 if config.startswith("single") else 2
    engine = Engine(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[StepTimer(out, stop_after_stage1=config == "ddp-stage1-min")],
        default_root_dir=out / "runs",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    engine.fit(model, datamodule=datamodule)


def summarise(out: Path, devices: int) -> dict[str, Any]:
    """Median step and epoch seconds per stage over the processes."""
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    result: dict[str, Any] = {"threads_per_process": records[0]["threads"]}
    for stage in (1, 2):
        steps = []
        for record in records:
            mine = [s for s in record["steps"] if s[0] == stage]
            steps += [s[2] for s in mine[1:]]  # the first step of a stage builds DDP's buckets / warms up
        epochs = [e[1] for record in records for e in record["epochs"] if e[0] == stage][devices:]
        if steps:
            result[f"stage{stage}_step_s"] = statistics.median(steps)
            result[f"stage{stage}_epoch_s"] = statistics.median(epochs) if epochs else None
    return result


def parameter_counts() -> dict[str, dict[str, int]]:
    """Parameters each stage trains (what DDP reduces per step), per teacher."""
    counts = {}
    for backbone in ("resnet18", "wide_resnet50_2"):
        model = AandModel(backbone=backbone)
        raa = sum(p.numel() for p in model.raa.parameters())
        student = sum(p.numel() for m in (model.bottleneck, model.decoder) for p in m.parameters())
        counts[backbone] = {"raa": raa, "student": student}
    return counts


def table(results: dict[str, Any]) -> str:
    """Markdown table of the configurations measured."""
    rows = [
        (
            "| configuration | processes x threads | stage 1 s/step | stage 2 s/step | stage 1 s/epoch "
            "| stage 2 s/epoch | load |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        if config not in results:
            continue
        r = results[config]
        cells = [r.get(f"stage{s}_{k}") for k in ("step_s", "epoch_s") for s in (1, 2)]
        shown = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
        processes = 1 if config.startswith("single") else 2
        rows.append(f"| {config} | {processes} x {r['threads_per_process']} | {shown} | {r['load_before']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--train-images", type=int, default=16)
    parser.add_argument("--stage1-epochs", type=int, default=2)
    parser.add_argument("--stage2-epochs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_mvtec_dataset

    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in {"worker", "root", "out"}}}
    results["settings"]["json"] = str(args.json)
    results["cpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_mvtec_dataset(root, n_train=args.train_images, size=args.image_size)
        for config in args.configs:
            out = Path(tmp) / config
            out.mkdir()
            command = [sys.executable, __file__, "--worker", config, "--root", str(root), "--out", str(out)]
            for name in ("backbone", "image_size", "batch_size", "stage1_epochs", "stage2_epochs"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            load = os.getloadavg()[0]
            subprocess.run(command, check=True, capture_output=True)
            results[config] = summarise(out, 1 if config.startswith("single") else 2)
            results[config]["load_before"] = load
            print(config, json.dumps(results[config]), flush=True)
    results["parameters"] = parameter_counts()
    print(json.dumps(results["parameters"]))
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
        args.json.with_suffix(".md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
