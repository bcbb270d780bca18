"""Map calibration (``map_calibration``): statistics of normal training images, stored as buffers, exported."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from conftest import make_mvtec_dataset, tiny_aand

from anomalib_aand import Aand
from anomalib_aand.components.calibration import MapCalibration, resolve_map_calibration
from anomalib_aand.components.errors import AandInputError


def _distances(generator: torch.Generator, batch: int = 4) -> list[torch.Tensor]:
    return [torch.rand(batch, 1, 8, 8, generator=generator) * (s + 1) + s for s in range(3)]


@pytest.mark.parametrize("mode", ["scale", "position"])
def test_statistics_are_the_mean_and_spread_of_the_normal_maps(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [_distances(generator) for _ in range(3)]
    calibration = MapCalibration(enabled=True, num_scales=3)
    calibration.measure(mode, batches)
    for scale, (offset, spread, _) in enumerate(calibration.statistics()):
        values = torch.cat([b[scale] for b in batches]).numpy()
        expected = values.mean(axis=0, keepdims=True) if mode == "position" else values.mean().reshape(1, 1, 1, 1)
        np.testing.assert_allclose(offset.numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(float(spread), values.std(), rtol=1e-4)
    calibrated = calibration(batches[0])
    torch.testing.assert_close(calibrated[1], (batches[0][1] - calibration.offset1) / calibration.spread1)


def test_calibrated_normal_maps_are_centred_and_scaled() -> None:
    """After calibration every scale's normal map has mean 0 and spread 1: no scale dominates the sum."""
    generator = torch.Generator().manual_seed(1)
    batches = [_distances(generator, 8) for _ in range(4)]
    calibration = MapCalibration(enabled=True, num_scales=3)
    calibration.measure("scale", batches)
    for scale in range(3):
        values = torch.cat([calibration(b)[scale] for b in batches])
        assert abs(float(values.mean())) < 1e-5
        assert float(values.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


def test_position_means_travel_in_the_state_dict_and_fit_other_sizes() -> None:
    generator = torch.Generator().manual_seed(2)
    trained = MapCalibration(enabled=True, num_scales=3)
    trained.measure("position", [_distances(generator)])
    fresh = MapCalibration(enabled=True, num_scales=3)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.offset0.shape == (1, 1, 8, 8)
    torch.testing.assert_close(fresh.offset2, trained.offset2)
    other = [torch.ones(2, 1, 16, 16) for _ in range(3)]
    assert [d.shape for d in fresh(other)] == [(2, 1, 16, 16)] * 3


def test_a_state_dict_without_statistics_scores_the_plain_distances() -> None:
    """A checkpoint written without calibration loads and keeps the identity."""
    calibration = MapCalibration(enabled=True, num_scales=3)
    calibration.load_state_dict({}, strict=True)
    maps = _distances(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(calibration(maps), maps, strict=True))
    assert MapCalibration(enabled=False, num_scales=3).state_dict() == {}


def test_mode_none_measures_the_identity() -> None:
    calibration = MapCalibration(enabled=True, num_scales=3)
    maps = _distances(torch.Generator().manual_seed(5))
    calibration.measure("position", [maps])
    calibration.measure("none", [maps])
    assert all(torch.equal(a, b) for a, b in zip(calibration(maps), maps, strict=True))


def test_the_category_chooses_the_mode_and_unknown_modes_are_refused() -> None:
    from types import SimpleNamespace

    setting = {"default": "scale", "screw": "position"}
    assert resolve_map_calibration(setting, SimpleNamespace(category="screw")) == "position"
    assert resolve_map_calibration(setting, SimpleNamespace(category="grass")) == "scale"
    assert resolve_map_calibration({"screw": "position"}, SimpleNamespace(category="grass")) == "none"
    assert resolve_map_calibration("envelope", SimpleNamespace(category="grass")) == "envelope"
    with pytest.raises(AandInputError, match="map_calibration must be one of"):
        tiny_aand(map_calibration={"screw": "positon"})


@pytest.mark.slow
def test_training_measures_calibration_on_training_images_and_export_keeps_it(mvtec_root: Path, tmp_path: Path) -> None:
    """Fit measures the statistics on the training split only; the ONNX graph carries them (parity <= 1e-3)."""
    import onnxruntime

    model = tiny_aand(map_calibration={"default": "none", "toy": "envelope"})
    datamodule = MVTecAD(root=mvtec_root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    calibration = model.model.anomaly_map_generator.calibration
    assert calibration.offset0.shape == (1, 1, 8, 8)  # 32 px image, stride 4
    measured = [s.clone() for triple in calibration.statistics() for s in triple]
    assert float(calibration.floor0) == 0.0  # the category's mode: envelope
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "export")  # measured in inference mode
    datamodule.setup()
    model.eval()
    images = [model.pre_processor.transform(batch.image) for batch in datamodule.train_dataloader()]
    calibration.measure("envelope", (model.model.distances(i) for i in images))  # again, by hand, training split
    for before, after in zip(measured, [s for triple in calibration.statistics() for s in triple], strict=True):
        torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-6)
    session = onnxruntime.InferenceSession(str(onnx_path))
    batch = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        ours = model(batch)
    theirs = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    outputs = dict(zip([o.name for o in session.get_outputs()], theirs, strict=True))
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), ours.pred_score.reshape(-1).numpy(), atol=1e-3)
    np.testing.assert_allclose(outputs["anomaly_map"], ours.anomaly_map.numpy(), atol=1e-3)
    reloaded = Aand.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path, map_location="cpu")
    assert reloaded.model.anomaly_map_generator.calibration.offset0.shape == (1, 1, 8, 8)  # per position, loaded
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(batch).anomaly_map, ours.anomaly_map)


