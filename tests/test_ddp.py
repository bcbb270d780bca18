"""AAND under Lightning DDP: two CPU processes (gloo) against one process, on generated data.

The DDP runs go through anomalib's real entry points: the ``anomalib train`` CLI and ``Engine`` in
``tests/ddp_script.py``, whose probe callback (also given to the CLI) writes what each process saw
(``rank<r>.json``). One single-process run (``Engine``) and one DDP run (the CLI; 1 + 3 epochs, batch 1 per
process, 4 training images) are shared by most tests; a second DDP run (``Engine``) resumes the single-process
checkpoint.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from conftest import make_mvtec_dataset

from anomalib_aand import Aand

pytestmark = pytest.mark.slow  # every test here trains under DDP (two processes)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ddp_script.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
EPOCHS = 4  # 1 + 3 epochs, 4 images, batch 1 per process
BUDGET_GB = 4e-4  # the 4 images' float16 features (0.23 MB) fit, half of it (per process under DDP) does not


def run_script(root: Path, out: Path, devices: int, *extra: str, ok: bool = True) -> str:
    """Run ``ddp_script.py``; return its output."""
    command = [sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out), "--devices", str(devices)]
    command += ["--batch", "1", "--stage2", str(EPOCHS - 1), *extra]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, output[-4000:]
    return output


def ranks(out: Path, world: int = 2) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def checkpoint_hashes(path: Path) -> dict[str, str]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {
        key.removeprefix("model."): hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
        for key, value in state.items()
        if key.startswith("model.")
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    make_mvtec_dataset(root, n_train=4)
    return root


@pytest.fixture(scope="module")
def single(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same training in one process."""
    out = tmp_path_factory.mktemp("single")
    run_script(data, out, 1)
    return out


