"""Training time of AAND per epoch and stage, with and without the stage-2 feature cache, next to RD.

Measures, on generated MVTec-layout data (``tests/conftest.py``'s ``make_mvtec_dataset``):
seconds per stage-1 epoch, per stage-2 epoch with the cache (the first epoch fills it) and without,
and per epoch of anomalib's own ReverseDistillation; then projects whole trainings: AAND's default
schedule (``--stage1-epochs`` + ``--stage2-epochs``) against RD's ``--rd-epochs`` (anomalib's example
config trains RD for 200). Training epochs only: no validation, no test.

    python benchmarks/training_time.py --backbones resnet18 tf_efficientnet_lite0 --image-size 256 --batch-size 8
"""

import argparse
import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.models import ReverseDistillation
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from anomalib_aand import Aand
from anomalib_aand.components.feature_cache import FeatureCache
from anomalib_aand.components.student import uses_resnet_student

LAYERS = {"tf_efficientnet_lite0": ("blocks.1", "blocks.2", "blocks.4")}


class EpochTimer(Callback):
    """Wall-clock seconds of every training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.seconds.append(time.perf_counter() - self._start)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fit(model: LightningModule, root: Path, epochs: int, batch_size: int, workers: int) -> list[float]:
    seed_everything(0)
    datamodule = MVTecAD(
        root=root, category="toy", train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=workers
    )
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.seconds


def measure(backbone: str, root: Path, args: argparse.Namespace) -> dict:
    """Epoch times of one teacher: AAND cached, AAND uncached."""
    layers = LAYERS.get(backbone, ("layer1", "layer2", "layer3"))
    common = {"backbone": backbone, "layers": layers, "pre_trained": False, "evaluator": False, "visualizer": False}
    row: dict = {"backbone": backbone, "load_before": _load()}
    cached = _fit(Aand(stage1_epochs=1, stage2_epochs=3, **common), root, 4, args.batch_size, args.workers)
    plain = _fit(
        Aand(stage1_epochs=1, stage2_epochs=2, cache_features=False, **common), root, 3, args.batch_size, args.workers
    )
    row.update(
        stage1_s=min(cached[0], plain[0]),
        stage2_fill_s=cached[1],
        stage2_cached_s=min(cached[2:]),
        stage2_uncached_s=min(plain[1:]),
        epochs_cached=cached,
        epochs_uncached=plain,
        load_after=_load(),
    )
    row["cached_over_uncached"] = row["stage2_cached_s"] / row["stage2_uncached_s"]
    s1, s2 = args.stage1_epochs, args.stage2_epochs
    row["aand_total_cached_s"] = s1 * row["stage1_s"] + row["stage2_fill_s"] + (s2 - 1) * row["stage2_cached_s"]
    row["aand_total_uncached_s"] = s1 * row["stage1_s"] + s2 * row["stage2_uncached_s"]
    return row


def interleaved_steps(backbone: str, args: argparse.Namespace) -> dict:
    """Stage-2 optimisation steps, uncached and from a float16 cache, alternated so load drift hits both alike."""
    layers = LAYERS.get(backbone, ("layer1", "layer2", "layer3"))
    model = Aand(backbone=backbone, layers=layers, pre_trained=False, evaluator=False, visualizer=False)
    model.model.train()
    optimizer = torch.optim.Adam([*model.model.bottleneck.parameters(), *model.model.decoder.parameters()], lr=0.005)
    images = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
    )
    paths = [str(i) for i in range(args.batch_size)]
    cache = FeatureCache(torch.float16)
    with torch.no_grad():
        cache.put(paths, images, model.model.amplified_features(images))

    def step(*, cached: bool) -> float:
        start = time.perf_counter()
        if cached:
            amplified = cache.get(paths, images)
        else:
            with torch.no_grad():
                amplified = model.model.amplified_features(images)
        loss = model.distillation_loss(amplified, model.model.distill(amplified))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    step(cached=True), step(cached=False)  # warm-up
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for _ in range(args.interleaved):
        times["uncached"].append(step(cached=False))
        times["cached"].append(step(cached=True))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "step_cached_s": median["cached"],
        "step_uncached_s": median["uncached"],
        "step_ratio": median["cached"] / median["uncached"],
    }


def measure_rd(backbone: str, root: Path, args: argparse.Namespace) -> dict:
    """Epoch time of anomalib's ReverseDistillation (training only)."""
    before = _load()
    model = ReverseDistillation(backbone=backbone, pre_trained=False, evaluator=False, visualizer=False)
    epochs = _fit(model, root, 2, args.batch_size, args.workers)
    return {
        "backbone": backbone,
        "epoch_s": min(epochs),
        "epochs": epochs,
        "total_s": args.rd_epochs * min(epochs),
        "load_before": before,
        "load_after": _load(),
    }


