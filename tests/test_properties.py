"""Property tests of the torch model: any batch size, accepted image size and value range.

The eval-mode ``AandModel`` must return a finite anomaly map of the input's size and an image score
equal to the map's maximum.
"""

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomalib_aand import AandModel

STRIDE = 32  # resnet18 layer1..layer3: the student needs multiples of twice the coarsest reduction (16)


@cache
def model(amplification: bool) -> AandModel:
    torch.manual_seed(0)
    return AandModel("resnet18", ("layer1", "layer2", "layer3"), 50, 0.2, amplification=amplification).eval()


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 2).map(lambda k: STRIDE * k),
    width=st.integers(1, 3).map(lambda k: STRIDE * k),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]),
    offset=st.floats(-5.0, 5.0),
    amplification=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_map_is_finite_sized_and_bounds_the_score(
    batch: int,
    height: int,
    width: int,
    scale: float,
    offset: float,
    amplification: bool,
    seed: int,
) -> None:
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * scale + offset
    with torch.no_grad():
        output = model(amplification=amplification)(images)
    assert output.anomaly_map.shape == (batch, 1, height, width)
    assert torch.isfinite(output.anomaly_map).all()
    assert output.pred_score.shape[0] == batch
    torch.testing.assert_close(output.pred_score.flatten(), output.anomaly_map.flatten(1).amax(dim=1))


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_images_give_finite_maps(value: float) -> None:
    """Flat images (all-zero features after ReLU are possible) must not produce NaN from the cosine."""
    with torch.no_grad():
        output = model(amplification=True)(torch.full((2, 3, STRIDE, STRIDE), value))
    assert torch.isfinite(output.anomaly_map).all()
    torch.testing.assert_close(output.pred_score.flatten(), output.anomaly_map.flatten(1).amax(dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amplification", [True, False])
def test_half_precision_map_follows_float32(dtype: torch.dtype, amplification: bool) -> None:
    """``model.to(dtype)`` on input of that dtype runs (the RAA positional encoding follows the input dtype)
    and gives float32's map within 4 machine epsilons of the dtype (bf16 0.031, fp16 0.0039).

    Why 4 eps: the map is the sum over 3 scales of ``1 - cos``; a cosine of features that carry a relative
    rounding error of about eps is off by about eps, so the sum by about 3 eps (measured on CPU, torch 2.14:
    bf16 up to 1.2 eps, fp16 up to 2 eps; both conv kernels exist on CPU).
    """
    reference = model(amplification)
    images = torch.rand(2, 3, STRIDE * 2, STRIDE * 3, generator=torch.Generator().manual_seed(0))
    half = AandModel("resnet18", ("layer1", "layer2", "layer3"), 50, 0.2, amplification=amplification).eval()
    half.load_state_dict(reference.state_dict())
    half = half.to(dtype)
    with torch.no_grad():
        expected, output = reference(images), half(images.to(dtype))
    assert output.anomaly_map.dtype == output.pred_score.dtype == dtype
    tolerance = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(output.anomaly_map.float(), expected.anomaly_map, atol=tolerance, rtol=0)
    torch.testing.assert_close(output.pred_score.float(), expected.pred_score, atol=tolerance, rtol=0)
