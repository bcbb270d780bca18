"""INT8 post-training quantisation of AAND's OpenVINO IR (NNCF), keeping the anomaly map in float.

AAND's anomaly signal is ``1 - cos`` between the amplified teacher features and the student's reconstruction.
NNCF's defaults (what anomalib 2.7's ``INT8_PTQ`` runs, NNCF 3.4) also quantise the element-wise products,
sums and the Gaussian blur that compute the map from the features. Their ranges come from calibration images,
which are all normal, so defective values are clipped at the normal maximum and every score falls below the
FP32 threshold baked into the graph; the quantised products also blur the finest scale's distance. This recipe
quantises the convolutions of teacher, RAA and student as NNCF does, with three exceptions measured on the demo
categories (three calibration splits each; the tables are in docs/export.md):

- everything after the last feature maps stays in float: the cosine distance, the upsampling, the blur and
  anomalib's normalisation;
- depthwise convolutions (``GroupConvolution``: EfficientNet's and MobileNet's, none in ResNets) stay in float.
  Quantised, they cost the demo's gravel model 0.065 image AUROC (one per-tensor 8-bit range on the input of
  a filter that treats each channel alone);
- convolutions at the finest feature scale's resolution or above that coarser scales depend on (the teacher's
  early blocks and the finest RAA) stay in float. There the defect signal is a small angle between two large
  feature vectors, 8-bit noise on both is of the same size, and it reaches every scale and both sides of the
  cosine: quantised, they move the good images' scores by half the spread of those scores (by a fifth with
  them in float) and cost grass 0.019 image AUROC on average. The student's last convolutions, which feed only
  the finest map, are quantised (with them in float instead, grass still lost 0.019).

The calibration images are the given (normal) ones, each followed by a copy with a synthetic anomaly from
AAND's stage-1 synthesizer (NNCF's default subset: the first 300 images of that sequence), so the activation
ranges also cover anomalous features; calibrated on normal images alone, the ranges clip defective features
inside the network and screw lost 0.024 pixel AUROC.

``INT8_ACQ`` starts from this recipe and runs NNCF's accuracy control on the datamodule's test split (anomalib's
choice of validation data), with anomalib's metric and ``max_drop``: the quantised operations that cost most on
that metric go back to float until the drop is within ``max_drop``.
"""

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .components.errors import AandInputError
from .components.synthesis import AnomalySynthesizer

if TYPE_CHECKING:
    import nncf
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from torchmetrics import Metric

WEIGHTED_OPS = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}
SKIPPED_OPS = {"Parameter", "Constant", "Result"}
FLOAT_TYPES = ["GroupConvolution"]  # depthwise convolutions stay in float (module docstring)
CONVOLUTIONS = {"Convolution", "GroupConvolution"}

logger = logging.getLogger(__name__)


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


def _spatial_size(output: "ov.Output") -> int | None:
    """Height x width of a static NCHW output, else ``None``."""
    shape = output.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or not (shape[2].is_static and shape[3].is_static):
        return None
    return shape[2].get_length() * shape[3].get_length()


def _ancestors(ops: Iterable["ov.Node"]) -> set[str]:
    """Names of every operation that ``ops`` depend on."""
    seen: set[str] = set()
    stack = list(ops)
    while stack:
        for value in stack.pop().input_values():
            node = value.get_node()
            if node.get_friendly_name() not in seen:
                seen.add(node.get_friendly_name())
                stack.append(node)
    return seen


def fine_convolutions(model: "ov.Model", tail: Iterable[str]) -> list[str]:
    """Names of the convolutions at the finest feature scale's resolution or above that coarser scales depend on.

    The finest feature map is the largest (height x width) output of an operation outside the tail that the
    tail consumes. The convolutions kept are the teacher's early blocks and the finest RAA (the student's
    bottleneck reads every scale); the student's own last convolutions, which feed only the finest map, are not.
    A graph without static feature sizes (no Resize in its pre-processing) gives none.
    """
    tail = set(tail)
    inputs = [
        size
        for op in model.get_ordered_ops()
        if op.get_friendly_name() not in tail and not _is_narrow(op)
        for output in op.outputs()
        if any(t.get_node().get_friendly_name() in tail for t in output.get_target_inputs())
        and (size := _spatial_size(output)) is not None
    ]
    if not inputs:
        logger.warning("INT8: feature sizes are not static; the finest-scale convolutions are quantised too")
        return []
    finest = max(inputs)
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() in CONVOLUTIONS]
    coarser = _ancestors(op for op in convolutions if (_spatial_size(op.output(0)) or finest) < finest)
    return [
        op.get_friendly_name()
        for op in convolutions
        if (_spatial_size(op.output(0)) or 0) >= finest and op.get_friendly_name() in coarser
    ]


