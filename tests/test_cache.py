"""Stage-2 feature cache: same losses and weights as the plain loop, safe fallbacks, not in checkpoints."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.pre_processing import PreProcessor
from conftest import make_mvtec_dataset
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from anomalib_aand import Aand
from anomalib_aand.components.feature_cache import HALF_PRECISION_RTOL, Stage2FeatureCache, random_transforms

SIZE = 64


class LossRecorder(Callback):
    """Every training step's loss and the student's weights after each epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        del trainer, pl_module, batch, batch_idx
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        student = {
            **pl_module.model.bottleneck.state_dict(prefix="b."),
            **pl_module.model.decoder.state_dict(prefix="d."),
        }
        self.weights.append({k: v.detach().clone() for k, v in student.items()})


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    """Many tiny convolutions: one thread is faster and steadier on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_mvtec_dataset(root, n_train=12, n_good=2, n_bad=2, size=SIZE)
    return root


def _fit(
    root: Path,
    epochs: int = 3,
    augmentations: v2.Transform | None = None,
    ckpt_path: Path | None = None,
    save_to: Path | None = None,
    stage2_epochs: int = 2,
    targets: Stage2FeatureCache | None = None,
    **model_args,
) -> tuple[Aand, LossRecorder]:
    seed_everything(0, workers=True)
    pre_processor = PreProcessor(
        transform=v2.Compose([v2.Resize((SIZE, SIZE)), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
    )
    model = Aand(
        backbone="resnet18",
        pre_trained=False,
        stage1_epochs=1,
        stage2_epochs=stage2_epochs,
        pre_processor=pre_processor,
        evaluator=False,
        visualizer=False,
        **model_args,
    )
    if targets is not None:
        model.feature_cache = targets
    datamodule = MVTecAD(
        root=root,
        category="toy",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        train_augmentations=augmentations,
    )
    recorder = LossRecorder()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model, recorder


def _stage2(recorder: LossRecorder) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    steps_per_epoch = len(recorder.losses) // len(recorder.weights)
    return recorder.losses[steps_per_epoch:], recorder.weights[1:]


def _assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor], atol: float) -> None:
    assert left.keys() == right.keys()
    for name, value in left.items():
        torch.testing.assert_close(value, right[name], rtol=0, atol=atol, msg=f"student weight {name} differs")


@pytest.fixture(scope="module")
def plain_run(data_root: Path) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    return _stage2(_fit(data_root, cache_features=False)[1])


@pytest.mark.slow
def test_cached_epochs_match_plain_loop(data_root: Path, plain_run) -> None:
    """float32 cache: the second stage-2 epoch is served from the cache and ends with the same weights."""
    targets = Stage2FeatureCache(half_precision_rtol=-1.0)  # float32 storage
    model, recorder = _fit(data_root, targets=targets)
    losses, weights = _stage2(recorder)
    plain_losses, plain_weights = plain_run
    assert model.feature_cache is targets
    assert targets.reason is None
    assert targets.dtype == torch.float32
    assert targets.stored == 12  # every training image cached once
    assert targets.placement == "in host memory"
    assert targets.hits == 3  # all of the second stage-2 epoch's batches came from the cache
    assert not targets.enabled  # freed when training ends
    assert len(targets) == 0
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    for cached, plain in zip(weights, plain_weights, strict=True):
        _assert_same_weights(cached, plain, atol=1e-5)


@pytest.mark.slow
def test_half_precision_cache_keeps_loss(data_root: Path, plain_run, caplog: pytest.LogCaptureFixture) -> None:
    """The default float16 cache moves the stage-2 losses by far less than HALF_PRECISION_RTOL."""
    with caplog.at_level(logging.INFO, logger="anomalib_aand"):
        model, recorder = _fit(data_root)
    assert "trains from cached teacher features: 12 images" in caplog.text
    assert "float16" in caplog.text
    assert model.feature_cache.dtype == torch.float16
    losses, _ = _stage2(recorder)
    torch.testing.assert_close(losses, plain_run[0], rtol=HALF_PRECISION_RTOL, atol=0)


class AddNoise(v2.Transform):
    """A random transform the static check cannot recognise by name."""

    def transform(self, inpt, params):
        del params
        if isinstance(inpt, torch.Tensor) and inpt.is_floating_point() and inpt.ndim == 3:
            return inpt + 0.05 * torch.randn_like(inpt)
        return inpt


@pytest.mark.slow
def test_changing_images_switch_cache_off(data_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Random data the name check misses is caught by the fingerprints; the result equals the plain loop."""
    with caplog.at_level(logging.INFO, logger="anomalib_aand"):
        model, cached = _fit(data_root, augmentations=AddNoise())
    assert "changed between epochs" in caplog.text
    assert "changed between epochs" in model.feature_cache.reason
    assert model.feature_cache.hits == 0
    _, plain = _fit(data_root, augmentations=AddNoise(), cache_features=False)
    torch.testing.assert_close(cached.losses, plain.losses)


