"""CPU latency of AAND and of the plain reverse-distillation student: torch eager, OpenVINO FP32, FP16, INT8.

For each teacher (default EfficientNet-Lite0 and ResNet-18; also Lite1 and Lite2) two models are built on the
same teacher: AAND (RAA modules + student) and ``Aand(stage1_epochs=0)``, which has no RAA modules (the plain
RD4AD student).
Each is timed as anomalib exports it (pre-process -> model -> post-process) on raw 256 px images at
batch 1 and 8: median milliseconds per image over ``--repeats`` runs after ``--warmup`` runs.
OpenVINO FP32 and FP16 (weights stored in FP16, ``compress_to_fp16``) run with ``INFERENCE_PRECISION_HINT=f32``;
INT8 is the IR that ``Aand.to_openvino(compression_type=INT8_PTQ)`` writes (``anomalib export --compression_type
INT8_PTQ``), calibrated on half the training images of ``--calibration`` (an MVTec-layout category folder;
default: a generated demo ``brick`` category), as the README's export command does. Weights are random:
latency does not depend on them.

The physical limit: the same run times probes shaped like the models' layers (two square float32 GEMMs and two
3x3 convolutions, in OpenVINO, in torch, and quantised to int8 by NNCF in OpenVINO); a runtime's peak is its
fastest probe (a single 2048 GEMM under-estimated this machine: convolutions beat it). Each runtime's share of
that peak uses model FLOPs per image from torch's FLOP counter (one multiply-add = 2 FLOPs; INT8 against the
int8 peak, the others against the best float32 peak).

    python benchmarks/latency.py --calibration datasets/demo/brick --out results/latency

Writes ``latency.md`` (Markdown tables, headed by the command, the machine and the load), ``latency.csv`` (its
first lines, ``#`` comments, name the command and the machine) and ``latency.png``.
"""

import argparse
import functools
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from anomalib.deploy import CompressionType
from common import calibration_data, demo_category, load_average, provenance, provenance_lines, seconds
from torch.utils.flop_counter import FlopCounterMode

from anomalib_aand import Aand

TEACHERS = {
    "tf_efficientnet_lite0": ("blocks.1", "blocks.2", "blocks.4"),
    "tf_efficientnet_lite1": ("blocks.1", "blocks.2", "blocks.4"),
    "tf_efficientnet_lite2": ("blocks.1", "blocks.2", "blocks.4"),
    "resnet18": ("layer1", "layer2", "layer3"),
}
DEFAULT_TEACHERS = ("tf_efficientnet_lite0", "resnet18")
SIZE = 256
DEFAULT_SIGMA = 4.0  # Aand's map_sigma: the paper's blur
BATCHES = (1, 8)
RUNTIMES = ("torch eager", "OpenVINO FP32", "OpenVINO FP16", "OpenVINO INT8")
SHORT = {"torch eager": "torch", "OpenVINO FP32": "OV FP32", "OpenVINO FP16": "OV FP16", "OpenVINO INT8": "OV INT8"}
# Peak probes: (input shape, weight shape). A 2-D weight is a MatMul, a 4-D one a 3x3 convolution (padding 1),
# the shape of the models' own layers; the peak of a runtime is its fastest probe.
PEAK_PROBES = {
    "GEMM 1024": ((1024, 1024), (1024, 1024)),
    "GEMM 2048": ((2048, 2048), (2048, 2048)),
    "conv 3x3, 64 ch, 64 px, b8": ((8, 64, 64, 64), (64, 64, 3, 3)),
    "conv 3x3, 256 ch, 32 px, b8": ((8, 256, 32, 32), (256, 256, 3, 3)),
}
PEAK_RUNTIMES = ("OpenVINO float32", "OpenVINO int8", "torch float32")


def probe_flops(inputs: tuple[int, ...], weights: tuple[int, ...]) -> float:
    """Operations of one probe (one multiply-add = 2)."""
    if len(weights) == 2:
        return 2.0 * inputs[0] * inputs[1] * weights[1]
    batch, channels, height, width = inputs
    return 2.0 * batch * weights[0] * height * width * channels * weights[2] * weights[3]


