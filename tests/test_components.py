"""Unit tests of AAND's building blocks, with values checked by hand."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.backbone.resnet_decoder import ResNetDecoder as AnomalibResNetDecoder

from anomalib_aand import AandModel
from anomalib_aand.anomaly_map import AnomalyMapGenerator
from anomalib_aand.components.raa import ResidualAnomalyAmplification, positional_encoding_2d
from anomalib_aand.components.student import Decoder, build_student
from anomalib_aand.components.synthesis import downsample_mask
from anomalib_aand.loss import (
    AmplificationLoss,
    DistillationLoss,
    amplification_loss,
    cosine_loss,
    focal_loss,
    hkd_loss,
)

torch.manual_seed(0)

RESNET_LAYERS = ("layer1", "layer2", "layer3")


def test_positional_encoding_values_and_odd_channels() -> None:
    enc = positional_encoding_2d(8, 3, 5)
    assert enc.shape == (1, 8, 3, 5)
    # channel 0: sin(x), channel 1: cos(x), constant along y; channel 4: sin(y), constant along x
    assert torch.allclose(enc[0, 0, 0], torch.sin(torch.arange(5.0)))
    assert torch.allclose(enc[0, 1, 2], torch.cos(torch.arange(5.0)))
    assert torch.allclose(enc[0, 4, :, 0], torch.sin(torch.arange(3.0)))
    assert torch.allclose(enc[0, 4, :, 0], enc[0, 4, :, 4])
    odd = positional_encoding_2d(10, 4, 4)
    assert torch.equal(odd[0, 8:], torch.zeros(2, 4, 4))
    assert torch.equal(odd[0, :8], positional_encoding_2d(8, 4, 4)[0])
    assert enc.abs().max() <= 1


def test_gate_in_unit_interval_and_teacher_forcing() -> None:
    raa = ResidualAnomalyAmplification(16, num_keys=4, temperature=0.2)
    features = torch.randn(2, 16, 6, 7)
    amplified, gate = raa(features)
    assert gate.shape == (2, 1, 6, 7)
    assert gate.min() >= 0
    assert gate.max() <= 1
    residual = torch.tanh(raa.residual(features)) * features
    assert torch.allclose(amplified, features + gate * residual, atol=1e-6)

    mask = torch.zeros(2, 1, 6, 7)
    mask[:, :, 2:4, 3:5] = 1
    forced, forced_gate = raa(features, mask)
    assert torch.allclose(forced_gate, gate)  # the gate is still predicted for the focal loss
    assert torch.equal(forced[mask.expand_as(forced) == 0], features[mask.expand_as(features) == 0])
    assert torch.allclose(forced, features + mask * residual, atol=1e-6)
    # tanh keeps the residual smaller than the feature itself
    assert (residual.abs() <= features.abs() + 1e-6).all()


def test_gate_is_mass_on_anomaly_keys() -> None:
    raa = ResidualAnomalyAmplification(4, num_keys=2, temperature=0.2)
    features = torch.randn(1, 4, 2, 2)
    query = raa.query(features + positional_encoding_2d(4, 2, 2))
    sim = torch.einsum("bchw,mc->bmhw", F.normalize(query, dim=1), F.normalize(raa.keys, dim=1))
    expected = torch.softmax(sim / 0.2, dim=1)[:, 2:].sum(1, keepdim=True)
    assert torch.allclose(raa.gate(features), expected, atol=1e-6)


def test_focal_loss_hand_values() -> None:
    gate = torch.tensor([0.9, 0.2])
    target = torch.tensor([1.0, 0.0])
    expected = (-0.8 * 0.1**2 * math.log(0.9) - 0.2 * 0.2**2 * math.log(0.8)) / 2
    assert focal_loss(gate, target, 0.8, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # a batch with no anomaly: finite even with the gate saturated
    no_anomaly = focal_loss(torch.tensor([0.0, 1.0, 0.5]), torch.zeros(3), 0.8, 2.0)
    assert torch.isfinite(no_anomaly)
    assert focal_loss(torch.zeros(3), torch.zeros(3), 0.8, 2.0).item() == pytest.approx(0.0, abs=1e-9)


def _map(vectors: list[list[float]]) -> torch.Tensor:
    """Positions (row-major) of a 1 x C x 1 x N map."""
    return torch.tensor(vectors).t()[None, :, None, :]


def test_amplification_loss_hand_values() -> None:
    # normal at position 0 along x; anomaly at position 1 at 60 degrees (cos 0.5)
    features = _map([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    mask = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    # amplified anomaly unchanged: relu(0.5 - (0.5 - 0.3)) = 0.3
    assert amplification_loss(features, features, mask, None, margin=0.3).item() == pytest.approx(0.3, abs=1e-6)
    # amplified anomaly orthogonal to the normal one: relu(0 - 0.2) = 0
    pushed = _map([[1.0, 0.0], [0.0, 1.0]])
    assert amplification_loss(features, pushed, mask, None, margin=0.3).item() == pytest.approx(0.0, abs=1e-6)
    # no anomalous position: exactly zero, and still differentiable
    amplified = features.clone().requires_grad_(requires_grad=True)
    zero = amplification_loss(features, amplified, torch.zeros(1, 1, 1, 2), None, margin=0.3)
    assert zero.item() == 0.0
    zero.backward()
    # background outside the foreground is not used as "normal": no normal position left -> zero
    assert amplification_loss(features, features, mask, foreground=torch.zeros(1, 1, 1, 2), margin=0.3).item() == 0.0


def _unit_vectors(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack([angles.cos(), angles.sin()])


def test_amplification_loss_samples_at_most_the_limits() -> None:
    """Every (normal, anomalous) pair has its own term: the value reveals how many pairs were averaged."""
    generator = torch.Generator().manual_seed(0)
    normal, anomalous, pushed = (torch.rand(n, generator=generator) * 6.28 for n in (6, 4, 4))
    plain = torch.cat([_unit_vectors(normal), _unit_vectors(anomalous)], dim=1)[None, :, None, :]
    amplified = torch.cat([_unit_vectors(normal), _unit_vectors(pushed)], dim=1)[None, :, None, :]
    mask = torch.tensor([0.0] * 6 + [1.0] * 4).view(1, 1, 1, 10)
    # margin 3 keeps every term positive: term(i, j) = cos(n_i, pushed_j) - cos(n_i, a_j) + 3
    terms = _unit_vectors(normal).t() @ (_unit_vectors(pushed) - _unit_vectors(anomalous)) + 3.0  # (6, 4)
    full = amplification_loss(plain, amplified, mask, None, margin=3.0)
    assert full.item() == pytest.approx(terms.mean().item(), abs=1e-6)  # limits above the counts: every pair
    pairs = {round(v, 5) for v in terms.flatten().tolist()}
    rows = {
        round((terms[i, j] + terms[k, j]).item() / 2, 5) for i in range(6) for k in range(i + 1, 6) for j in range(4)
    }
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        one = amplification_loss(plain, amplified, mask, None, margin=3.0, max_normal=1, max_anomalous=1).item()
        two = amplification_loss(plain, amplified, mask, None, margin=3.0, max_normal=2, max_anomalous=1).item()
        assert round(one, 5) in pairs  # exactly one pair
        assert round(two, 5) in rows  # two normal positions against one anomalous one
        seen.add(round(one, 5))
    assert len(seen) > 1  # the pair is drawn at random


def test_hkd_top_k_and_global_term() -> None:
    target = torch.zeros(1, 2, 1, 4)
    target[:, 0] = 1.0
    student = target.clone()
    student[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # one position orthogonal: 1 - cos = 1
    student[0, :, 0, 2] = torch.tensor([-1.0, 0.0])  # one opposite: 1 - cos = 2
    flat = 1 - F.cosine_similarity(target.flatten(1), student.flatten(1)).item()
    assert hkd_loss([target], [student], top_k=1).item() == pytest.approx(2.0 + flat, abs=1e-6)
    assert hkd_loss([target], [student], top_k=2).item() == pytest.approx(1.5 + flat, abs=1e-6)
    assert hkd_loss([target], [student], top_k=4).item() == pytest.approx(0.75 + flat, abs=1e-6)
    assert cosine_loss([target], [student]).item() == pytest.approx(flat, abs=1e-6)
    assert hkd_loss([target, target], [target, target], top_k=2).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_module() -> None:
    target = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    student = [t + 0.3 * torch.randn_like(t) for t in target]
    hkd, cosine = DistillationLoss("hkd", top_k=3), DistillationLoss("cosine", top_k=3)
    assert hkd(target, student).item() == pytest.approx(hkd_loss(target, student, 3).item())
    assert cosine(target, student).item() == pytest.approx(cosine_loss(target, student).item())
    assert hkd(target, student) > cosine(target, student)  # the hard term comes on top of the global one
    with pytest.raises(ValueError, match="'hkd' or 'cosine'"):
        DistillationLoss("l2", top_k=3)


def test_amplification_loss_module_resizes_masks_and_weights_terms() -> None:
    features = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    amplified = [f + torch.randn_like(f) for f in features]
    gates = [torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)]
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :16, :16] = 1
    foreground = torch.ones(2, 1, 32, 32)
    losses = AmplificationLoss(focal_alpha=0.8, focal_gamma=2.0, weight=0.5, margin=0.3)(
        features, amplified, gates, mask, foreground
    )
    masks = [downsample_mask(mask, f.shape[-2:]) for f in features]
    focal = sum(focal_loss(g, m, 0.8, 2.0) for g, m in zip(gates, masks, strict=True))
    amplification = sum(
        amplification_loss(f, a, m, downsample_mask(foreground, f.shape[-2:]), margin=0.3)
        for f, a, m in zip(features, amplified, masks, strict=True)
    )
    assert losses["focal"].item() == pytest.approx(focal.item(), rel=1e-6)
    assert losses["amplification"].item() == pytest.approx(amplification.item(), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(focal.item() + 0.5 * amplification.item(), rel=1e-6)
    no_foreground = AmplificationLoss(focal_alpha=0.8, focal_gamma=2.0, weight=0.5, margin=0.3)(
        features, amplified, gates, mask, torch.zeros_like(foreground)
    )
    assert no_foreground["amplification"].item() == 0.0  # no normal position left


@pytest.mark.parametrize(
    ("backbone", "layers", "channels"),
    [
        ("resnet18", ("layer1", "layer2", "layer3"), [64, 128, 256]),
        ("tf_efficientnet_lite0", ("blocks.1", "blocks.2", "blocks.4"), [24, 40, 112]),
    ],
)
def test_student_mirrors_teacher(backbone: str, layers: tuple[str, ...], channels: list[int]) -> None:
    model = AandModel(backbone, layers, num_keys=3, gate_temperature=0.2).eval()
    assert model.channels == channels
    assert model.reductions == [4, 8, 16]
    images = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        teacher = model.extract(images)
        student = model.distill(model.amplify(teacher)[0])
    assert [s.shape for s in student] == [t.shape for t in teacher]
    uses_anomalib = isinstance(model.decoder, AnomalibResNetDecoder)
    assert uses_anomalib == (backbone == "resnet18")


def test_generic_student_for_other_pyramids() -> None:
    bottleneck, decoder = build_student("custom", ("a", "b"), [8, 16], [2, 8])
    assert isinstance(decoder, Decoder)
    features = [torch.randn(1, 8, 32, 32), torch.randn(1, 16, 8, 8)]
    embedding = bottleneck(features)
    assert embedding.shape == (1, 32, 4, 4)
    assert [o.shape for o in decoder(embedding)] == [f.shape for f in features]


def test_anomaly_map_and_score() -> None:
    generator = AnomalyMapGenerator(sigma=4.0)
    assert generator.blur.kernel.shape == (1, 1, 1, 33)
    target = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    assert generator(target, target, (32, 32)).abs().max() < 1e-5
    student = [t.clone() for t in target]
    student[0][1, :, 2, 5] = -target[0][1, :, 2, 5]  # one opposite feature in image 1
    anomaly_map = generator(target, student, (32, 32))
    assert anomaly_map.shape == (2, 1, 32, 32)
    assert anomaly_map[0].abs().max() < 1e-5
    peak = torch.nonzero(anomaly_map[1, 0] == anomaly_map[1, 0].max())[0]
    assert 4 <= peak[0] <= 14  # around row 2/8, column 5/8 of the image
    assert 14 <= peak[1] <= 26

    model = AandModel("resnet18", RESNET_LAYERS, num_keys=2, gate_temperature=0.2).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert out.anomaly_map.shape == (3, 1, 64, 64)
    assert torch.equal(out.pred_score, out.anomaly_map.amax(dim=(-2, -1)))


def test_map_sigma_sets_the_blur_and_a_loaded_generator_takes_the_saved_kernel() -> None:
    """A wider blur spreads a one-position defect further (lower peak, wider reach); the kernel is a buffer that a
    generator built with another sigma takes at its saved size."""
    target = [torch.randn(1, 4, 16, 16)]
    student = [target[0].clone()]
    student[0][0, :, 8, 8] = -target[0][0, :, 8, 8]
    narrow = AnomalyMapGenerator(sigma=4.0)
    wide = AnomalyMapGenerator(sigma=8.0)
    assert wide.blur.kernel.shape == (1, 1, 1, 65)
    narrow_map = narrow(target, student, (64, 64))
    wide_map = wide(target, student, (64, 64))
    assert float(wide_map.max()) < 0.5 * float(narrow_map.max())
    assert float(wide_map[0, 0, 32, 0]) > float(narrow_map[0, 0, 32, 0])  # 32 px from the defect
    narrow.load_state_dict(wide.state_dict())
    torch.testing.assert_close(narrow(target, student, (64, 64)), wide_map)


@pytest.mark.parametrize("sigma", [4.0, 8.0])
def test_separable_blur_is_anomalibs_gaussian_blur_and_loads_its_2d_kernel(sigma: float) -> None:
    """Two 1-D passes give ``GaussianBlur2d``'s map (same kernel size, reflected borders); a state dict holding its
    2-D kernel (checkpoints before the separable blur) loads and blurs the same."""
    from anomalib.models.components.filters import GaussianBlur2d

    size = 2 * int(4 * sigma + 0.5) + 1
    reference = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=size)
    maps = torch.rand(2, 1, 80, 72, generator=torch.Generator().manual_seed(3))
    generator = AnomalyMapGenerator(sigma=sigma)
    torch.testing.assert_close(generator.blur(maps), reference(maps), rtol=0, atol=1e-5)
    old = AnomalyMapGenerator(sigma=2.0)
    old.load_state_dict({**generator.state_dict(), "blur.kernel": reference.kernel.clone()})
    assert old.blur.kernel.shape == (1, 1, 1, size)
    torch.testing.assert_close(old.blur(maps), reference(maps), rtol=0, atol=1e-5)


def test_no_amplification_means_plain_teacher() -> None:
    model = AandModel("resnet18", RESNET_LAYERS, num_keys=50, gate_temperature=0.2, amplification=False).eval()
    assert model.raa is None
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(
            torch.equal(a, b) for a, b in zip(model.amplified_features(images), model.extract(images), strict=True)
        )


def test_teacher_batchnorm_stays_frozen() -> None:
    model = AandModel("resnet18", RESNET_LAYERS, num_keys=2, gate_temperature=0.2)
    model.train()
    assert not model.teacher.training
    assert model.bottleneck.training
    running = model.teacher.feature_extractor.bn1.running_mean.clone()
    model(torch.rand(2, 3, 64, 64) * 5)
    assert torch.equal(running, model.teacher.feature_extractor.bn1.running_mean)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_mask_at_feature_scale() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :8] = 1  # one quadrant
    assert downsample_mask(mask, (2, 2)).flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :2, :2] = 1  # 1/16 of a quadrant: average 0.0625 < 0.3 vanishes at 2x2
    assert downsample_mask(mask, (2, 2)).sum() == 0
    assert downsample_mask(mask, (8, 8)).sum() == 1


@pytest.mark.parametrize(
    ("stage1_epochs", "fixture"),
    [(1, "aand_resnet18_state_dict_keys.txt"), (0, "aand_resnet18_no_amplification_state_dict_keys.txt")],
)
def test_state_dict_keys_match_released_checkpoints(stage1_epochs: int, fixture: str) -> None:
    """Checkpoints written before the refactor keep loading: the state_dict key names stay the same.

    The fixtures list the keys of ``Aand(backbone="resnet18", stage1_epochs=...)`` at commit c9f007c, written
    without map calibration; a renamed or new persistent tensor (loss modules, the feature cache) would make old
    checkpoints fail to load. Such a state dict also loads into the calibrated default model.
    """
    from anomalib_aand import Aand

    expected = (Path(__file__).parent / "fixtures" / fixture).read_text().split()
    arguments = {"backbone": "resnet18", "pre_trained": False, "stage1_epochs": stage1_epochs, "stage2_epochs": 1}
    plain = Aand(**arguments, map_calibration="none")
    assert list(plain.state_dict()) == expected
    Aand(**arguments).load_state_dict(plain.state_dict())
