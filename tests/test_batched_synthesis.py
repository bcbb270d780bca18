"""Stage-1 work without host reads: batched Perlin masks, bincount Otsu, sampling without ``torch.nonzero``."""

import pytest
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

from anomalib_aand.components.synthesis import drop_synthesizer_state, otsu_thresholds, perlin_noise, rotate
from anomalib_aand.loss import sample_positions


def _otsu_with_histc(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of one image from ``torch.histc`` (the reference; CPU only in half precision)."""
    histogram = torch.histc(values, bins=bins, min=0.0, max=1.0)
    probability = histogram / histogram.sum().clamp_min(1)
    centres = (torch.arange(bins, dtype=values.dtype) + 0.5) / bins
    weight_low = torch.cumsum(probability, 0)
    mean_low = torch.cumsum(probability * centres, 0)
    between = (mean_low[-1] * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    return centres[int(torch.argmax(between))]


def test_otsu_thresholds_match_a_histc_histogram() -> None:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 4096)
    rows = [
        torch.rand(4096, generator=generator),
        torch.cat([torch.full((3000,), 0.2), torch.full((1096,), 0.7)]),
        (ramp**3),
        (torch.randn(4096, generator=generator) * 0.1 + 0.5).clamp(0, 1),
        torch.cat([torch.rand(2048, generator=generator) * 0.3, 0.6 + torch.rand(2048, generator=generator) * 0.4]),
        torch.ones(4096),
    ]
    values = torch.stack(rows)
    expected = torch.stack([_otsu_with_histc(row) for row in values])
    torch.testing.assert_close(otsu_thresholds(values), expected)


def test_batched_perlin_masks_cover_as_much_as_anomalibs() -> None:
    """Same distribution of anomaly sizes as anomalib's per-image generator (threshold 0.5 after rotation)."""
    torch.manual_seed(0)
    count = 100
    anomalib = PerlinAnomalyGenerator()
    anomalib.augmenters = torch.nn.Identity()  # only the masks are compared
    reference = torch.stack([anomalib.generate_perturbation(64, 64, torch.device("cpu"))[1] for _ in range(count)])
    noise = rotate(perlin_noise(count, 64, 64)[:, None], torch.empty(count).uniform_(-90, 90))
    reference_cover = reference.flatten(1).float().mean(1)
    our_cover = (noise > 0.5).flatten(1).float().mean(1)
    assert our_cover.mean() == pytest.approx(float(reference_cover.mean()), rel=0.2)
    assert our_cover.median() == pytest.approx(float(reference_cover.median()), rel=0.2)
    assert float((our_cover > 0).float().mean()) > 0.95


def test_perlin_noise_any_size_and_stretched_when_flat() -> None:
    torch.manual_seed(0)
    noise = perlin_noise(64, 24, 40)
    assert noise.shape == (64, 24, 40)
    assert bool(((noise > 0.5).flatten(1).any(1)).all())  # a map without a peak is stretched to [-1, 1]
    assert float(noise.abs().max()) <= 1.5


def test_sampling_without_reading_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator way draws without ``torch.nonzero``, every candidate before any other position."""
    candidates = torch.rand(500) > 0.7
    expected = set(sample_positions(candidates, 1000, read_device=True)[0].tolist())

    def nonzero(*_, **__):
        msg = "torch.nonzero reads the device"
        raise RuntimeError(msg)

    monkeypatch.setattr(torch, "nonzero", nonzero)
    monkeypatch.setattr(torch.Tensor, "nonzero", nonzero)
    index, valid = sample_positions(candidates, 1000, read_device=False)
    assert len(index) == 500
    assert set(index[valid].tolist()) == expected  # limit above the count: every candidate, flagged valid
    index, valid = sample_positions(candidates, 50, read_device=False)
    assert bool(valid.all())
    assert bool(candidates[index].all())
    assert len(set(index.tolist())) == 50


def test_checkpoint_entries_of_the_synthesizer_are_dropped() -> None:
    checkpoint = {"state_dict": {"model.a": torch.ones(1), "synthesizer.foreground.blur.kernel": torch.ones(1)}}
    drop_synthesizer_state(checkpoint)
    assert list(checkpoint["state_dict"]) == ["model.a"]