@pytest.mark.parametrize(
    ("args", "augmentations", "message"),
    [
        ({"cache_features": False}, None, "cache_features=False"),
        ({"cache_budget_gb": 1e-6}, None, "over cache_budget_gb=1e-06"),
        ({}, v2.RandomHorizontalFlip(), "the training transforms are random (RandomHorizontalFlip)"),
    ],
)
@pytest.mark.slow
def test_fallbacks_say_why(data_root: Path, args: dict, augmentations, message: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="anomalib_aand"):
        model, _ = _fit(data_root, epochs=2, augmentations=augmentations, **args)
    assert "recomputes the teacher features every step: " in caplog.text
    assert message in caplog.text
    assert message in model.feature_cache.reason
    assert model.feature_cache.stored == 0
    assert model.feature_cache.dtype is None


@pytest.mark.slow
def test_resume_rebuilds_cache_and_checkpoint_holds_none(data_root: Path, tmp_path: Path) -> None:
    """A checkpoint saved mid stage 2 has no cache in it; resuming refills it and matches an uncached resume."""
    checkpoint = tmp_path / "stage2.ckpt"
    first, _ = _fit(
        data_root, epochs=2, stage2_epochs=3, save_to=checkpoint, targets=Stage2FeatureCache(half_precision_rtol=-1.0)
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert not any("cache" in key for key in state["state_dict"])
    assert state["hyper_parameters"]["cache_features"] is True
    assert first.feature_cache.stored == 12
    resumed, cached = _fit(
        data_root, epochs=4, stage2_epochs=3, ckpt_path=checkpoint, targets=Stage2FeatureCache(half_precision_rtol=-1.0)
    )
    uncached, plain = _fit(data_root, epochs=4, stage2_epochs=3, ckpt_path=checkpoint, cache_features=False)
    assert resumed.current_epoch == 4
    assert resumed.feature_cache.stored == 12  # rebuilt in the first resumed epoch ...
    assert resumed.feature_cache.hits == 3  # ... and used in the second
    assert uncached.feature_cache.reason == "cache_features=False"
    assert uncached.feature_cache.stored == 0
    torch.testing.assert_close(cached.losses, plain.losses, rtol=1e-5, atol=1e-6)
    _assert_same_weights(cached.weights[-1], plain.weights[-1], atol=1e-5)


def test_random_transforms_found_inside_compose() -> None:
    transform = v2.Compose(
        [v2.Resize(64), v2.RandomChoice([v2.ColorJitter(0.2), v2.Identity()]), v2.Normalize([0.5] * 3, [0.5] * 3)]
    )
    assert random_transforms(transform) == ["RandomChoice", "ColorJitter"]
    assert random_transforms(v2.Compose([v2.Resize(64), v2.CenterCrop(64)])) == []


class _Trainer:
    """What ``Stage2FeatureCache`` reads of a trainer: the training loader, the devices, the strategy."""

    def __init__(self, dataset: list[SimpleNamespace], world_size: int = 1) -> None:
        self.train_dataloader = DataLoader(dataset, batch_size=2, collate_fn=_collate)
        self.datamodule = self.lightning_module = None
        self.num_devices = self.world_size = world_size
        self.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, **_: decision)


def _collate(items: list[SimpleNamespace]) -> SimpleNamespace:
    return SimpleNamespace(image=torch.stack([i.image for i in items]), image_path=[i.image_path for i in items])


def _dataset(images: torch.Tensor, paths: list[str | None]) -> list[SimpleNamespace]:
    return [SimpleNamespace(image=image, image_path=path) for image, path in zip(images, paths, strict=True)]


def _features(images: torch.Tensor) -> list[torch.Tensor]:
    return [images * 2, images[:, :, ::2, ::2] + 1]


def _started(trainer: _Trainer, **kwargs) -> Stage2FeatureCache:
    targets = Stage2FeatureCache(**kwargs)
    loss = torch.nn.MSELoss()
    targets.start(
        trainer,
        student=lambda features: [f * 0 for f in features],
        loss=lambda t, s: loss(t[0], s[0]),
        state=torch.nn.BatchNorm1d(3),
    )
    return targets


