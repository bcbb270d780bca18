"""Large images tile by tile, as anomalib's built-in models do it, and sizes checked where images are run.

``TilerConfigurationCallback`` gives the torch model a ``tiler`` (as for ReverseDistillation): the network runs on
the tiles and their features are joined before the anomaly map. anomalib's tiled-ensemble pipeline builds a
throwaway model at ``input_size=(10, 10)`` only to read its metrics, so sizes are checked when a run starts and in
every step, not at construction.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.pipelines.tiled_ensemble.components.utils import NormalizationStage
from anomalib.pipelines.tiled_ensemble.components.utils.helper_functions import get_ensemble_model
from conftest import make_mvtec_dataset, tiny_aand

from anomalib_aand import Aand

IMAGE = 64
TILE = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_mvtec_dataset(root, n_train=4, n_good=2, n_bad=2, size=IMAGE)
    return root


def datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="toy", train_batch_size=2, eval_batch_size=4, num_workers=0)


def engine(root: Path, **kwargs) -> Engine:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return Engine(default_root_dir=root, **{**settings, **kwargs})


def tiler(tile_size: int = TILE) -> TilerConfigurationCallback:
    return TilerConfigurationCallback(enable=True, tile_size=tile_size, stride=tile_size)


# ------------------------------------------------------------------------------ sizes checked where run
def test_tiled_ensemble_can_build_its_metrics_model() -> None:
    """anomalib's tiled-ensemble metrics stage: ``get_ensemble_model(..., input_size=(10, 10))``."""
    arguments = {"class_path": "anomalib_aand.Aand"}  # with init_args anomalib 2.7 fails for every model (OmegaConf)
    model = get_ensemble_model(arguments, normalization_stage=NormalizationStage.IMAGE, input_size=(10, 10))
    assert isinstance(model, Aand)
    assert model.evaluator is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"pre_processor": Aand.configure_pre_processor((40, 40))},
            r"Image size 40x40 .*multiples of 32, e.g. \[32, 64",
        ),
        ({"pre_processor": Aand.configure_pre_processor((32, 48))}, "Image size 32x48 .*multiples of 32"),
        ({"hkd_top_k": 5}, "hkd_top_k=5 exceeds the 4 positions"),
    ],
)
def test_unsuitable_size_is_refused_when_the_run_starts(tmp_path: Path, data_root: Path, kwargs, message) -> None:
    model = tiny_aand(**kwargs)  # constructing it is allowed: the tiled ensemble does it at any size
    with pytest.raises(ValueError, match=message):
        engine(tmp_path).fit(model, datamodule=datamodule(data_root))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unsuitable_tile_size_is_refused_when_the_run_starts(tmp_path: Path, data_root: Path) -> None:
    model = tiny_aand(pre_processor=Aand.configure_pre_processor((IMAGE, IMAGE)))
    with pytest.raises(ValueError, match=r"Tile size 48x48 .*multiples of 32.*tiler's tile_size"):
        engine(tmp_path, callbacks=[tiler(48)]).fit(model, datamodule=datamodule(data_root))


def test_forward_runs_the_network_on_tiles() -> None:
    model = tiny_aand(pre_processor=Aand.configure_pre_processor((IMAGE, IMAGE))).model.eval()
    seen = []
    model.teacher.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0].shape))
    lightning_module = tiny_aand()
    lightning_module.model = model
    tiler().setup(None, lightning_module, "fit")  # raised "Model does not support tiling." before
    with torch.no_grad():
        output = model(torch.rand(2, 3, IMAGE, IMAGE))
    assert seen == [torch.Size([8, 3, TILE, TILE])]  # 2 images x 4 tiles
    assert output.anomaly_map.shape == (2, 1, IMAGE, IMAGE)
    assert output.pred_score.numel() == 2


# ------------------------------------------------------------------------ train, test and export tiled
@pytest.mark.slow
def test_train_test_and_export_with_the_tiler_callback(tmp_path: Path, data_root: Path) -> None:
    """Images of 64 px in tiles of 32: fit, test and ONNX export, whose graph tiles as the torch model does.

    The export skips onnxscript's graph optimiser (``optimize=False``, passed to ``torch.onnx.export``): on the
    tiled graph it takes about 90 s of this test's 140 s, and it rewrites the graph without changing what it computes.
    """
    import onnxruntime as ort
    from anomalib.deploy import ExportType

    model = tiny_aand(pre_processor=Aand.configure_pre_processor((IMAGE, IMAGE)))
    run = engine(tmp_path, callbacks=[tiler()])
    run.fit(model, datamodule=datamodule(data_root))
    assert model.model.tiler is not None
    results = run.test(model, datamodule=datamodule(data_root))
    assert np.isfinite(results[0]["image_AUROC"])
    model.eval()
    onnx_path = run.export(model, ExportType.ONNX, export_root=tmp_path / "export", onnx_kwargs={"optimize": False})
    data = datamodule(data_root)
    data.setup()
    images = next(iter(data.test_dataloader())).image  # raw 64 px test images, with and without defects
    with torch.no_grad():
        expected = model(images)
    session = ort.InferenceSession(str(onnx_path))
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    assert expected.anomaly_map.shape == (len(images), 1, IMAGE, IMAGE)
    assert expected.anomaly_map.std() > 0
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), expected.pred_score.reshape(-1), atol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