def test_envelope_counts_only_what_exceeds_every_normal_image_at_its_position() -> None:
    generator = torch.Generator().manual_seed(4)
    batches = [_distances(generator) for _ in range(2)]
    calibration = MapCalibration(enabled=True, num_scales=3)
    calibration.measure("envelope", batches)
    largest = torch.cat([b[0] for b in batches]).amax(dim=0, keepdim=True)
    torch.testing.assert_close(calibration.offset0, largest)
    assert all(float(d.amax()) == 0.0 for b in batches for d in calibration(b))  # no normal image exceeds it
    defect = [d.clone() for d in batches[0]]
    defect[0][0, 0, 3, 3] = largest[0, 0, 3, 3] + 0.5
    assert float(calibration(defect)[0][0, 0, 3, 3]) == pytest.approx(0.5)


def test_statistics_measured_in_inference_mode_stay_exportable() -> None:
    """Measured under ``torch.inference_mode`` (as a caller may), the buffers are ordinary tensors: exportable."""
    generator = torch.Generator().manual_seed(5)
    calibration = MapCalibration(enabled=True, num_scales=3)
    with torch.inference_mode():
        calibration.measure("envelope", [_distances(generator) for _ in range(2)])
    assert not any(s.is_inference() for triple in calibration.statistics() for s in triple)


def test_envelope_is_the_default_and_a_plain_model_holds_no_statistics() -> None:
    assert Aand().map_calibration == "envelope"
    assert tiny_aand().model.anomaly_map_generator.calibration.enabled
    assert not tiny_aand(map_calibration="none").model.anomaly_map_generator.calibration.statistics()