@pytest.fixture(scope="module")
def ddp(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two processes through the issue's command, ``anomalib train ... --trainer.strategy ddp``: fit (both stages),
    then test; the same settings and callbacks as ``ddp_script.py``, given in a ``--config`` file."""
    out = tmp_path_factory.mktemp("ddp")
    pre_processor = {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {
            "transform": {
                "class_path": "torchvision.transforms.v2.Compose",
                "init_args": {
                    "transforms": [
                        {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [64, 64]}},
                        {
                            "class_path": "torchvision.transforms.v2.Normalize",
                            "init_args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                        },
                    ]
                },
            }
        },
    }
    epochs = {"dirpath": str(out / "epochs"), "filename": "{epoch}", "save_top_k": -1, "mode": "max"}
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "ddp_script.Probe", "init_args": {"out": str(out)}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {**epochs, "save_on_train_epoch_end": True},
                },
            ],
        },
        "model": {
            "class_path": "anomalib_aand.Aand",
            "init_args": {
                "backbone": "resnet18",
                "pre_trained": False,
                "stage1_epochs": 1,
                "stage2_epochs": EPOCHS - 1,
                "pre_processor": pre_processor,
            },
        },
        "data": {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(data),
                "category": "toy",
                "train_batch_size": 1,
                "eval_batch_size": 1,
                "num_workers": 0,
            },
        },
    }
    (out / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    command = [str(Path(sys.executable).with_name("anomalib")), "train", "--config", str(out / "config.yaml")]
    command += ["--trainer.strategy", "ddp", "--default_root_dir", str(out / "runs")]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    (out / "log.txt").write_text(output)
    return out


@pytest.fixture(scope="module")
def ddp_resumed(data: Path, single: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two processes resume the single-process checkpoint of epoch 0, with a cache budget only one process fits."""
    out = tmp_path_factory.mktemp("ddp_resumed")
    ckpt = str(single / "epochs" / "epoch=0.ckpt")
    log = run_script(data, out, 2, "--ckpt", ckpt, "--budget", str(BUDGET_GB), "--no-test")
    return out, log


def test_cli_ddp_trains_both_stages_without_a_flag(ddp: Path) -> None:
    """The issue's command: ``--trainer.strategy ddp``, two CPU processes, exit 0, exactly one checkpoint."""
    output = (ddp / "log.txt").read_text()
    assert "not used in producing the loss" not in output
    assert "image_AUROC" in output
    assert [p.name for p in (ddp / "runs").rglob("*.ckpt")] == ["model.ckpt"]


def test_weights_identical_on_all_ranks_after_each_stage(ddp: Path) -> None:
    first, second = ranks(ddp)
    for stage in ("stage1", "stage2"):
        for kind in ("parameters", "buffers"):
            assert first[stage][kind] == second[stage][kind], (stage, kind)
    assert first["stage1"]["parameters"] != first["stage2"]["parameters"]  # stage 2 did train
    # each stage trained its own modules: the RAA in stage 1, the student in stage 2
    for before, after, trained in (("start", "stage1", ("raa.",)), ("stage1", "stage2", ("bottleneck.", "decoder."))):
        old, new = first[before]["parameters"], first[after]["parameters"]
        changed = {name for name, digest in new.items() if old[name] != digest}
        assert changed
        assert all(name.startswith(trained) for name in changed), (after, sorted(changed)[:3])


def test_stage_and_learning_rate_schedules_follow_one_process(ddp: Path, single: Path) -> None:
    (reference,) = ranks(single, world=1)
    expected = [(e["epoch"], e["stage"], e["lr"]) for e in reference["epochs"]]
    assert [stage for _, stage, _ in expected] == [1, 2, 2, 2]
    assert expected[-1][2] == pytest.approx([0.001, 0.001])  # both MultiStepLR schedules stepped
    for record in ranks(ddp):
        assert [(e["epoch"], e["stage"], e["lr"]) for e in record["epochs"]] == expected


def test_distributed_sampler_splits_the_training_images(ddp: Path, data: Path) -> None:
    first, second = ranks(ddp)
    assert first["sampler"] == second["sampler"] == "DistributedSampler"
    train = {str(p) for p in (data / "toy" / "train" / "good").iterdir()}
    for a, b in zip(first["epochs"], second["epochs"], strict=True):
        assert set(a["paths"]).isdisjoint(b["paths"])
        assert set(a["paths"]) | set(b["paths"]) == train
    assert len({tuple(e["paths"]) for e in first["epochs"]}) > 1  # reshuffled between epochs


def test_feature_cache_per_rank_matches_uncached_losses(ddp: Path, data: Path) -> None:
    """Each process caches the whole training set when stage 2 starts, so every stage-2 batch is a hit."""
    train = {str(p) for p in (data / "toy" / "train" / "good").iterdir()}
    for record in ranks(ddp):
        stage2 = [e for e in record["epochs"] if e["stage"] == 2]
        hits = 0
        for epoch, cache in zip(stage2, record["cache"], strict=True):
            hits += len(epoch["paths"])  # batch 1
            assert cache["epoch"] == epoch["epoch"]
            assert set(cache["keys"]) == train  # every image, whichever this process was handed
            assert cache["hits"] == hits
        steps = [s for s in record["steps"] if s["stage"] == 2]
        assert len(steps) == 2 * (EPOCHS - 1)
        for step in steps:
            assert step["loss"] == pytest.approx(step["uncached"], rel=1e-3)


def test_cache_budget_is_shared_by_the_processes_of_a_machine(ddp_resumed: tuple[Path, str]) -> None:
    _, log = ddp_resumed
    assert f"over cache_budget_gb={BUDGET_GB} / 2 processes on this machine" in log
    needed = float(log.split("it would take ")[1].split(" GB")[0])
    assert BUDGET_GB / 2 < needed <= BUDGET_GB  # one process alone would have cached


def test_evaluation_covers_the_whole_split_like_one_process(ddp: Path, single: Path, data: Path) -> None:
    first, second = ranks(ddp)
    (reference,) = ranks(single, world=1)
    for split in ("val_paths", "test_paths"):
        assert set(first[split]).isdisjoint(second[split])
        assert sorted(first[split] + second[split]) == sorted(reference[split])
    for key in ("fit_post_processing", "test_post_processing", "test_metrics"):
        assert first[key] == second[key]
    checkpoint = next((ddp / "runs").rglob("model.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    thresholds = {
        "image_threshold": "post_processor._image_threshold",
        "pixel_threshold": "post_processor._pixel_threshold",
        **{name: f"post_processor.{name}" for name in ("image_min", "image_max", "pixel_min", "pixel_max")},
    }
    for name, key in thresholds.items():
        assert float(state[key]) == pytest.approx(first["fit_post_processing"][name], rel=1e-6)
    # one process evaluating the DDP checkpoint reports what the two processes reported; it computes with the
    # threads of one DDP process (Lightning gives each cpu_count // processes unless OMP_NUM_THREADS is set), since
    # a score that lies exactly on the threshold can take either label when the summation order changes with them
    datamodule = MVTecAD(root=data, category="toy", eval_batch_size=1, num_workers=0)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=ddp / "eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(first["threads"])
    try:
        (metrics,) = engine.test(Aand.load_from_checkpoint(checkpoint), datamodule=datamodule)
    finally:
        torch.set_num_threads(threads)
    for name, value in first["test_metrics"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name


def test_batchnorm_statistics_are_per_process_and_rank_zero_is_kept(ddp: Path) -> None:
    """Choice: per-process BatchNorm (no SyncBatchNorm); rank 0's running statistics go to every process."""
    first, second = ranks(ddp)
    assert first["sync_batchnorm"] is second["sync_batchnorm"] is False
    assert first["final"]["buffers"] == second["final"]["buffers"]
    checkpoint = checkpoint_hashes(next((ddp / "runs").rglob("model.ckpt")))
    for name, digest in {**first["final"]["parameters"], **first["final"]["buffers"]}.items():
        assert checkpoint[name] == digest, name


def test_exactly_one_checkpoint_per_save(ddp: Path) -> None:
    assert sorted(p.name for p in (ddp / "epochs").iterdir()) == [f"epoch={e}.ckpt" for e in range(EPOCHS)]
    assert [p.name for p in (ddp / "runs").rglob("*.ckpt")] == ["model.ckpt"]


def test_single_process_checkpoint_resumes_under_ddp(ddp_resumed: tuple[Path, str], single: Path) -> None:
    out, _ = ddp_resumed
    (reference,) = ranks(single, world=1)
    expected = [(e["epoch"], e["stage"], e["lr"]) for e in reference["epochs"][1:]]
    first, second = ranks(out)
    for record in (first, second):
        assert [(e["epoch"], e["stage"], e["lr"]) for e in record["epochs"]] == expected
        assert "cache" not in record  # over the per-process budget: stage 2 ran uncached
    assert first["final"] == second["final"]


def test_ddp_checkpoint_resumes_tests_predicts_and_exports_in_one_process(
    ddp: Path, data: Path, tmp_path: Path
) -> None:
    datamodule = MVTecAD(root=data, category="toy", train_batch_size=2, eval_batch_size=2, num_workers=0)
    model = Aand(
        backbone="resnet18",
        pre_trained=False,
        stage1_epochs=1,
        stage2_epochs=EPOCHS - 1,
        pre_processor=Aand.configure_pre_processor(image_size=(64, 64)),
    )
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule, ckpt_path=ddp / "epochs" / "epoch=0.ckpt")
    assert engine.trainer.current_epoch == EPOCHS
    checkpoint = next((ddp / "runs").rglob("model.ckpt"))
    (metrics,) = engine.test(Aand.load_from_checkpoint(checkpoint), datamodule=datamodule)
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    predictions = engine.predict(Aand.load_from_checkpoint(checkpoint), datamodule=datamodule)
    assert sum(len(batch.pred_score) for batch in predictions) == len(datamodule.test_data)
    exported = engine.export(Aand.load_from_checkpoint(checkpoint), ExportType.TORCH, export_root=tmp_path / "export")
    assert exported is not None
    assert exported.is_file()


def test_data_errors_reach_the_user_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_mvtec_dataset(root, n_train=4)
    (root / "toy" / "train" / "good" / "001.png").write_bytes(b"not an image")
    output = run_script(root, tmp_path / "out", 2, ok=False)
    assert output.count("cannot be read (corrupt, truncated or not an image)") == 1, output[-4000:]
    assert "001.png" in output
