"""Mixed precision: every stage, the cache, test and export under ``32``, ``bf16-mixed`` and ``16-mixed``.

On a CPU Lightning runs ``16-mixed`` as bfloat16 autocast. What only CUDA could show (``torch.histc`` has no
half-precision kernel there and refuses deterministic mode; CUDA autocast keeps other ops in half precision) is
checked by construction: the code paths that must stay in float32 are run under autocast and compared, and
``torch.histc`` is made to fail.
"""

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from conftest import make_mvtec_dataset, tiny_aand

from anomalib_aand import Aand
from anomalib_aand.anomaly_map import AnomalyMapGenerator
from anomalib_aand.components.feature_cache import Stage2FeatureCache
from anomalib_aand.components.synthesis import AnomalySynthesizer, ForegroundEstimator
from anomalib_aand.loss import AmplificationLoss, focal_loss

ROOT = Path(__file__).resolve().parents[1]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def no_histc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.histc`` fails as it does on CUDA for half precision and in deterministic mode."""

    def histc(*_, **__):
        msg = "torch.histc is not allowed: no CUDA kernel for half precision, not deterministic"
        raise RuntimeError(msg)

    monkeypatch.setattr(torch, "histc", histc)


@pytest.mark.parametrize("dtype", HALF)
def test_focal_loss_stays_finite_for_saturated_half_precision_gates(dtype: torch.dtype) -> None:
    for target in (torch.ones(4), torch.zeros(4)):
        for gate in (torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype)):
            loss = focal_loss(gate, target, 0.8, 2.0)
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss)


def test_stage1_losses_are_float32_under_autocast() -> None:
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    amplified = [f + 0.1 for f in features]
    gates = [torch.ones(2, 1, 8, 8), torch.ones(2, 1, 4, 4)]  # saturated
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.autocast("cpu", torch.bfloat16):
        losses = AmplificationLoss(0.8, 2.0, 0.1, 0.3)([f.bfloat16() for f in features], amplified, gates, mask)
    assert all(value.dtype == torch.float32 for value in losses.values())
    assert all(torch.isfinite(value) for value in losses.values())


def test_anomaly_map_is_float32_under_autocast() -> None:
    targets = [torch.randn(2, 8, 8, 8).bfloat16(), torch.randn(2, 16, 4, 4).bfloat16()]
    students = [t + 0.1 * torch.randn_like(t) for t in targets]
    generator = AnomalyMapGenerator()
    with torch.autocast("cpu", torch.bfloat16):
        mixed = generator(targets, students, (32, 32))
    full = generator([t.float() for t in targets], [s.float() for s in students], (32, 32))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full)


@pytest.mark.usefixtures("no_histc")
def test_foreground_needs_no_histc_under_autocast_or_deterministic_mode() -> None:
    images = torch.full((2, 3, 96, 96), 0.1)
    images[..., 24:72, 24:72] = 0.8
    estimator = ForegroundEstimator()
    plain = estimator(images)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = estimator(images.bfloat16())
    torch.use_deterministic_algorithms(mode=True)
    try:
        deterministic = estimator(images)
    finally:
        torch.use_deterministic_algorithms(mode=False)
    assert plain.dtype == mixed.dtype == torch.float32
    assert 0.15 < plain.mean() < 0.45
    assert torch.equal(plain, mixed)
    assert torch.equal(plain, deterministic)


@pytest.mark.usefixtures("no_histc")
def test_synthesis_is_float32_under_autocast() -> None:
    images = torch.rand(4, 3, 64, 64)
    synthesizer = AnomalySynthesizer(probability=1.0, foreground_mask=True)
    with torch.autocast("cpu", torch.bfloat16):
        outputs = synthesizer(images.bfloat16())
    assert [t.dtype for t in outputs] == [torch.float32] * 3


def test_cache_storage_choice_is_made_outside_autocast() -> None:
    """The float16/float32 choice compares two float32 losses, also when the step runs under autocast."""
    student = torch.nn.Conv2d(8, 8, 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        features = [torch.randn(2, 8, 4, 4, generator=generator) * 10]
        choices = []
        for context in (nullcontext(), torch.autocast("cpu", torch.bfloat16)):
            targets = Stage2FeatureCache(half_precision_rtol=2e-4)
            targets.start(
                SimpleNamespace(train_dataloader=SimpleNamespace(dataset=[0] * 2), strategy=None),
                student=lambda f: [student(x) for x in f],
                loss=lambda t, s: ((t[0] - s[0]) ** 2).mean(),
                state=student,
            )
            with context:
                targets(torch.rand(2, 3, 8, 8), ["a", "b"], lambda _, f=features: f)
            choices.append(targets.dtype)
        assert choices[0] == choices[1]


# ------------------------------------------------------------------ through anomalib, on the CPU
def _engine(root: Path, precision: str, **kwargs) -> Engine:
    return Engine(
        default_root_dir=root,
        precision=precision,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 4 test images: a CPU without bfloat16 instructions runs bfloat16 convolutions slowly."""
    root = tmp_path_factory.mktemp("few")
    make_mvtec_dataset(root, n_train=4, n_good=2, n_bad=2)
    return root


