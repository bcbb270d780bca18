"""INT8 export: ``Engine.export(..., compression_type=INT8_PTQ)`` (what ``anomalib export`` runs) keeps the ranking.

The session's small model (``lite0_trained``: the offline ImageNet EfficientNet-Lite0 teacher, 64 px, 16
training images, 1 + 5 epochs) is exported as an FP32 and an INT8 OpenVINO IR; INT8 is calibrated on training
images (a datamodule with ``val_split_mode=from_train``, as docs/export.md documents). On the 8 good and 8
defective test images (dark squares; the split that fixed the normalisation bounds, so no score is clamped) the
INT8 scores must rank images and pixels as the FP32 ones do. With NNCF's defaults (anomalib 2.7's plain
``nncf.quantize``) every INT8 score of this model is 0.0: image AUROC 0.5 against FP32's 1.0.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode, read_image, read_mask
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from anomalib.metrics import AUROC
from conftest import EXPORT_SIZE
from torchmetrics.classification import BinaryAUROC

from anomalib_aand import Aand, lightning_model
from anomalib_aand.int8 import quantize_openvino_ir

pytestmark = pytest.mark.slow  # every test here uses the trained model's INT8 exports

SIZE = EXPORT_SIZE
# One image pair swapped of 8 x 8 moves image AUROC by 1/64 = 0.016: allow three swaps. Pixel AUROC is
# computed over ~65k pixels, so it has to stay much closer.
IMAGE_AUROC_TOLERANCE = 0.05
PIXEL_AUROC_TOLERANCE = 0.02
# INT8_ACQ validates on the test split (as anomalib 2.7 does), so its image AUROC there is bounded by max_drop.
ACQ_MAX_DROP = 0.01


def calibration_data(root: Path) -> MVTecAD:
    """Calibration on training images (``val_split_mode=from_train``), as docs/export.md documents."""
    return MVTecAD(
        root=root,
        category="toy",
        eval_batch_size=4,
        num_workers=0,
        val_split_mode=ValSplitMode.FROM_TRAIN,
        val_split_ratio=0.5,
    )


@pytest.fixture(scope="module")
def irs(lite0_trained: dict) -> dict[str, Path]:
    """FP32, INT8_PTQ and INT8_ACQ IRs of the session's Lite0 model, and its dataset folder.

    ``Engine.export`` writes the FP32 IR (dynamic input size, as ``anomalib export`` does by default); the INT8
    IRs are that IR quantised by ``quantize_openvino_ir``, the call ``Aand.to_openvino`` makes for ``INT8_PTQ``
    and ``INT8_ACQ`` after writing the same FP32 IR (``test_engine_export_quantises_with_aands_recipe`` checks
    that call), so the model is exported once instead of three times.
    """
    root = lite0_trained["root"]
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    fp32 = engine.export(
        Aand(backbone="tf_efficientnet_lite0", layers=("blocks.1", "blocks.2", "blocks.4")),
        ExportType.OPENVINO,
        export_root=root / "fp32",
        ckpt_path=lite0_trained["checkpoint"],
    )
    irs = {"root": root / "toy", "fp32": Path(fp32)}
    for name, accuracy_control in (("int8", None), ("int8_acq", AUROC(fields=["pred_score", "gt_label"]))):
        xml = root / name / "model.xml"
        xml.parent.mkdir()
        shutil.copy(irs["fp32"], xml)
        shutil.copy(irs["fp32"].with_suffix(".bin"), xml.with_suffix(".bin"))
        irs[name] = quantize_openvino_ir(xml, calibration_data(root), accuracy_control, max_drop=ACQ_MAX_DROP)
    return irs


@pytest.mark.parametrize("compression", [CompressionType.INT8_PTQ, CompressionType.INT8_ACQ])
def test_engine_export_quantises_with_aands_recipe(
    compression: CompressionType,
    exported: tuple[Aand, Path],
    mvtec_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Engine.export(..., compression_type=INT8_*)`` hands the FP32 IR it wrote, the calibration data and, for
    ``INT8_ACQ``, the metric and ``max_drop`` to ``quantize_openvino_ir`` (recorded here instead of run: the
    quantisation itself is tested on the Lite0 model above) and returns what that returns."""
    calls = []

    def recorded(xml: Path, datamodule: MVTecAD, accuracy_control=None, max_drop: float = 0.01) -> Path:
        calls.append({"xml": xml, "datamodule": datamodule, "accuracy_control": accuracy_control, "max_drop": max_drop})
        return xml

    monkeypatch.setattr(lightning_model, "quantize_openvino_ir", recorded)
    calibration = calibration_data(mvtec_root)
    metric = AUROC(fields=["pred_score", "gt_label"])
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    xml = engine.export(
        exported[0],
        ExportType.OPENVINO,
        export_root=tmp_path,
        input_size=(EXPORT_SIZE, EXPORT_SIZE),  # a fixed size exports faster; the dynamic graph is tested above
        compression_type=compression,
        datamodule=calibration,
        metric=metric,
        max_drop=0.5,
    )
    (call,) = calls
    assert Path(xml) == call["xml"]
    assert call["xml"].is_file()
    assert call["datamodule"] is calibration
    if compression == CompressionType.INT8_ACQ:
        assert call["accuracy_control"] is metric
        assert call["max_drop"] == 0.5
    else:
        assert call["accuracy_control"] is None