def _data_maker():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        "aand_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_mvtec_dataset


def main() -> None:
    """Run the benchmark and print a markdown table and the raw figures (JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "tf_efficientnet_lite0"])
    parser.add_argument("--rd-backbone", default="resnet18", help="ReverseDistillation backbone (ResNet family)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=60)
    parser.add_argument("--stage1-epochs", type=int, default=100)
    parser.add_argument("--stage2-epochs", type=int, default=120)
    parser.add_argument("--rd-epochs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--interleaved", type=int, default=5, help="alternated cached/uncached stage-2 steps (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("anomalib_aand").setLevel(logging.INFO)  # says whether stage 2 used the cache
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _data_maker()(root, n_train=args.train_images, n_good=2, n_bad=2, size=args.image_size)
        rows = [measure(backbone, root, args) for backbone in args.backbones]
        for row in rows:
            row.update(interleaved_steps(row["backbone"], args) if args.interleaved else {})
        rd = measure_rd(args.rd_backbone, root, args)

    print(f"\nDevice: {device}; {args.train_images} train images of {args.image_size} px, batch {args.batch_size}.")
    print(
        f"ReverseDistillation ({rd['backbone']}): {rd['epoch_s']:.1f} s/epoch, {args.rd_epochs} epochs = "
        f"{rd['total_s'] / 60:.1f} min (load {rd['load_before']} -> {rd['load_after']})\n"
    )
    print(
        "| teacher | student | stage 1 s/epoch | stage 2 s/epoch uncached | stage 2 s/epoch cached (first, filling) "
        "| cached / uncached | AAND total, cache (min) | AAND total, no cache (min) | AAND / RD "
        "| load avg (1, 5, 15 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        student = (
            "RD4AD (anomalib)"
            if uses_resnet_student(row["backbone"], LAYERS.get(row["backbone"], ("layer1", "layer2", "layer3")))
            else "generic"
        )
        print(
            f"| {row['backbone']} | {student} | {row['stage1_s']:.1f} | {row['stage2_uncached_s']:.1f} | "
            f"{row['stage2_cached_s']:.1f} ({row['stage2_fill_s']:.1f}) | {row['cached_over_uncached']:.2f} | "
            f"{row['aand_total_cached_s'] / 60:.1f} | {row['aand_total_uncached_s'] / 60:.1f} | "
            f"{row['aand_total_cached_s'] / rd['total_s']:.2f} | {row['load_before']} -> {row['load_after']} |"
        )
    figures = {
        "device": device,
        "args": {k: str(v) for k, v in vars(args).items()},
        "aand": rows,
        "reverse_distillation": rd,
    }
    if args.interleaved:
        print(f"\nStage-2 steps alternated {args.interleaved}x (median s per step, cached / uncached):")
        for row in rows:
            print(
                f"- {row['backbone']}: {row['step_cached_s']:.2f} / {row['step_uncached_s']:.2f} "
                f"= {row['step_ratio']:.2f}"
            )
    print("\n" + json.dumps(figures, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
