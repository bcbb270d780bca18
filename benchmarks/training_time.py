"""Training time of AAND per epoch and stage, with and without the stage-2 feature cache, next to RD.

Measures, on a generated MVTec-layout category (the package's demo ``brick``, ``--train-images`` images):
seconds per stage-1 epoch, per stage-2 epoch with the cache (the first epoch fills it) and without,
and per epoch of anomalib's own ReverseDistillation; then projects whole trainings: AAND's default
schedule (``--stage1-epochs`` + ``--stage2-epochs``) against RD's ``--rd-epochs`` (anomalib's example
config trains RD for 200). Training epochs only: no validation, no test. Writes ``training_time.md`` (table,
command, machine) and ``training_time.json`` (raw figures) into ``--out``.

    python benchmarks/training_time.py --backbones resnet18 tf_efficientnet_lite0 --image-size 256 --batch-size 8
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.models import ReverseDistillation
from common import demo_category, load_average, provenance, provenance_lines
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from anomalib_aand import Aand
from anomalib_aand.components.feature_cache import FeatureStore
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


def _fit(model: LightningModule, root: Path, epochs: int, batch_size: int, workers: int) -> list[float]:
    seed_everything(0)
    datamodule = MVTecAD(
        root=root, category="brick", train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=workers
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
    row: dict = {"backbone": backbone, "load_before": load_average()}
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
        load_after=load_average(),
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
    with torch.no_grad():
        features = model.model.amplified_features(images)
    cpu = torch.device("cpu")
    cache = FeatureStore([f.shape[1:] for f in features], len(images), torch.float16, cpu, cpu)
    cache.put(0, paths, images, features)

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
    before = load_average()
    model = ReverseDistillation(backbone=backbone, pre_trained=False, evaluator=False, visualizer=False)
    epochs = _fit(model, root, 2, args.batch_size, args.workers)
    return {
        "backbone": backbone,
        "epoch_s": min(epochs),
        "epochs": epochs,
        "total_s": args.rd_epochs * min(epochs),
        "load_before": before,
        "load_after": load_average(),
    }


def report(rows: list[dict], rd: dict, args: argparse.Namespace, source: dict[str, str]) -> str:
    """Markdown: command, machine, the epoch-time table and the alternated-step ratios."""
    lines = [
        *provenance_lines(source),
        "",
        (
            f"{args.train_images} train images of {args.image_size} px, batch {args.batch_size}. ReverseDistillation "
            f"({rd['backbone']}): {rd['epoch_s']:.1f} s/epoch, {args.rd_epochs} epochs = {rd['total_s'] / 60:.1f} min "
            f"(load {rd['load_before']} -> {rd['load_after']})."
        ),
        "",
        (
            "| teacher | student | stage 1 s/epoch | stage 2 s/epoch uncached "
            "| stage 2 s/epoch cached (first, filling) | cached / uncached | AAND total, cache (min) "
            "| AAND total, no cache (min) | AAND / RD | load avg (1, 5, 15 min) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        layers = LAYERS.get(row["backbone"], ("layer1", "layer2", "layer3"))
        student = "RD4AD (anomalib)" if uses_resnet_student(row["backbone"], layers) else "generic"
        lines.append(
            f"| {row['backbone']} | {student} | {row['stage1_s']:.1f} | {row['stage2_uncached_s']:.1f} | "
            f"{row['stage2_cached_s']:.1f} ({row['stage2_fill_s']:.1f}) | {row['cached_over_uncached']:.2f} | "
            f"{row['aand_total_cached_s'] / 60:.1f} | {row['aand_total_uncached_s'] / 60:.1f} | "
            f"{row['aand_total_cached_s'] / rd['total_s']:.2f} | {row['load_before']} -> {row['load_after']} |"
        )
    if args.interleaved:
        lines += ["", f"Stage-2 steps alternated {args.interleaved}x (median s per step, cached / uncached):", ""]
        lines += [
            f"- {r['backbone']}: {r['step_cached_s']:.2f} / {r['step_uncached_s']:.2f} = {r['step_ratio']:.2f}"
            for r in rows
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; write (and print) the table and the raw figures."""
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
    parser.add_argument("--out", type=Path, default=Path("results/training_time"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("anomalib_aand").setLevel(logging.INFO)  # says whether stage 2 used the cache
    source = provenance(__file__, argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = demo_category(Path(tmp), n_train=args.train_images, size=args.image_size)
        rows = [measure(backbone, root, args) for backbone in args.backbones]
        for row in rows:
            row.update(interleaved_steps(row["backbone"], args) if args.interleaved else {})
        rd = measure_rd(args.rd_backbone, root, args)

    table = report(rows, rd, args, source)
    figures = {**source, "args": {k: str(v) for k, v in vars(args).items()}, "aand": rows, "reverse_distillation": rd}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_time.md").write_text(table)
    (args.out / "training_time.json").write_text(json.dumps(figures, indent=1))
    print(table)
    print(f"Written: {args.out / 'training_time.md'}, {args.out / 'training_time.json'}")


if __name__ == "__main__":
    main()