def float_scope(model: "ov.Model") -> "nncf.IgnoredScope":
    """What AAND's recipe keeps in float: the tail, the finest-scale convolutions and depthwise convolutions."""
    import nncf

    tail = float_tail(model)
    return nncf.IgnoredScope(names=tail + fine_convolutions(model, tail), types=FLOAT_TYPES, validate=False)


class SyntheticAnomalyCalibration:
    """Calibration batches (images in [0, 1], NCHW), each followed by a copy with a synthetic anomaly.

    The anomalies are those of AAND's stage 1 (:class:`AnomalySynthesizer`, noise blended into Perlin regions),
    drawn with ``seed`` plus the batch's index without touching the caller's random state, so every pass
    (NNCF iterates more than once) gives the same set. Iterable again and again when ``calibration`` is (a
    DataLoader or a list); one batch is held at a time.
    """

    def __init__(
        self, calibration: Iterable[Any], transform: Callable[[Any], Any] | None = None, seed: int = 0
    ) -> None:
        self.calibration = calibration
        self.transform = transform
        self.seed = seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Normal batch, anomalous copy, next normal batch, ..."""
        for index, item in enumerate(self.calibration):
            batch = torch.as_tensor(self.transform(item) if self.transform else item, dtype=torch.float32)
            yield batch
            with torch.random.fork_rng():
                torch.manual_seed(self.seed + index)
                anomalous = AnomalySynthesizer(probability=1.0)(batch)[0]
            yield anomalous


def quantize(
    model: "ov.Model",
    calibration: Iterable[Any],
    transform: Callable[[Any], Any] | None = None,
) -> "ov.Model":
    """Quantise an OpenVINO ``model`` of AAND's exported chain with NNCF, with AAND's recipe (module docstring).

    Args:
        model: FP32 ``openvino.Model``.
        calibration: Calibration items (a DataLoader or a list of arrays), normal images only; each is followed by
            a copy with a synthetic anomaly.
        transform: ``nncf.Dataset``'s ``transform_func`` (e.g. ``lambda batch: batch["image"]``).
    """
    import nncf

    dataset = nncf.Dataset(SyntheticAnomalyCalibration(calibration, transform))
    return nncf.quantize(model, dataset, ignored_scope=float_scope(model))


def metric_validation(metric: "Metric") -> Callable[[Any, Iterable[Any]], float]:
    """NNCF ``validation_fn``: ``metric`` of a compiled IR over anomalib batches, computed afresh at each call.

    The batch fields are those anomalib 2.7's ``INT8_ACQ`` gives its metric (``_accuracy_control_quantization_ov``:
    scores, labels, maps and masks), but the metric is reset before each validation: anomalib's accumulates over
    NNCF's repeated calls, so every later model is judged with the earlier ones' predictions mixed in.
    """
    from anomalib.data import ImageBatch

    def validate(compiled: Any, batches: Iterable[Any]) -> float:  # noqa: ANN401
        metric.reset()
        for batch in batches:
            outputs = compiled(batch.image)
            metric.update(
                ImageBatch(
                    image=batch.image,
                    pred_score=torch.from_numpy(outputs["pred_score"]).reshape(-1),
                    pred_label=torch.from_numpy(outputs["pred_label"]).reshape(-1),
                    gt_label=batch.gt_label,
                    anomaly_map=torch.from_numpy(outputs["anomaly_map"]) if "anomaly_map" in outputs else None,
                    pred_mask=torch.from_numpy(outputs["pred_mask"]) if "pred_mask" in outputs else None,
                    gt_mask=batch.gt_mask[:, None] if batch.gt_mask is not None else None,
                )
            )
        return float(metric.compute())

    return validate


def quantize_with_accuracy_control(
    model: "ov.Model",
    calibration: Iterable[Any],
    validation: Iterable[Any],
    validate: Callable[[Any, Iterable[Any]], float],
    max_drop: float = 0.01,
    transform: Callable[[Any], Any] | None = None,
) -> "ov.Model":
    """AAND's recipe (:func:`quantize`), then NNCF's accuracy control on ``validation``.

    While ``validate`` falls more than ``max_drop`` below the FP32 model's value, the quantised operations that
    cost most go back to float.
    """
    import nncf

    return nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(SyntheticAnomalyCalibration(calibration, transform)),
        nncf.Dataset(validation),
        validate,
        max_drop=max_drop,
        ignored_scope=float_scope(model),
    )


def accuracy_control_metric(metric: "Metric | str | None", max_drop: float) -> "Metric":
    """The metric ``INT8_ACQ`` validates with (anomalib 2.7's default: image F1 score), once its inputs are checked.

    ``anomalib export --metric NAME`` passes a bare name, which anomalib would only fail on mid-quantisation.
    """
    from anomalib.metrics import F1Score
    from torchmetrics import Metric

    if not isinstance(metric, Metric | None):
        msg = (
            f"INT8_ACQ needs a metric object, got {metric!r}: on the command line pass "
            "`--metric anomalib.metrics.AUROC --metric.fields '[pred_score, gt_label]'`, in Python "
            "`metric=AUROC(fields=['pred_score', 'gt_label'])`; without one it uses image F1 score."
        )
        raise TypeError(msg)
    if not 0 <= max_drop <= 1:
        msg = f"max_drop must be between 0 and 1 (an absolute drop of the metric), got {max_drop}"
        raise ValueError(msg)
    return metric or F1Score(fields=["pred_label", "gt_label"])


def clamp_normalised_outputs(model: "ov.Model") -> "ov.Model":
    """End ``pred_score`` and ``anomaly_map`` with a clamp to [0, 1], the range anomalib's normalisation promises.

    Workaround: the OpenVINO 2026.4 CPU plugin runs the float tail of an INT8 IR so that clamped normalised
    scores come out up to one float32 step above 1.0 (1.0000001; the FP32 IR gives 1.0). torchmetrics 1.x's
    binary metrics, which anomalib's wrap, take a batch with any value outside [0, 1] for logits and pass the
    whole batch through a sigmoid, so a metric updated batch by batch (anomalib's ``INT8_ACQ`` validation, an
    evaluation of the IR's outputs) mixes two scales. Added before quantisation, the clamp stays in the float
    tail and runs last.
    """
    from openvino import opset13

    for result in model.get_results():
        if result.get_friendly_name().split("/")[0] in {"pred_score", "anomaly_map"}:
            clamp = opset13.clamp(result.input_value(0), 0.0, 1.0)
            result.input(0).replace_source_output(clamp.output(0))
    model.validate_nodes_and_infer_types()
    return model


def check_calibration_data(datamodule: "AnomalibDataModule | None") -> None:
    """Refuse INT8 quantisation without calibration images; call it before anything is exported.

    The message keeps anomalib 2.7's phrase ("Datamodule must be provided"), which its own tests match.
    """
    if datamodule is None:
        msg = (
            "Datamodule must be provided for INT8 quantisation: it calibrates on the datamodule's images. Pass one "
            "(`anomalib export ... --data <datamodule> --data.val_split_mode from_train`, so that it calibrates on "
            "training images; Python: `datamodule=...`)."
        )
        raise AandInputError(msg)


def quantize_openvino_ir(
    xml: Path,
    datamodule: "AnomalibDataModule | None",
    accuracy_control: "Metric | None" = None,
    max_drop: float = 0.01,
) -> Path:
    """Replace the FP32 IR at ``xml`` by its INT8 version, calibrated on ``datamodule``'s validation split.

    The calibration data is anomalib's choice for ``INT8_PTQ`` and ``INT8_ACQ`` (anomalib 2.7
    ``_post_training_quantization_ov``): the validation loader's images. With ``accuracy_control`` (a metric, for
    ``INT8_ACQ``) the model is validated, as anomalib does, on the test loader, and loses at most ``max_drop``
    of that metric there.
    """
    import openvino as ov

    check_calibration_data(datamodule)
    datamodule.setup("fit")
    model = clamp_normalised_outputs(ov.Core().read_model(xml))
    images = datamodule.val_dataloader()
    if accuracy_control is None:
        quantized = quantize(model, images, transform=lambda batch: batch["image"])
    else:  # setup("fit") built the test split too (anomalib's datamodules build every split at once)
        validate = metric_validation(accuracy_control)
        quantized = quantize_with_accuracy_control(
            model, images, datamodule.test_dataloader(), validate, max_drop, transform=lambda batch: batch["image"]
        )
    staging = xml.with_name(xml.stem + ".int8.xml")
    ov.save_model(quantized, staging, compress_to_fp16=False)
    staging.replace(xml)
    staging.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    return xml
