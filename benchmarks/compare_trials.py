"""Before/after table of AAND trials: ``benchmarks/accuracy.py`` output folders against a baseline folder.

Each folder holds the ``results.json`` of one ``benchmarks/accuracy.py`` run (same data, seeds and schedule,
``--aand-args`` changed). For every category both runs have, and for their mean, the table gives the
baseline's image AUROC, pixel AUROC and AUPRO, then each trial's values with the difference to the baseline.
With several seeds a cell is the mean over the seeds both runs have.

    python benchmarks/compare_trials.py --model aand --baseline results/benchmark-seeds \
        --trial teacher-norm=results/trial-teachernorm --trial procedural=results/trial-procedural \
        --output results/trials.md
"""

import argparse
import json
import statistics
from pathlib import Path

METRICS = {"image_AUROC": "image AUROC", "pixel_AUROC": "pixel AUROC", "pixel_AUPRO": "AUPRO"}


def load(folder: Path, model: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{category: {seed: row}}`` of ``model`` in ``folder/results.json``."""
    store = folder / "results.json"
    if not store.is_file():
        msg = f"{store} not found: give a folder written by benchmarks/accuracy.py --output."
        raise SystemExit(msg)
    results = json.loads(store.read_text())["results"]
    if model not in results:
        msg = f"{store} has no results of {model!r} (it has {sorted(results)})."
        raise SystemExit(msg)
    return results[model]


def compare(baseline: dict, trials: dict[str, dict]) -> str:
    """Markdown: one row per category (and the mean), baseline values then each trial's value and change."""
    categories = [c for c in baseline if all(c in t for t in trials.values())]
    if not categories:
        msg = "The baseline and the trials have no category in common."
        raise SystemExit(msg)
    seeds = {c: sorted(set(baseline[c]).intersection(*(t[c] for t in trials.values()))) for c in categories}

    def cell(runs: dict, category: str, key: str) -> float:
        return statistics.fmean(runs[category][s][key] for s in seeds[category])

    head = ["category", "seeds"] + [f"baseline {v}" for v in METRICS.values()]
    head += [f"{name} {v}" for name in trials for v in METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    values = {"baseline": baseline, **trials}
    table = {c: {n: [cell(runs, c, k) for k in METRICS] for n, runs in values.items()} for c in categories}
    table["**mean**"] = {n: [statistics.fmean(table[c][n][i] for c in categories) for i in range(3)] for n in values}
    for category, row in table.items():
        cells = [category, ",".join(seeds.get(category, [])) or "-"] + [f"{v:.3f}" for v in row["baseline"]]
        for name in trials:
            cells += [f"{v:.3f} ({v - b:+.3f})" for v, b in zip(row[name], row["baseline"], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="aand", help="the contestant to compare (default: aand)")
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--trial", action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    trials = {}
    for item in args.trial:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"--trial {item!r}: write NAME=FOLDER")
        trials[name] = load(Path(folder), args.model)
    table = compare(load(args.baseline, args.model), trials)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