@pytest.mark.slow
def test_plain_checkpoint_tests_in_a_calibrated_model_and_not_the_reverse(mvtec_root: Path, tmp_path: Path) -> None:
    """A checkpoint trained with ``map_calibration: none`` keeps its plain scores under the calibrated default
    (``anomalib test --model anomalib_aand.Aand --ckpt_path ...``); a calibrated one is refused by a plain model."""
    datamodule = MVTecAD(root=mvtec_root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    checkpoints = {}
    for mode in ("none", "envelope"):
        engine = Engine(default_root_dir=tmp_path / mode, logger=False, enable_progress_bar=False, accelerator="cpu")
        engine.fit(tiny_aand(map_calibration=mode), datamodule=datamodule)
        checkpoints[mode] = engine.trainer.checkpoint_callback.best_model_path
    engine = Engine(default_root_dir=tmp_path / "test", logger=False, enable_progress_bar=False, accelerator="cpu")
    calibrated = tiny_aand()
    engine.predict(calibrated, datamodule=datamodule, ckpt_path=checkpoints["none"])
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = Aand.load_from_checkpoint(checkpoints["none"], map_location="cpu").eval()(images)
        torch.testing.assert_close(calibrated.eval()(images).anomaly_map, plain.anomaly_map)
    with pytest.raises(AandInputError, match="map_calibration: the checkpoint holds calibration statistics"):
        engine.test(tiny_aand(map_calibration="none"), datamodule=datamodule, ckpt_path=checkpoints["envelope"])


def _object_masks(corners: list[tuple[int, int]], size: int = 32, side: int = 8) -> torch.Tensor:
    """Foreground masks of an object (a square) at each of ``corners``."""
    masks = torch.zeros(len(corners), 1, size, size)
    for mask, (top, left) in zip(masks, corners, strict=True):
        mask[:, top : top + side, left : left + side] = 1
    return masks


def test_support_is_the_union_of_the_training_foregrounds_cell_by_cell() -> None:
    """Images showing the object add their cells; an image the estimator kept whole (no split) adds nothing."""
    calibration = MapCalibration(enabled=True, num_scales=3)
    masks = _object_masks([(1, 1), (6, 12)])
    calibration.measure_support([masks, torch.ones(1, 1, 32, 32)], cell=4)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 0:3, 0:3] = 1  # 4 x 4 cells with a foreground pixel of rows 1-8 x columns 1-8
    expected[..., 1:4, 3:5] = 1  # and of rows 6-13 x columns 12-19
    torch.testing.assert_close(calibration.support, expected)
    restricted = calibration.restrict(torch.ones(2, 1, 32, 32))
    assert float(restricted[0, 0, 2, 2]) == 1.0
    assert float(restricted[:, :, 20:, :].amax()) == 0.0  # far from every training pose: nothing scores
    fresh = MapCalibration(enabled=True, num_scales=3)
    fresh.take_shapes(calibration.state_dict(), "")
    fresh.load_state_dict(calibration.state_dict())
    torch.testing.assert_close(fresh.support, expected)


def test_support_leaves_out_foreground_touching_the_image_border() -> None:
    """Dark vignetted corners pass the estimator's threshold beside the object: only the object inside the frame
    counts. An image whose foreground all touches the border (an object cut by the frame) adds nothing."""
    masks = _object_masks([(12, 12)] * 2)
    masks[..., :6, :6] = 1  # a dark corner
    masks[0, :, 26:, 28:] = 1  # another, reaching inwards
    cut = _object_masks([(20, 0)])
    calibration = MapCalibration(enabled=True, num_scales=3)
    calibration.measure_support([masks, cut], cell=4)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 3:5, 3:5] = 1  # rows and columns 12-19 only
    torch.testing.assert_close(calibration.support, expected)
    alone = MapCalibration(enabled=True, num_scales=3)
    alone.measure_support([cut.expand(4, -1, -1, -1)], cell=4)
    assert alone.support.shape == (1, 1, 1, 1)  # no image shows an object inside the frame: the whole image


def test_without_objects_on_a_background_the_support_is_the_whole_image() -> None:
    """Textures (never split) and a rare spurious split (under 10 % of the images) keep every position."""
    maps = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    for masks in (torch.ones(12, 1, 32, 32), torch.cat([torch.ones(11, 1, 32, 32), _object_masks([(0, 0)])])):
        calibration = MapCalibration(enabled=True, num_scales=3)
        calibration.measure_support([masks], cell=4)
        assert calibration.support.shape == (1, 1, 1, 1)
        assert torch.equal(calibration.restrict(maps), maps)