def _datamodule(root: Path) -> MVTecAD:
    """Two batches per epoch."""
    return MVTecAD(root=root, category="toy", train_batch_size=2, eval_batch_size=2, num_workers=0)


def _assert_onnx_matches_torch(engine: Engine, root: Path) -> None:
    import onnxruntime as ort

    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    onnx_path = engine.export(
        Aand(backbone="resnet18"),
        ExportType.ONNX,
        export_root=root,
        input_size=(32, 32),
        ckpt_path=checkpoint,
        onnx_kwargs={"optimize": False},
    )  # faster with a fixed size and without onnxscript's optimiser; test_export.py exports as users do
    images = torch.rand(2, 3, 32, 32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    with torch.no_grad():
        expected = Aand.load_from_checkpoint(checkpoint).eval()(images)
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), expected.pred_score.numpy().reshape(-1), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_precision_trains_both_stages_tests_and_exports(precision: str, few_images: Path, tmp_path: Path) -> None:
    """1 + 2 epochs with the cache on (every stage-2 batch a hit) and off; test and predict in float32; export.

    ``16-mixed`` runs with the cache only: on a CPU Lightning replaces it by ``bf16-mixed`` (with a warning), so the
    run only shows that the flag is accepted.
    """
    datamodule = _datamodule(few_images)
    for cache in (True,) if precision == "16-mixed" else (True, False):
        torch.manual_seed(0)
        model = tiny_aand(stage2_epochs=2, cache_features=cache)
        engine = _engine(tmp_path / str(cache), precision)
        engine.fit(model, datamodule=datamodule)
        if cache:
            assert model.feature_cache.hits == 2, model.feature_cache.reason  # the second stage-2 epoch's 2 batches
        else:
            assert model.feature_cache.reason == "cache_features=False"
        (metrics,) = engine.test(model, datamodule=datamodule)
        assert all(np.isfinite(value) for value in metrics.values()), metrics
        predictions = engine.predict(model, datamodule=datamodule)
        assert {str(p.anomaly_map.dtype) for p in predictions} == {str(torch.float32)}
        assert {str(p.pred_score.dtype) for p in predictions} == {str(torch.float32)}
    if precision == "bf16-mixed":  # a mixed-precision checkpoint exports in float32 (once: 16-mixed is bf16 here)
        _assert_onnx_matches_torch(engine, tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("no_histc")
def test_deterministic_training_with_foreground_masks(few_images: Path, tmp_path: Path) -> None:
    """``--trainer.deterministic true`` with foreground masks; the checkpoint loads, also with a synthesizer entry."""
    model = tiny_aand(foreground_mask=True, pre_processor=Aand.configure_pre_processor((64, 64)))
    engine = _engine(tmp_path, "bf16-mixed", deterministic=True)
    engine.fit(model, datamodule=_datamodule(few_images))
    assert isinstance(model.synthesizer.foreground, ForegroundEstimator)
    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert not any(key.startswith("synthesizer.") for key in state["state_dict"])
    state["state_dict"]["synthesizer.foreground.blur.kernel"] = torch.ones(1, 1, 65, 65)  # as older checkpoints
    torch.save(state, checkpoint)
    (metrics,) = engine.test(Aand.load_from_checkpoint(checkpoint), datamodule=_datamodule(few_images))
    assert np.isfinite(metrics["image_AUROC"])


SMALL_CONFIG = """
model:
  class_path: anomalib_aand.Aand
  init_args:
    backbone: resnet18
    pre_trained: false
    hkd_top_k: 2
    stage1_epochs: 1
    stage2_epochs: 2
    pre_processor:
      class_path: anomalib.pre_processing.PreProcessor
      init_args:
        transform:
          class_path: torchvision.transforms.v2.Compose
          init_args:
            transforms:
              - class_path: torchvision.transforms.v2.Resize
                init_args: {size: [32, 32]}
              - class_path: torchvision.transforms.v2.Normalize
                init_args: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
"""


@pytest.mark.slow
def test_cli_bf16_mixed_with_the_cache(few_images: Path, tmp_path: Path) -> None:
    """The command that crashed at the first cache hit: ``anomalib train ... --trainer.precision bf16-mixed``."""
    (tmp_path / "small.yaml").write_text(SMALL_CONFIG)
    command = [str(Path(sys.executable).with_name("anomalib")), "train", "--config", "small.yaml"]
    command += ["--data", "anomalib.data.MVTecAD", "--data.root", str(few_images), "--data.category", "toy"]
    command += ["--data.num_workers", "0", "--data.train_batch_size", "2", "--data.eval_batch_size", "2"]
    command += ["--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--default_root_dir", "out"]
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "AAND stage 2 trains from cached teacher features: 4 images" in output
    assert "image_AUROC" in output
