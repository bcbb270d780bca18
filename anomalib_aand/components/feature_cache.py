"""Stage-2 feature cache: the frozen amplified teacher features of each training image, computed once.

In AAND's second stage the teacher and the RAA modules are frozen and the training images carry no
synthetic anomalies, so with deterministic data every epoch would recompute the same features. The
cache keys them by image path and checks, on every hit, that the image is the one cached (a
fingerprint of the pre-processed tensor): random augmentations can never be served stale features,
they only switch the cache off. Batches keep coming from the datamodule's own loader, so batch order,
epoch length, distributed sampling and resuming stay Lightning's.
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

logger = logging.getLogger(__name__)

# Features are cached in float16 when that moves the first batch's loss by at most this share.
HALF_PRECISION_RTOL = 1e-3

# Transforms that draw random numbers, by torchvision v2 / anomalib class name (``Random*`` is implied).
RANDOM_TRANSFORMS = frozenset(
    {
        "AugMix",
        "AutoAugment",
        "ColorJitter",
        "CutMix",
        "ElasticTransform",
        "GaussianBlur",
        "GaussianNoise",
        "JPEG",
        "MixUp",
        "MultiRandomChoice",
        "RandAugment",
        "ScaleJitter",
        "TrivialAugmentWide",
    }
)


class StaleCacheError(RuntimeError):
    """A training image differs from the one whose features were cached under its path."""


def random_transforms(transform: nn.Module | None) -> list[str]:
    """Class names of the random transforms inside ``transform`` (Compose and friends are searched)."""
    if transform is None:
        return []
    found = []
    name = type(transform).__name__
    if name.startswith("Random") or name in RANDOM_TRANSFORMS:
        found.append(name)
    children = getattr(transform, "transforms", None)
    if isinstance(children, Iterable):
        for child in children:
            found.extend(random_transforms(child))
    return found


class FeatureStore:
    """Per-image amplified features, stored on the CPU in ``dtype``.

    Args:
        dtype: Storage precision (``torch.float16`` halves the memory; features come back as float32).
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self.entries: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.hits = 0
        self._projection: torch.Tensor | None = None

    def __len__(self) -> int:
        """Images cached."""
        return len(self.entries)

    @staticmethod
    def bytes_per_image(features: Sequence[torch.Tensor], dtype: torch.dtype) -> int:
        """Storage of one image's features (all scales) in ``dtype``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(f[0].numel() for f in features) * itemsize

    def fingerprints(self, images: torch.Tensor) -> torch.Tensor:
        """Two fixed random projections per image (float64); equal images give equal values."""
        flat = images.detach().flatten(1).double()
        if self._projection is None or self._projection.shape[1] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            self._projection = torch.randn(2, flat.shape[1], generator=generator, dtype=torch.float64)
        self._projection = self._projection.to(flat.device)
        return (flat @ self._projection.t()).cpu()

    def get(self, paths: Sequence[str], images: torch.Tensor) -> list[torch.Tensor] | None:
        """The batch's cached features (float32, on the images' device), or ``None`` if any image is missing.

        Raises ``StaleCacheError`` when an image differs from the cached one.
        """
        if any(path not in self.entries for path in paths):
            return None
        fingerprints = self.fingerprints(images)
        for path, fingerprint in zip(paths, fingerprints, strict=True):
            if not torch.allclose(fingerprint, self.entries[path][1], rtol=1e-9, atol=1e-9):
                msg = f"Training image {path!r} changed between epochs (random augmentation?)."
                raise StaleCacheError(msg)
        scales = zip(*(self.entries[path][0] for path in paths), strict=True)
        self.hits += 1
        return [torch.stack(scale).to(images.device, torch.float32, non_blocking=True) for scale in scales]

    def put(self, paths: Sequence[str], images: torch.Tensor, features: Sequence[torch.Tensor]) -> None:
        """Store each image's features (detached, CPU, ``dtype``) under its path."""
        stored = [f.detach().to("cpu", self.dtype, copy=True) for f in features]  # never alias the step's tensors
        for i, (path, fingerprint) in enumerate(zip(paths, self.fingerprints(images), strict=True)):
            self.entries[path] = ([f[i] for f in stored], fingerprint)


def train_images(trainer: "Trainer") -> tuple[int | None, int]:
    """``(images, batches)`` per epoch of the process whose cache is sized: images ``None`` if unknown.

    Under DDP the ``DistributedSampler`` hands each process a different share every epoch, so each process's
    cache still grows towards the whole training set: ``images`` is the whole set's size.
    """
    try:
        images = len(trainer.train_dataloader.dataset)
    except (AttributeError, TypeError):
        images = None
    return images, trainer.num_training_batches


