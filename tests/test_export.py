"""Export through anomalib: ONNX Runtime and OpenVINO give the torch model's scores, maps and labels.

One small model (random ResNet-18 teacher, 64 px, one epoch per stage) is trained and exported once per
session with ``Engine.export`` from its checkpoint (conftest's ``exported``); the OpenVINO IR is converted
from that ONNX file with the call anomalib's OpenVINO export makes (``openvino.convert_model``), which
spares a second trace.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.pre_processing import PreProcessor
from conftest import EXPORT_SIZE as SIZE
from conftest import IMAGENET, make_mvtec_dataset
from PIL import Image
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_aand import Aand
from anomalib_aand.tools import infer

TOLERANCE = 1e-3


def _pre_processor(resize: bool = True) -> PreProcessor:
    normalize = Normalize(*IMAGENET)
    return PreProcessor(transform=Compose([Resize((SIZE, SIZE)), normalize]) if resize else normalize)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of unseen test images. Not the validation images: one of those sits exactly on the
    threshold, where any rounding flips the label."""
    return make_mvtec_dataset(tmp_path_factory.mktemp("unseen"), n_train=0, seed=1) / "test"


@pytest.fixture(scope="module")
def images(unseen: Path) -> torch.Tensor:
    """The unseen images, raw ([0, 1], NCHW, sorted by path), as the exported graph takes them."""
    return torch.stack([read_image(p, as_tensor=True) for p in sorted(unseen.rglob("*.png"))])


def _torch_predictions(model: Aand, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in model(images)._asdict().items() if v is not None}


def _assert_parity(expected: dict[str, np.ndarray], scores: np.ndarray, maps: np.ndarray, labels: np.ndarray) -> None:
    np.testing.assert_allclose(scores.reshape(-1), expected["pred_score"].reshape(-1), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        maps.reshape(expected["anomaly_map"].shape), expected["anomaly_map"], atol=TOLERANCE, rtol=0
    )
    np.testing.assert_array_equal(labels.reshape(-1), expected["pred_label"].reshape(-1))


def test_onnx_runtime_matches_torch(exported: tuple[Aand, Path], images: torch.Tensor) -> None:
    """Whole chain (pre-process, model, post-process) in ONNX Runtime, on the test images and at another size."""
    import onnxruntime as ort

    model, onnx_path = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert {"pred_score", "pred_label", "anomaly_map", "pred_mask"} <= set(names)
    expected = _torch_predictions(model, images)
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    _assert_parity(expected, outputs["pred_score"], outputs["anomaly_map"], outputs["pred_label"])
    # Dynamic input size: the exported Resize brings any image to the training size.
    other = torch.nn.functional.interpolate(images[:2], size=(96, 80), mode="bilinear", align_corners=False)
    outputs = dict(zip(names, session.run(None, {"input": other.numpy()}), strict=True))
    assert outputs["anomaly_map"].shape[-2:] == (SIZE, SIZE)
    expected = _torch_predictions(model, other)
    _assert_parity(expected, outputs["pred_score"], outputs["anomaly_map"], outputs["pred_label"])


def test_openvino_inferencer_matches_torch(
    exported: tuple[Aand, Path],
    openvino_ir: Path,
    images: torch.Tensor,
    unseen: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenVINOInferencer in f32 (the default on bf16 CPUs is bf16) gives torch's scores, maps and labels;
    so does the edge script ``anomalib_aand.tools.infer``, which also writes one overlay per image."""
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    model = exported[0]
    inferencer = OpenVINOInferencer(path=openvino_ir, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    predictions = [inferencer.predict(image) for image in images]
    _assert_parity(
        _torch_predictions(model, images),
        np.concatenate([np.asarray(p.pred_score).reshape(-1) for p in predictions]),
        np.concatenate([np.asarray(p.anomaly_map) for p in predictions]),
        np.concatenate([np.asarray(p.pred_label).reshape(-1) for p in predictions]),
    )
    assert (tmp_path / "openvino_cache").is_dir()

    rows = infer.run(openvino_ir, unseen, tmp_path / "out").rows
    expected = _torch_predictions(model, images)
    np.testing.assert_allclose(
        [score for _, score, _ in rows], expected["pred_score"].reshape(-1), atol=TOLERANCE, rtol=0
    )
    assert [label for _, _, label in rows] == expected["pred_label"].reshape(-1).tolist()
    overlays = sorted((tmp_path / "out" / "overlays").rglob("*_overlay.png"))
    assert len(overlays) == len(images)
    assert Image.open(overlays[0]).size == (SIZE, SIZE)
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == len(images) + 1


def test_dynamic_export_without_resize_names_working_sizes(tmp_path: Path) -> None:
    """Without a Resize the graph sees raw sizes: dynamic export and unsuitable fixed sizes fail clearly."""
    model = Aand(
        backbone="resnet18",
        pre_trained=False,
        stage1_epochs=0,
        stage2_epochs=1,
        pre_processor=_pre_processor(resize=False),
    )
    with pytest.raises(ValueError, match=r"multiples of 32 \(e\.g\. 64, 128, 256\).*--input_size"):
        model.to_onnx(tmp_path)
    with pytest.raises(ValueError, match=r"100x100.*multiples of 32"):
        model.to_onnx(tmp_path, input_size=(100, 100))
    assert not list(tmp_path.rglob("*.onnx"))


def test_int8_acq_with_a_metric_name_or_bad_max_drop_fails_before_writing(tmp_path: Path) -> None:
    """``anomalib export --metric AUROC`` hands over a bare name: a clear error, and no IR is written."""
    from anomalib.deploy import CompressionType
    from anomalib.metrics import AUROC

    model = Aand(backbone="resnet18", pre_trained=False, stage1_epochs=0, stage2_epochs=1)
    with pytest.raises(TypeError, match=r"--metric anomalib\.metrics\.AUROC --metric\.fields"):
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_ACQ, metric="AUROC")
    with pytest.raises(ValueError, match=r"max_drop must be between 0 and 1"):
        model.to_openvino(
            tmp_path, compression_type=CompressionType.INT8_ACQ, metric=AUROC(fields=["pred_score"]), max_drop=5.0
        )
    assert not list(tmp_path.rglob("*.xml"))
