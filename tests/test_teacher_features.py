"""benchmarks/teacher_features.py: background feature coherence and norms are measured where the silhouette says."""

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def teacher_features():
    return load_benchmark("teacher_features")


def test_coherent_background_and_noisy_background_are_told_apart(teacher_features) -> None:
    """One direction everywhere on the table: cosine 1; independent random directions: cosine near 0."""
    silhouette = torch.zeros(1, 1, 32, 32)
    silhouette[..., 8:24, 8:24] = 1
    torch.manual_seed(0)
    coherent = torch.ones(1, 16, 16, 16) * torch.rand(16).view(1, 16, 1, 1)
    coherent[..., 4:12, 4:12] *= 3  # the object: three times the norm
    noisy = torch.randn(1, 16, 16, 16)
    calm = teacher_features.layer_statistics(coherent, silhouette)
    grainy = teacher_features.layer_statistics(noisy, silhouette)
    assert calm["neighbour_cos_background"] == pytest.approx(1.0, abs=1e-5)
    assert calm["norm_background"] / calm["norm_object"] == pytest.approx(1 / 3, rel=1e-4)
    assert abs(grainy["neighbour_cos_background"]) < 0.15
