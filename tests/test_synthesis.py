"""Stage-1 synthesis: anomalies where the mask says, in the pre-processor's normalised space."""

import torch

from anomalib_aand.components.synthesis import AnomalySynthesizer, ForegroundEstimator

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def test_synthesis_changes_only_masked_pixels() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 64, 64) * 0.5 + 0.25
    synthesizer = AnomalySynthesizer(probability=1.0, mean=MEAN, std=STD)
    augmented, mask, foreground = synthesizer(_normalise(pixels))
    assert mask.shape == (3, 1, 64, 64)
    assert foreground.shape == mask.shape
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(1) > 0).all()  # probability 1: every image has an anomaly
    changed = (augmented - _normalise(pixels)).abs().amax(dim=1, keepdim=True) > 1e-5
    assert not (changed & (mask == 0)).any()
    assert torch.equal(foreground, torch.ones_like(mask))


def test_synthesis_probability_zero_is_identity() -> None:
    images = _normalise(torch.rand(2, 3, 32, 32))
    augmented, mask, _ = AnomalySynthesizer(probability=0.0, mean=MEAN, std=STD)(images)
    assert mask.sum() == 0
    assert torch.allclose(augmented, images, atol=1e-5)


def test_foreground_estimator_finds_object_and_falls_back_on_textures() -> None:
    image = torch.full((1, 3, 96, 96), 0.1)
    image[..., 24:72, 24:72] = 0.8  # bright object on a dark background
    mask = ForegroundEstimator()(image)
    assert mask[0, 0, 48, 48] == 1
    assert mask[0, 0, 2, 2] == 0
    assert 0.15 < mask.mean() < 0.45
    flat = ForegroundEstimator()(torch.full((1, 3, 64, 64), 0.5))
    assert torch.equal(flat, torch.ones_like(flat))


def test_foreground_masking_keeps_anomalies_on_the_object() -> None:
    torch.manual_seed(1)
    pixels = torch.full((4, 3, 96, 96), 0.1)
    pixels[..., 24:72, 24:72] = 0.8
    synthesizer = AnomalySynthesizer(probability=1.0, foreground_mask=True, mean=MEAN, std=STD)
    augmented, mask, foreground = synthesizer(_normalise(pixels))
    assert not (mask * (1 - foreground)).any()
    background = (foreground == 0).expand_as(augmented)
    assert torch.allclose(augmented[background], _normalise(pixels)[background], atol=1e-5)