def _predict(xml: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = [compiled(image[None]) for image in images]
    return np.concatenate([o["pred_score"].reshape(-1) for o in outputs]), np.concatenate(
        [o["anomaly_map"] for o in outputs]
    )


def _auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    return float(BinaryAUROC()(torch.as_tensor(scores).flatten(), torch.as_tensor(targets).flatten().long()))


def test_int8_export_keeps_fp32_ranking(irs: dict[str, Path]) -> None:
    """INT8 image and pixel AUROC stay within tolerance of FP32's, and the IR is quantised (has FakeQuantize)."""
    import openvino as ov

    base = irs["root"]
    paths = sorted((base / "test").rglob("*.png"))
    images = np.stack([read_image(p, as_tensor=True).numpy() for p in paths])
    labels = np.asarray([p.parent.name != "good" for p in paths])
    masks = np.stack(
        [
            read_mask(base / "ground_truth/spot" / f"{p.stem}_mask.png", as_tensor=True).numpy() > 0
            if p.parent.name != "good"
            else np.zeros((SIZE, SIZE), bool)
            for p in paths
        ]
    )
    fp32_scores, fp32_maps = _predict(irs["fp32"], images)
    int8_scores, int8_maps = _predict(irs["int8"], images)
    fp32_auroc = _auroc(fp32_scores, labels)
    assert fp32_auroc >= 0.8, "the FP32 model must separate the defects for this test to mean anything"
    assert abs(_auroc(int8_scores, labels) - fp32_auroc) <= IMAGE_AUROC_TOLERANCE
    assert abs(_auroc(int8_maps, masks) - _auroc(fp32_maps, masks)) <= PIXEL_AUROC_TOLERANCE
    ops = {op.get_type_name() for op in ov.Core().read_model(irs["int8"]).get_ops()}
    assert "FakeQuantize" in ops


def test_int8_keeps_depthwise_and_early_fine_convolutions_in_float(irs: dict[str, Path]) -> None:
    """Depthwise convolutions and the teacher's stem stay in float; the student's last convolution at the finest
    scale (Lite0 blocks.1: stride 4) and most convolutions of the coarser scales are quantised."""
    import openvino as ov

    def quantised(op: "ov.Node") -> bool:  # its input activations pass a FakeQuantize (weights are input 1)
        return op.input_value(0).get_node().get_type_name() == "FakeQuantize"

    def size(op: "ov.Node") -> int:
        shape = op.get_output_partial_shape(0)
        return shape[2].get_length() * shape[3].get_length()

    finest = (SIZE // 4) ** 2
    ops = ov.Core().read_model(irs["int8"]).get_ordered_ops()
    depthwise = [op for op in ops if op.get_type_name() == "GroupConvolution"]
    convolutions = [op for op in ops if op.get_type_name() == "Convolution" and op.get_output_partial_shape(0)[1] != 1]
    stem = convolutions[0]  # ordered: the first reads the pre-processed image
    student_last = [op for op in convolutions if size(op) == finest][-1]
    coarse = [op for op in convolutions if size(op) < finest]
    assert depthwise, "Lite0 has depthwise convolutions"
    assert stem.input_value(1).get_partial_shape()[1] == 3, "the stem reads RGB"
    assert not any(quantised(op) for op in [*depthwise, stem])
    assert quantised(student_last)
    assert sum(quantised(op) for op in coarse) > len(coarse) // 2


def test_int8_acq_stays_within_max_drop_on_its_validation_split(irs: dict[str, Path]) -> None:
    """``INT8_ACQ`` (AAND's recipe under NNCF's accuracy control, image AUROC, ``max_drop`` 0.01) keeps image
    AUROC on the test split within 0.01 of FP32's and leaves most convolutions quantised."""
    import openvino as ov

    base = irs["root"]
    paths = sorted((base / "test").rglob("*.png"))
    images = np.stack([read_image(p, as_tensor=True).numpy() for p in paths])
    labels = np.asarray([p.parent.name != "good" for p in paths])
    fp32_auroc = _auroc(_predict(irs["fp32"], images)[0], labels)
    assert fp32_auroc - _auroc(_predict(irs["int8_acq"], images)[0], labels) <= ACQ_MAX_DROP + 1e-6
    ops = ov.Core().read_model(irs["int8_acq"]).get_ordered_ops()
    convolutions = [op for op in ops if op.get_type_name() == "Convolution"]
    quantised = [op for op in convolutions if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    assert len(quantised) > len(convolutions) // 3