def test_stage2_targets_serve_from_cache_and_fall_back() -> None:
    """Unit: one process stores each image as it is computed, serves it after (float16); a changed image ends it."""
    images = torch.rand(4, 3, 8, 8)
    paths = ["a", "b", "c", "d"]
    trainer = _Trainer(_dataset(images, paths))
    targets = _started(trainer, budget_gb=1.0)
    computed = []

    def compute(batch: torch.Tensor) -> list[torch.Tensor]:
        computed.append(len(batch))
        return _features(batch)

    targets.fill(trainer, None, compute, torch.device("cpu"))  # one process: nothing to do at the epoch's start
    assert (targets.enabled, computed) == (False, [])
    first = targets(images[:2], paths[:2], compute)
    targets(images[2:], paths[2:], compute)
    assert (targets.enabled, targets.dtype, targets.stored, len(targets), computed) == (
        True,
        torch.float16,
        4,
        4,
        [2, 2],
    )
    assert targets.placement == "in host memory"
    assert targets.store.nbytes == 4 * (3 * 8 * 8 + 3 * 4 * 4) * 2  # the whole training set's rows, float16
    again = targets(images[[1, 0]], ["b", "a"], compute)  # any order
    assert targets.hits == 1
    assert computed == [2, 2]
    for cached, fresh in zip(again, first, strict=True):
        assert cached.dtype == torch.float32
        torch.testing.assert_close(cached, fresh[[1, 0]], rtol=1e-3, atol=1e-3)  # float16 storage
    changed = images[2:].clone()
    changed[1, 0, 0, 0] += 0.5
    served = targets(changed, paths[2:], compute)
    assert not targets.enabled
    assert targets.reason == "Training image 'd' changed between epochs (random augmentation?)."
    torch.testing.assert_close(served[0], changed * 2)
    targets.stop()
    assert len(targets) == 0


def test_stage2_targets_under_ddp_fill_the_whole_set_when_stage2_starts() -> None:
    """Unit: with several processes, one pass in dataset order (pre-processed), generators untouched; then all hits."""
    images = torch.rand(4, 3, 8, 8)
    paths = ["a", "b", "c", "d"]
    trainer = _Trainer(_dataset(images, paths), world_size=2)
    targets = _started(trainer, budget_gb=1.0)
    computed = []

    def compute(batch: torch.Tensor) -> list[torch.Tensor]:
        computed.append(len(batch))
        return _features(batch)

    generator_state = torch.get_rng_state()
    targets.fill(trainer, lambda x: x - 0.5, compute, torch.device("cpu"))
    targets.fill(trainer, lambda x: x - 0.5, compute, torch.device("cpu"))  # once per fit
    assert torch.equal(torch.get_rng_state(), generator_state)
    assert (targets.stored, computed, targets.dtype) == (4, [2, 2], torch.float16)
    served = targets(images[[3, 0]] - 0.5, ["d", "a"], compute)
    assert (targets.hits, computed) == (1, [2, 2])
    torch.testing.assert_close(served[0], (images[[3, 0]] - 0.5) * 2, rtol=1e-3, atol=1e-3)


def test_stage2_targets_budget_and_missing_paths() -> None:
    """The budget is the whole training set's features, per process of the machine; pathless batches are refused."""
    many = _Trainer(_dataset(torch.rand(100, 3, 8, 8), [str(i) for i in range(100)]))
    small = _started(many, budget_gb=1e-9)
    small(torch.rand(2, 3, 8, 8), ["a", "b"], _features)
    assert not small.enabled
    assert "for 100 images, over cache_budget_gb=1e-09" in small.reason
    shared = _Trainer(_dataset(torch.rand(100, 3, 8, 8), [str(i) for i in range(100)]), world_size=2)
    halved = _started(shared, budget_gb=150 * (3 * 8 * 8 + 3 * 4 * 4) * 2 / 1e9)  # fits one process, not two
    halved.fill(shared, None, _features, torch.device("cpu"))
    assert "/ 2 processes on this machine" in halved.reason
    pathless = _Trainer(_dataset(torch.rand(4, 3, 8, 8), [None] * 4))
    targets = _started(pathless)
    targets(torch.rand(2, 3, 8, 8), None, _features)
    assert targets.reason == "the training batches carry no image paths to key the cache by"
    assert Stage2FeatureCache().reason == "training has not started"