def measure_probes(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """G(FL)OP/s of every probe in :data:`PEAK_PROBES` per runtime (``{probe: {runtime: rate}}``).

    int8 is the probe quantised by NNCF (int8 inputs and weights), compiled like the models' INT8 IRs.
    """
    import nncf
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    threads = {"INFERENCE_NUM_THREADS": args.threads} if args.threads else {}
    core = ov.Core()
    probes: dict[str, dict[str, float]] = {}
    for probe, (inputs, weights) in PEAK_PROBES.items():
        x = ops.parameter(list(inputs), np.float32, name="x")
        w = rng.standard_normal(weights).astype(np.float32)
        if len(weights) == 2:
            output = ops.matmul(x, ops.constant(w), transpose_a=False, transpose_b=False)
        else:
            output = ops.convolution(x, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
        model = ov.Model([output], [x])
        samples = [rng.standard_normal(inputs).astype(np.float32) for _ in range(2)]
        int8 = nncf.quantize(model, nncf.Dataset(samples), subset_size=2, fast_bias_correction=True)
        seconds = {}
        for name, graph in (("OpenVINO float32", model), ("OpenVINO int8", int8)):
            config = {"INFERENCE_PRECISION_HINT": "f32", **threads} if name.endswith("float32") else threads
            compiled = core.compile_model(graph, "CPU", config)
            run = functools.partial(compiled, samples[0])
            seconds[name] = median_ms_per_image(run, 1, args.warmup, args.repeats) / 1e3
        a, b = torch.from_numpy(samples[0]), torch.from_numpy(w)
        if len(weights) == 2:
            run = functools.partial(torch.matmul, a, b)
        else:
            run = functools.partial(torch.nn.functional.conv2d, a, b, padding=1)
        with torch.inference_mode():
            seconds["torch float32"] = median_ms_per_image(run, 1, args.warmup, args.repeats) / 1e3
        probes[probe] = {name: probe_flops(inputs, weights) / s / 1e9 for name, s in seconds.items()}
        print(probe, {k: round(v, 1) for k, v in probes[probe].items()}, "G(FL)OP/s", flush=True)
    return probes


def int8_conv_share(model: object) -> float:
    """Share of an IR's convolution multiply-adds whose input activations are quantised (run in int8)."""
    total = quantised = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in {"Convolution", "GroupConvolution"}:
            continue
        out, weights = op.get_output_partial_shape(0), op.input_value(1).get_partial_shape()
        if not all(out[i].is_static for i in (1, 2, 3)):
            continue
        per_output = 1
        for dim in list(weights)[-3:]:  # (in channels per group, kh, kw) of OIHW or GOIHW weights
            per_output *= dim.get_length()
        macs = out[1].get_length() * out[2].get_length() * out[3].get_length() * per_output
        total += macs
        quantised += macs * (op.input_value(0).get_node().get_type_name() == "FakeQuantize")
    return quantised / total


def median_ms_per_image(run: Callable[[], object], batch: int, warmup: int, repeats: int) -> float:
    """Median wall time of ``run`` per image, in ms, warm-up runs excluded."""
    return 1000 * statistics.median(seconds(run, warmup, repeats)) / batch


def measure(
    backbone: str, amplification: bool, args: argparse.Namespace, workdir: Path, calibration: Path
) -> dict[str, object]:
    """Parameters, GFLOPs and latencies of one model; ``calibration``: an MVTec-layout category folder."""
    import openvino as ov

    model = Aand(
        backbone=backbone,
        layers=TEACHERS[backbone],
        pre_trained=False,
        stage1_epochs=1 if amplification else 0,
        map_calibration=args.map_calibration,
        map_sigma=args.map_sigma,
    ).eval()
    with torch.inference_mode():  # the calibration's statistics at their trained shape (values do not matter)
        images = [torch.rand(2, 3, SIZE, SIZE) for _ in range(2)]
        distances = (model.model.distances(i) for i in images)
        model.model.anomaly_map_generator.calibration.measure(args.map_calibration, distances)
        objects = torch.zeros(2, 1, SIZE, SIZE)  # an object's foreground: the map support at its trained shape
        objects[..., SIZE // 4 : -SIZE // 4, SIZE // 4 : -SIZE // 4] = 1
        model.model.anomaly_map_generator.calibration.measure_support([objects], model.model.reductions[0])
    # An untrained model's normalisation statistics are NaN, which INT8 compilation rejects: set finite ones.
    for name, value in (
        ("_image_threshold", 0.5),
        ("_pixel_threshold", 0.5),
        ("image_min", 0.0),
        ("pixel_min", 0.0),
        ("image_max", 1.0),
        ("pixel_max", 1.0),
    ):
        getattr(model.post_processor, name).fill_(value)
    name = "AAND" if amplification else "RD student"
    if args.map_calibration != "envelope":
        name += f" ({args.map_calibration})"
    if args.map_sigma != DEFAULT_SIGMA:
        name += f" (map_sigma {args.map_sigma:g})"
    row: dict[str, object] = {"teacher": backbone, "model": name}
    row["params_M"] = sum(p.numel() for p in model.model.parameters()) / 1e6
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.model(torch.zeros(1, 3, SIZE, SIZE))
    row["GFLOPs"] = counter.get_total_flops() / 1e9

    export_root = workdir / f"{backbone}_{row['model'].replace(' ', '_')}"
    xml = model.to_openvino(export_root, input_size=(SIZE, SIZE))
    core = ov.Core()
    threads = {"INFERENCE_NUM_THREADS": args.threads} if args.threads else {}
    fp32 = core.read_model(xml)
    ov.save_model(fp32, export_root / "fp16.xml", compress_to_fp16=True)
    int8_xml = model.to_openvino(
        export_root / "int8",
        input_size=(SIZE, SIZE),
        compression_type=CompressionType.INT8_PTQ,
        datamodule=calibration_data(calibration.parent, calibration.name, size=SIZE),
    )
    int8 = core.read_model(int8_xml)
    row["int8_conv_share"] = int8_conv_share(int8)
    compiled = {
        "OpenVINO FP32": core.compile_model(fp32, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **threads}),
        "OpenVINO FP16": core.compile_model(
            export_root / "fp16.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32", **threads}
        ),
        "OpenVINO INT8": core.compile_model(int8, "CPU", threads),
    }
    for batch in BATCHES:
        images = torch.rand(batch, 3, SIZE, SIZE)
        with torch.inference_mode():
            row[f"torch eager b{batch}"] = median_ms_per_image(
                functools.partial(model, images), batch, args.warmup, args.repeats
            )
        for name, network in compiled.items():
            run = functools.partial(network, images.numpy())
            row[f"{name} b{batch}"] = median_ms_per_image(run, batch, args.warmup, args.repeats)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def write_report(
    rows: list[dict[str, object]],
    out: Path,
    header: str,
    probes: dict[str, dict[str, float]],
    source: dict[str, str],
) -> None:
    """Markdown tables (latency, the peak probes, share of the measured peak), CSV and a bar chart."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    peak = {name: max(rates[name] for rates in probes.values()) for name in PEAK_RUNTIMES}
    with (out / "latency.csv").open("w") as csv:
        csv.write(f"# command: {source['command']}\n# machine: {source['machine']}\n")
        pd.DataFrame(rows).to_csv(csv, index=False)
    lines = [*provenance_lines(source), "", header, ""]
    lines += ["ms per image (median), 256 px; speed-up over torch eager in brackets.", ""]
    columns = ["teacher", "model", "params (M)", "GFLOPs", "conv MACs in int8"]
    for batch in BATCHES:
        columns += [f"{SHORT[r]} b{batch}" for r in RUNTIMES] + [f"INT8/FP32 b{batch}"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row["teacher"]), str(row["model"]), f"{row['params_M']:.2f}", f"{row['GFLOPs']:.2f}"]
        cells.append(f"{row['int8_conv_share']:.0%}")
        for batch in BATCHES:
            eager = row[f"torch eager b{batch}"]
            cells.append(f"{eager:.1f}")
            for name in RUNTIMES[1:]:
                value = row[f"{name} b{batch}"]
                cells.append(f"{value:.1f} ({eager / value:.2f}x)")
            cells.append(f"{row[f'OpenVINO FP32 b{batch}'] / row[f'OpenVINO INT8 b{batch}']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Measured peak, same run (G(FL)OP/s of each probe; a runtime's peak is its fastest probe):",
        "",
        "| probe | " + " | ".join(PEAK_RUNTIMES) + " |",
        "|---|" + "---|" * len(PEAK_RUNTIMES),
    ]
    lines += [
        f"| {probe} | " + " | ".join(f"{rates[name]:.1f}" for name in PEAK_RUNTIMES) + " |"
        for probe, rates in probes.items()
    ]
    float_peak = max(peak["OpenVINO float32"], peak["torch float32"])
    lines += [
        "",
        (
            f"Share of the peak reached by each runtime (model GFLOPs / time): INT8 against the int8 peak "
            f"({peak['OpenVINO int8']:.1f} GOP/s), the others against the float32 peak ({float_peak:.1f} GFLOP/s)."
        ),
        "",
    ]
    columns = ["teacher", "model"] + [f"{SHORT[r]} b{batch}" for batch in BATCHES for r in RUNTIMES]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row["teacher"]), str(row["model"])]
        for batch in BATCHES:
            for name in RUNTIMES:
                reference = peak["OpenVINO int8"] if name.endswith("INT8") else float_peak
                achieved = float(row["GFLOPs"]) / (float(row[f"{name} b{batch}"]) / 1000)
                cells.append(f"{100 * achieved / reference:.0f} %")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "AAND / RD student latency ratio (same teacher, same runtime):", ""]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        pair = {r["model"]: r for r in rows if r["teacher"] == teacher}
        if {"AAND", "RD student"} <= pair.keys():
            ratios = [
                f"{key}: {pair['AAND'][key] / pair['RD student'][key]:.2f}x"
                for key in pair["AAND"]
                if key.endswith(("b1", "b8"))
            ]
            lines.append(f"- {teacher}: " + ", ".join(ratios))
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plt.close("all")
    figure, axes = plt.subplots(1, len(BATCHES), figsize=(6 * len(BATCHES), 4), sharey=False)
    runtimes = list(RUNTIMES)
    labels = [f"{r['model']}\n{r['teacher']}" for r in rows]
    for axis, batch in zip(np.atleast_1d(axes), BATCHES, strict=True):
        x = np.arange(len(rows))
        for i, runtime in enumerate(runtimes):
            axis.bar(x + (i - 1.5) * 0.2, [r[f"{runtime} b{batch}"] for r in rows], width=0.2, label=runtime)
        axis.set_xticks(x, labels, fontsize=8)
        axis.set_ylabel("ms / image (median)")
        axis.set_title(f"batch {batch}, {SIZE} px")
        axis.legend(fontsize=8)
    figure.suptitle(f"{source['command']}\n{source['machine']}", fontsize=7, wrap=True)
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=120, metadata={"Description": f"{source['command']}; {source['machine']}"})


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/latency"))
    parser.add_argument("--teachers", nargs="+", default=list(DEFAULT_TEACHERS), choices=list(TEACHERS))
    parser.add_argument(
        "--map-calibration",
        default="envelope",
        choices=["none", "scale", "position", "envelope"],
        help="the models' map_calibration (Aand argument; Aand's default)",
    )
    parser.add_argument(
        "--map-sigma",
        type=float,
        default=DEFAULT_SIGMA,
        help="the models' map_sigma, the blur of the anomaly map (Aand argument; Aand's default)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="MVTec-layout category folder (ROOT/CATEGORY); half its training images calibrate INT8 "
        "(default: a generated demo brick category)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and OpenVINO (default: all cores)")
    args = parser.parse_args(argv)
    if args.calibration and not (args.calibration / "train" / "good").is_dir():
        parser.error(f"--calibration {args.calibration}: no train/good; give a category folder (datasets/demo/brick)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    source = provenance(__file__, argv)
    loads = [load_average()]
    probes = measure_probes(args)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        calibration = args.calibration or demo_category(Path(workdir) / "data", n_train=64) / "brick"
        for backbone in args.teachers:
            for amplification in (True, False):
                rows.append(measure(backbone, amplification, args, Path(workdir), calibration))
                loads.append(load_average())
                header = f"Load average (1/5/15 min) during the run: {loads[0]} ... {loads[-1]}"
                write_report(rows, args.out, header, probes, source)  # after every model: a stopped run keeps rows


if __name__ == "__main__":
    main()
