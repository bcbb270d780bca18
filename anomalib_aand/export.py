"""INT8 post-training quantisation of AAND's OpenVINO IR (NNCF), keeping the anomaly map in float.

AAND's anomaly signal is ``1 - cos`` between the amplified teacher features and the student's reconstruction.
NNCF's defaults (what anomalib 2.7's ``INT8_PTQ`` runs, NNCF 3.4) also quantise the element-wise products,
sums and the Gaussian blur that compute the map from the features. Their ranges come from calibration images,
which are all normal, so defective values are clipped at the normal maximum and every score falls below the
FP32 threshold baked into the graph; the quantised products also blur the finest scale's distance
(``benchmarks/int8_stages.py`` shows it stage by stage). This recipe quantises the convolutions of teacher,
RAA and student as NNCF does, and leaves every operation after the last feature maps in float: the cosine
distance, the upsampling, the blur and anomalib's normalisation. It also leaves depthwise convolutions
(``GroupConvolution``: EfficientNet's and MobileNet's, none in ResNets) in float. Quantised, they cost the
demo's gravel model 0.065 image AUROC and 0.117 AUPRO against FP32 (mean of three calibration splits); in
float -0.003 and 0.006 (``benchmarks/int8_recipes.py``). A depthwise convolution filters each channel alone,
so one per-tensor 8-bit range on its input serves channels of very different scales: the known weak spot of
quantised depthwise networks (not profiled channel by channel here).
"""

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule

Recipe = Literal["anomalib", "aand"]
WEIGHTED_OPS = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}
SKIPPED_OPS = {"Parameter", "Constant", "Result"}
FLOAT_TYPES = ["GroupConvolution"]  # depthwise convolutions stay in float (module docstring)


def _is_narrow(op: "ov.Node") -> bool:
    """Whether every output is a score, a shape, or a single-channel map (not a feature map)."""
    for output in op.outputs():
        shape = output.get_partial_shape()
        if (
            shape.rank.is_static
            and shape.rank.get_length() == 4
            and not (shape[1].is_static and shape[1].get_length() == 1)
        ):
            return False
    return True


def float_tail(model: "ov.Model") -> list[str]:
    """Names of the operations that turn the last feature maps into the outputs (map, score, post-processing).

    Walking back from the outputs, an operation belongs to the tail when all its consumers do and it either
    has no weights (products, sums, norms, interpolation, normalisation) or only single-channel outputs
    (the Gaussian blur). The walk stops at the convolutions that produce the feature maps.
    """
    tail: set[str] = set()
    for op in reversed(model.get_ordered_ops()):
        if op.get_type_name() == "Result":
            tail.add(op.get_friendly_name())
            continue
        if op.get_type_name() in SKIPPED_OPS:
            continue
        consumers = [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]
        if (
            consumers
            and all(c.get_friendly_name() in tail for c in consumers)
            and (op.get_type_name() not in WEIGHTED_OPS or _is_narrow(op))
        ):
            tail.add(op.get_friendly_name())
    return sorted(name for name in tail if name not in {r.get_friendly_name() for r in model.get_results()})


def quantize(
    model: "ov.Model",
    calibration: Iterable[Any],
    recipe: Recipe = "aand",
    transform: Any = None,  # noqa: ANN401
) -> "ov.Model":
    """Quantise an OpenVINO ``model`` of AAND's exported chain with NNCF.

    Args:
        model: FP32 ``openvino.Model``.
        calibration: Calibration items (a DataLoader or a list of arrays), normal images only.
        recipe: ``"aand"``: this package's recipe (float tail and depthwise convolutions, see the module
            docstring); ``"anomalib"``: NNCF's defaults, what anomalib 2.7's ``INT8_PTQ`` runs.
        transform: ``nncf.Dataset``'s ``transform_func`` (e.g. ``lambda batch: batch["image"]``).
    """
    import nncf

    dataset = nncf.Dataset(calibration, transform)
    if recipe == "anomalib":
        return nncf.quantize(model, dataset)
    ignored = nncf.IgnoredScope(names=float_tail(model), types=FLOAT_TYPES, validate=False)
    return nncf.quantize(model, dataset, ignored_scope=ignored)


def quantize_openvino_ir(xml: Path, datamodule: "AnomalibDataModule | None") -> Path:
    """Replace the FP32 IR at ``xml`` by its INT8 version, calibrated on ``datamodule``'s validation split.

    The calibration data is anomalib's ``INT8_PTQ`` choice (anomalib 2.7 ``_post_training_quantization_ov``):
    the validation loader's images.
    """
    import openvino as ov

    if datamodule is None:
        msg = (
            "INT8_PTQ needs calibration images: pass a datamodule (`--data ...`), with "
            "`--data.val_split_mode from_train` so that it calibrates on training images."
        )
        raise ValueError(msg)
    datamodule.setup("fit")
    model = ov.Core().read_model(xml)
    quantized = quantize(model, datamodule.val_dataloader(), transform=lambda batch: batch["image"])
    staging = xml.with_name(xml.stem + ".int8.xml")
    ov.save_model(quantized, staging, compress_to_fp16=False)
    staging.replace(xml)
    staging.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    return xml
