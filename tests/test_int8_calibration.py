"""INT8 calibration data (normal batches, each with an anomalous copy) and the output clamp (anomalib_aand.int8)."""

from pathlib import Path

import numpy as np
import torch

from anomalib_aand.int8 import SyntheticAnomalyCalibration


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(4, 3, 32, 32, generator=generator) * 0.2 + 0.4 for _ in range(3)]


def test_calibration_adds_an_anomalous_copy_of_every_image() -> None:
    """Each normal batch comes unchanged, then its copy, which differs in part of each image; pixels in [0, 1]."""
    batches = _batches()
    calibration = list(
        SyntheticAnomalyCalibration([{"image": b} for b in batches], transform=lambda item: item["image"])
    )
    assert len(calibration) == 2 * len(batches)
    for normal, given, anomalous in zip(calibration[0::2], batches, calibration[1::2], strict=True):
        assert torch.equal(normal, given)
        changed = (anomalous - given).abs().amax(dim=1) > 1e-3  # (B, H, W)
        assert changed.flatten(1).any(dim=1).all(), "every copy has an anomaly"
        assert changed.float().mean() < 0.9, "an anomaly covers part of the image, not all of it"
        assert anomalous.min() >= 0
        assert anomalous.max() <= 1


def test_calibration_repeats_across_passes_and_leaves_the_random_state_alone() -> None:
    """Two passes (NNCF makes several) give the same anomalies; the caller's torch random sequence is not moved."""
    calibration = SyntheticAnomalyCalibration(_batches())
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    first = list(calibration)
    after = torch.rand(5)
    second = list(calibration)
    assert torch.equal(after, expected)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_normalised_outputs_are_clamped_to_the_unit_range_and_keep_their_names() -> None:
    """Scores a float step above 1.0 (what the CPU plugin gave INT8 IRs) come out as 1.0; other outputs untouched."""
    import openvino as ov
    from openvino import opset13

    from anomalib_aand.int8 import clamp_normalised_outputs

    image = opset13.parameter([2], np.float32, name="input")
    outputs = {name: opset13.multiply(image, np.float32(1.0), name=name) for name in ("pred_score", "pred_label")}
    model = ov.Model(
        [opset13.result(node, name=f"{name}/sink_port_0") for name, node in outputs.items()], [image], "toy"
    )
    for name, output in zip(outputs, model.outputs, strict=True):
        output.get_tensor().set_names({name})
    compiled = ov.Core().compile_model(clamp_normalised_outputs(model), "CPU")
    values = np.asarray([np.nextafter(np.float32(1), np.float32(2)), np.float32(-1e-7)], np.float32)
    result = compiled(values)
    assert [output.get_any_name() for output in compiled.outputs] == ["pred_score", "pred_label"]
    np.testing.assert_array_equal(result["pred_score"], [1.0, 0.0])
    np.testing.assert_array_equal(result["pred_label"], values)


def test_recipe_keeps_the_map_tail_and_the_early_finest_convolutions_in_float(openvino_ir: Path) -> None:
    """On the smoke model's FP32 IR (ResNet-18, 64 px): the float scope holds the ops after the last feature maps
    (no convolution with more than one output channel) and convolutions at or above the finest scale (stride 4)."""
    import openvino as ov

    from anomalib_aand.int8 import fine_convolutions, float_scope, float_tail

    model = ov.Core().read_model(openvino_ir)
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    tail = float_tail(model)
    assert tail
    convolutions = [ops[name] for name in tail if ops[name].get_type_name() == "Convolution"]
    assert all(op.get_output_partial_shape(0)[1] == 1 for op in convolutions)  # only the single-channel blur
    assert {"Multiply", "ReduceSum"} & {ops[name].get_type_name() for name in tail}  # the cosine distance
    fine = fine_convolutions(model, tail)
    assert fine
    assert all(ops[name].get_output_partial_shape(0)[2].get_length() >= 64 // 4 for name in fine)
    scope = float_scope(model)
    assert set(tail + fine) <= set(scope.names)
    assert "GroupConvolution" in scope.types