class Stage2FeatureCache:
    """Stage-2 training targets (the frozen amplified features of a batch), from the cache when allowed.

    The policy: ``start(...)`` when training starts decides what can be known from the trainer (the cache is
    wanted, the training transforms are deterministic) and resets the counters; the first batch decides the
    rest (the batches carry image paths, the cache fits ``budget_gb``, float16 or float32 storage); an image
    that changes between epochs switches the cache off for the rest of the fit. Every decision against the
    cache is logged with its reason (``reason``). ``stop()`` frees the cache: it never enters a checkpoint.

    Args:
        enabled: Use the cache when allowed (``Aand(cache_features=...)``).
        budget_gb: Host memory the cache may take; above it every step recomputes the features.
        half_precision_rtol: Store float16 when that moves the first batch's loss by at most this share.
    """

    def __init__(
        self,
        enabled: bool = True,
        budget_gb: float = 4.0,
        half_precision_rtol: float = HALF_PRECISION_RTOL,
    ) -> None:
        self.requested = enabled
        self.budget_gb = budget_gb
        self.half_precision_rtol = half_precision_rtol
        self.store: FeatureStore | None = None
        self.reason: str | None = "training has not started"
        self.hits = self.stored = 0
        self.dtype: torch.dtype | None = None
        self._epoch_size: tuple[int | None, int] = (None, 0)
        self._processes = 1
        self._probe: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
        self._decided = False

    @property
    def enabled(self) -> bool:
        """Whether batches are now served from (and stored into) the cache."""
        return self.store is not None

    def __len__(self) -> int:
        """Images held now (0 once training ends)."""
        return 0 if self.store is None else len(self.store)

    def start(
        self,
        trainer: "Trainer",
        student: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        loss: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor],
        state: nn.Module,
    ) -> None:
        """Begin a fit: forget any earlier cache; refuse it now if it is off or the transforms are random.

        ``student`` and ``loss`` give the first batch's loss for the float16 decision; ``state``'s buffers
        (BatchNorm statistics) are restored after that probe.
        """
        self.stop()
        self.hits = self.stored = 0
        self.dtype = None
        self._decided = False
        self._epoch_size = train_images(trainer)
        self._processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))  # caches that share this machine
        self._probe = lambda features: _side_effect_free(state, lambda: loss(features, student(list(features))))
        self.reason = None
        if not self.requested:
            self.reason = "cache_features=False"
        elif found := _random_training_transforms(trainer):
            self.reason = f"the training transforms are random ({', '.join(found)}), so the features change every epoch"

    def stop(self) -> None:
        """Free the cache (training ended); the counters stay for inspection."""
        self.store = None
        self._probe = None

    def __call__(
        self,
        images: torch.Tensor,
        paths: Sequence[str] | None,
        compute: Callable[[torch.Tensor], list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """The batch's targets: cached when the cache holds them, else ``compute(images)`` (no gradients), stored."""
        if self.store is not None and paths is not None:
            try:
                cached = self.store.get(paths, images)
            except StaleCacheError as error:
                logger.warning("%s Stage 2 continues without the feature cache.", error)
                self.store = None
                self.reason = str(error)
            else:
                if cached is not None:
                    self.hits += 1
                    return cached
        with torch.no_grad():
            features = compute(images)
        if not self._decided:
            self._decided = True
            self._open(images, paths, features)
        if self.store is not None and paths is not None:
            self.store.put(paths, images, features)
            self.stored = len(self.store)
        return features

    def _open(self, images: torch.Tensor, paths: Sequence[str] | None, features: Sequence[torch.Tensor]) -> None:
        """On the first stage-2 batch: open the cache if allowed, else log why not."""
        if self.reason is None and (paths is None or any(path is None for path in paths)):
            self.reason = "the training batches carry no image paths to key the cache by"
        if self.reason is None:
            dtype = self._storage_dtype(features)
            count = self._epoch_size[0] or self._epoch_size[1] * len(images)
            needed_gb = count * FeatureStore.bytes_per_image(features, dtype) / 1e9
            budget_gb = self.budget_gb / self._processes  # each process on this machine holds its own cache
            if needed_gb > budget_gb:
                share = f" / {self._processes} processes on this machine" if self._processes > 1 else ""
                self.reason = (
                    f"it would take {needed_gb:.3g} GB for {count} images, over cache_budget_gb={self.budget_gb}"
                    f"{share}; raise the budget to use it"
                )
        if self.reason is not None:
            log = logger.warning if self.requested else logger.info
            log("AAND stage 2 recomputes the teacher features every step: %s.", self.reason)
            return
        logger.info(
            "AAND stage 2 trains from cached teacher features: %d images, %.3g GB in %s.",
            count,
            needed_gb,
            str(dtype).removeprefix("torch."),
        )
        self.dtype = dtype
        self.store = FeatureStore(dtype)

    def _storage_dtype(self, features: Sequence[torch.Tensor]) -> torch.dtype:
        """float16 when it fits the features and moves the first batch's loss by at most ``half_precision_rtol``."""
        if self._probe is None or any(f.abs().amax() >= torch.finfo(torch.float16).max for f in features):
            return torch.float32
        full = float(self._probe(features))
        half = float(self._probe([f.half().float() for f in features]))
        return torch.float16 if abs(half - full) <= self.half_precision_rtol * abs(full) else torch.float32


def _side_effect_free(state: nn.Module, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()`` without gradients, then ``state``'s buffers as they were (BatchNorm running statistics)."""
    buffers = list(state.buffers())
    saved = [b.clone() for b in buffers]
    with torch.no_grad():
        result = run()
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)
    return result


def _random_training_transforms(trainer: "Trainer") -> list[str]:
    """Random transforms among the datamodule's augmentations, the dataset's and the model's pre-processor."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
    pre_processor = getattr(getattr(trainer, "lightning_module", None), "pre_processor", None)
    transforms = [
        getattr(datamodule, "train_augmentations", None),
        getattr(dataset, "augmentations", None),
        getattr(pre_processor, "transform", None),
    ]
    return sorted({name for transform in transforms for name in random_transforms(transform)})
