"""Peak memory (max RSS) of the edge inference tool on one large image, against a small-image baseline.

Each measurement is a fresh process running ``python -m anomalib_aand.tools.infer`` on a folder holding
one image; its peak resident memory is read from ``/usr/bin/time -v`` ("Maximum resident set size").
``--source`` chooses the checkout whose tool runs (e.g. an older one, to compare before/after). Without
``--model`` a random ResNet-18 AAND (256 px, Resize in the graph, as ``anomalib export`` writes it) is
exported to OpenVINO: memory does not depend on the weights.

    python benchmarks/infer_memory.py --sizes 256 6000 --formats png jpg [--source /path/to/other/checkout]
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def export_random_model(folder: Path) -> Path:
    """A random ResNet-18 AAND (256 px) exported as anomalib does (ONNX, then ``openvino.convert_model``)."""
    import openvino as ov

    from anomalib_aand import Aand

    onnx = Aand(backbone="resnet18", pre_trained=False).eval().to_onnx(folder)
    xml = folder / "model.xml"
    ov.save_model(ov.convert_model(onnx), xml, compress_to_fp16=False)
    return xml


def write_image(path: Path, side: int) -> None:
    """A smooth colour texture of ``side`` x ``side`` pixels (compresses like a photo, unlike noise)."""
    y, x = np.ogrid[0:side, 0:side]
    rgb = [(np.sin(x / (7 + 3 * c)) * np.cos(y / (11 + 2 * c)) * 100 + 128).astype(np.uint8) for c in range(3)]
    Image.fromarray(np.stack(np.broadcast_arrays(*rgb), axis=-1)).save(path)


def peak_rss_mib(source: Path, model: Path, images: Path, out: Path) -> float:
    """Peak RSS (MiB) of one run of the tool from ``source`` on ``images``."""
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "anomalib_aand.tools.infer",
        "--model",
        str(model),
        "--images",
        str(images),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=out.parent)
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        msg = f"The tool failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
        raise RuntimeError(msg)
    return int(found.group(1)) / 1024


def main() -> None:
    """Command line entry point: prints a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="exported model.xml (default: a random 256 px ResNet-18 AAND)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 6000], help="image sides in pixels")
    parser.add_argument("--formats", nargs="+", default=["png", "jpg"], help="image file formats")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        model = args.model or export_random_model(tmp / "model")
        print(f"CPU: {cpu_name()}; tool from {args.source}; model {model.name}")
        print("| image | format | peak RSS (MiB) |\n|---|---|---|")
        for side in args.sizes:
            for suffix in args.formats:
                run = tmp / f"{side}-{suffix}"
                (run / "images").mkdir(parents=True)
                write_image(run / "images" / f"image.{suffix}", side)
                peak = peak_rss_mib(args.source, model, run / "images", run / "out")
                print(f"| {side}x{side} | {suffix} | {peak:.0f} |")


if __name__ == "__main__":
    main()