def _write_objects(root: Path, size: int = 64) -> None:
    """An MVTec-layout category ``parts``: a bright part on a dark, grainy table, always in the left half.

    Normal test images add a dark blob on the table's right half, where no training image showed the part; the
    defects are dark spots on the part.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "parts"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (base / folder).mkdir(parents=True, exist_ok=True)

    def image() -> tuple[np.ndarray, tuple[int, int]]:
        pixels = np.clip(0.15 + rng.normal(0, 0.05, (size, size, 3)), 0, 1)
        top, left = int(rng.integers(8, 32)), int(rng.integers(4, 12))
        pixels[top : top + 24, left : left + 16] = 0.9
        return pixels, (top, left)

    def save(pixels: np.ndarray, path: Path) -> None:
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)

    for i in range(12):
        save(image()[0], base / "train/good" / f"{i:03d}.png")
    for i in range(3):
        pixels, _ = image()
        pixels[20:36, 44:60] = 0.6
        save(pixels, base / "test/good" / f"{i:03d}.png")
        pixels, (top, left) = image()
        mask = np.zeros((size, size), np.uint8)
        pixels[top + 8 : top + 16, left + 4 : left + 12] = 0.3
        mask[top + 8 : top + 16, left + 4 : left + 12] = 255
        save(pixels, base / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/spot" / f"{i:03d}_mask.png")


@pytest.mark.slow
def test_fit_scores_objects_only_where_training_images_showed_them_and_export_keeps_it(tmp_path: Path) -> None:
    """``map_foreground`` (default): the support comes from the training images' foregrounds, zeroes the map where
    no training image showed the part, travels in the checkpoint and the ONNX graph (parity <= 1e-3)."""
    import onnxruntime

    _write_objects(tmp_path / "data")
    datamodule = MVTecAD(root=tmp_path / "data", category="parts", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    model = tiny_aand(pre_processor=Aand.configure_pre_processor((64, 64)))  # the estimator's blur needs 64 px
    engine.fit(model, datamodule=datamodule)
    support = model.model.anomaly_map_generator.calibration.support
    assert support.shape == (1, 1, 16, 16)  # 64 px image, stride 4
    assert float(support[..., :, 12:].amax()) == 0.0  # the right quarter: never the part
    assert float(support[..., 8, 4]) == 1.0  # the left half's middle: the part in every pose
    datamodule.setup()
    model.eval()
    images = next(iter(datamodule.test_dataloader())).image
    unsupported = tiny_aand(map_foreground=False, pre_processor=Aand.configure_pre_processor((64, 64)))
    unsupported.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("support")})
    with torch.no_grad():
        ours = model.model(model.pre_processor.transform(images)).anomaly_map
        plain = unsupported.eval().model(model.pre_processor.transform(images)).anomaly_map
        exported = model(images[:2])
    assert float(ours[..., 56:].amax()) < 0.01 * float(plain[..., 56:].amax())  # the table beside the part: ~nothing
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "export")
    session = onnxruntime.InferenceSession(str(onnx_path))
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images[:2].numpy()}), strict=True))
    np.testing.assert_allclose(outputs["anomaly_map"], exported.anomaly_map.numpy(), atol=1e-3)
    reloaded = Aand.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path, map_location="cpu")
    torch.testing.assert_close(reloaded.model.anomaly_map_generator.calibration.support, support)


@pytest.mark.slow
def test_map_sigma_per_category_is_chosen_when_training_starts_and_travels_to_checkpoint_and_export(
    tmp_path: Path,
) -> None:
    """``map_sigma`` as a mapping: the datamodule's category picks the blur (sigma 8: a 65-pixel kernel); a model
    built with the default sigma loads that checkpoint with its kernel and scores as the trained model; the ONNX
    graph carries it (parity <= 1e-3)."""
    import onnxruntime

    make_mvtec_dataset(tmp_path / "data", n_train=4, n_good=2, n_bad=2)
    datamodule = MVTecAD(root=tmp_path / "data", category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    size = Aand.configure_pre_processor((64, 64))
    model = tiny_aand(map_sigma={"toy": 8.0, "default": 4.0}, pre_processor=size)
    assert model.model.anomaly_map_generator.blur.kernel.shape[-1] == 33
    engine.fit(model, datamodule=datamodule)
    assert model.model.anomaly_map_generator.blur.kernel.shape[-1] == 65
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    datamodule.setup()
    images = next(iter(datamodule.test_dataloader())).image
    model.eval()
    with torch.no_grad():
        trained = model(images).anomaly_map
    plain = tiny_aand(pre_processor=Aand.configure_pre_processor((64, 64)))
    engine.test(plain, datamodule=datamodule, ckpt_path=checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images).anomaly_map, trained)
    onnx_path = engine.export(plain, ExportType.ONNX, export_root=tmp_path / "export")
    session = onnxruntime.InferenceSession(str(onnx_path))
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["anomaly_map"], trained.numpy(), atol=1e-3)
