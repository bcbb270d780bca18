"""Stage-2 feature cache: the frozen amplified teacher features of every training image, computed once.

In AAND's second stage the teacher and the RAA modules are frozen and the training images carry no
synthetic anomalies, so with deterministic data every epoch would recompute the same features. The cache
holds them in one contiguous tensor per scale, a row per training image found by its path: in device memory
when it fits beside training, else in host memory (pinned on a GPU machine, so that copies to the device do
not block). A single process stores each image's features as its first stage-2 epoch computes them. Under DDP
the sampler hands each process another share of the images every epoch, so each process computes the whole
training set when stage 2 starts (one pass in dataset order) and every batch is served from the first stage-2
epoch on. Each hit checks, on the compute device, that the batch's images are the ones cached (a fingerprint of
the pre-processed tensor): random augmentations can never be served stale features, they only switch the cache
off. Batches keep coming from the datamodule's own loader, so batch order, epoch length, distributed sampling
and resuming stay Lightning's.
"""

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import Strategy

logger = logging.getLogger(__name__)

# Features are cached in float16 when that moves the first batch's loss by at most this share.
HALF_PRECISION_RTOL = 1e-3
# Share of the device memory free when stage 2 starts (after a training step's needs) that the cache may take.
DEVICE_MEMORY_SHARE = 0.9

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


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU index tensor on ``device``, without waiting for the device (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


class FeatureStore:
    """Amplified features of a training set: one ``(images, C, H, W)`` tensor per scale, a row per image.

    Args:
        shapes: Features of one image per scale, ``(C, H, W)``.
        count: Images in the training set.
        dtype: Storage precision (``torch.float16`` halves the memory; features come back as float32).
        compute_device: Where features are served and images fingerprinted (the training device).
        storage_device: Where the features live: ``compute_device``, or the CPU.
        pin_memory: Page-locked host storage, for non-blocking copies to the compute device.
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        count: int,
        dtype: torch.dtype,
        compute_device: torch.device,
        storage_device: torch.device,
        pin_memory: bool = False,
    ) -> None:
        self.dtype = dtype
        self.compute_device = compute_device
        self.pin_memory = pin_memory
        self.features = [
            torch.empty((count, *shape), dtype=dtype, device=storage_device, pin_memory=pin_memory) for shape in shapes
        ]
        self.fingerprints = torch.zeros(count, 2, dtype=torch.float64, device=compute_device)
        self.positions: dict[str, int] = {}
        self._projection: torch.Tensor | None = None
        self._copies_pending = False

    def __len__(self) -> int:
        """Images stored."""
        return len(self.positions)

    @property
    def nbytes(self) -> int:
        """Memory the features take."""
        return sum(storage.nbytes for storage in self.features)

    @staticmethod
    def bytes_per_image(features: Sequence[torch.Tensor], dtype: torch.dtype) -> int:
        """Storage of one image's features (all scales) in ``dtype``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(f[0].numel() for f in features) * itemsize

    def fingerprint(self, images: torch.Tensor) -> torch.Tensor:
        """Two fixed random projections per image (float64, on the images' device); equal images give equal values."""
        flat = images.detach().flatten(1).double()
        if self._projection is None or self._projection.shape[1] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            self._projection = torch.randn(2, flat.shape[1], generator=generator, dtype=torch.float64)
        self._projection = self._projection.to(flat.device)
        return flat @ self._projection.t()

    def put(self, start: int, paths: Sequence[str], images: torch.Tensor, features: Sequence[torch.Tensor]) -> None:
        """Store a batch in the rows from ``start`` on (non-blocking copies, in the storage dtype), keyed by path."""
        rows = slice(start, start + len(paths))
        for storage, feature in zip(self.features, features, strict=True):
            storage[rows].copy_(feature.detach(), non_blocking=True)
        self.fingerprints[rows] = self.fingerprint(images)
        self.positions.update((path, start + i) for i, path in enumerate(paths))
        self._copies_pending = self.pin_memory

    def get(self, paths: Sequence[str], images: torch.Tensor) -> list[torch.Tensor] | None:
        """The batch's features (float32, on the compute device), or ``None`` if an image is not in the store.

        Reads the device once (are all fingerprints equal?); raises ``StaleCacheError`` when an image changed.
        """
        positions = [self.positions.get(path) for path in paths]
        if None in positions:
            return None
        index = torch.tensor(positions)
        on_device = _to(index, self.compute_device)
        stored = self.fingerprints.index_select(0, on_device)
        same = torch.isclose(self.fingerprint(images), stored, rtol=1e-9, atol=1e-9).all(dim=1)
        if self._copies_pending:  # the host reads pinned rows that the device may still be writing
            torch.cuda.synchronize(self.compute_device)
            self._copies_pending = False
        if not bool(same.all()):
            changed = paths[same.tolist().index(False)]
            msg = f"Training image {changed!r} changed between epochs (random augmentation?)."
            raise StaleCacheError(msg)
        return [self._gather(storage, index, on_device) for storage in self.features]

    def _gather(self, storage: torch.Tensor, index: torch.Tensor, on_device: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of one scale as float32 on the compute device."""
        if storage.device == self.compute_device:
            return storage.index_select(0, on_device).float()
        if not self.pin_memory:
            return storage.index_select(0, index).to(self.compute_device, torch.float32)
        staged = torch.empty((len(index), *storage.shape[1:]), dtype=storage.dtype, pin_memory=True)
        torch.index_select(storage, 0, index, out=staged)
        return staged.to(self.compute_device, non_blocking=True).float()


class Stage2FeatureCache:
    """Stage-2 training targets (the frozen amplified features of a batch), from the cache when allowed.

    The policy: ``start(...)`` when training starts decides what can be known from the trainer (the cache is
    wanted, the training transforms are deterministic, the training set's size) and resets the counters. The first
    stage-2 batch decides the rest (the batches carry image paths; float16 or float32 storage, agreed by all
    processes; device memory, host memory, or no cache). A single process then stores each batch's features as its
    first stage-2 epoch computes them, and serves them from the second epoch on; under DDP, where each process sees
    another share of the images every epoch, ``fill(...)`` computes the whole training set when stage 2 starts, so
    every batch is served from the first epoch on. An image that changes between epochs switches the cache off for
    the rest of the fit. Every decision against the cache is logged with its reason (``reason``). ``stop()`` frees
    the cache: it never enters a checkpoint.

    Args:
        enabled: Use the cache when allowed (``Aand(cache_features=...)``).
        budget_gb: Host memory the caches of all processes on a machine may take together; a cache that fits
            the GPU's free memory goes there instead and does not count.
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
        self.placement: str | None = None
        self._count = 0
        self._processes = 1
        self._distributed = False
        self._strategy: Strategy | None = None
        self._probe: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
        self._state: nn.Module | None = None
        self._decided = False

    @property
    def enabled(self) -> bool:
        """Whether batches are served from the cache (or, in a single process's first stage-2 epoch, stored into it)."""
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
        """Begin a fit: forget any earlier cache; refuse it now if it is off or cannot work.

        It cannot when the training transforms are random or the training set's size is unknown. ``student`` and
        ``loss`` give the first batch's loss for the float16 decision and a training step's memory; ``state``'s
        buffers (BatchNorm statistics) are restored after each probe, its trainable parameters count towards that
        memory.
        """
        self.stop()
        self.hits = self.stored = 0
        self.dtype = None
        self.placement = None
        self._decided = False
        dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
        self._count = len(dataset) if hasattr(dataset, "__len__") else 0
        self._processes = max(1, int(getattr(trainer, "num_devices", 1) or 1))  # caches that share this machine
        self._distributed = int(getattr(trainer, "world_size", 1) or 1) > 1
        self._strategy = trainer.strategy
        self._probe = lambda features: _side_effect_free(state, lambda: loss(features, student(list(features))))
        self._state = state
        self.reason = None
        if not self.requested:
            self.reason = "cache_features=False"
        elif found := _random_training_transforms(trainer):
            self.reason = f"the training transforms are random ({', '.join(found)}), so the features change every epoch"
        elif not self._count:
            self.reason = "the training set's size is unknown (an iterable dataset)"

    def stop(self) -> None:
        """Free the cache (training ended); the counters stay for inspection."""
        self.store = None
        self._probe = None
        self._state = None
        self._strategy = None

    def fill(
        self,
        trainer: "Trainer",
        pre_process: Callable[[torch.Tensor], torch.Tensor] | None,
        compute: Callable[[torch.Tensor], list[torch.Tensor]],
        device: torch.device,
    ) -> None:
        """Under DDP, at the first stage-2 epoch of a fit: open the cache if allowed and compute the whole training set.

        One pass in dataset order over the training loader's dataset (same collate function, batch size and
        workers), the images moved to ``device`` and through ``pre_process`` as anomalib's pre-processor does with
        training batches, ``compute`` in float32 without gradients. Random number generators are left as they were.
        A single process does nothing here: its first stage-2 epoch fills the cache (``__call__``).
        """
        if not self._distributed or self._decided:
            return
        self._decided = True
        if self.reason is not None:
            self._log_refusal()
            return
        fork = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork), torch.no_grad(), torch.autocast(device.type, enabled=False):
            for index, (paths, images) in enumerate(_batches(trainer.train_dataloader, pre_process, device)):
                features = compute(images)
                if index == 0 and not self._open(paths, features, device):
                    return
                self._store(paths, images, features)
        self._log_opened()

    def __call__(
        self,
        images: torch.Tensor,
        paths: Sequence[str] | None,
        compute: Callable[[torch.Tensor], list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """The batch's targets: cached when the cache holds them, else ``compute(images)`` (no gradients), stored.

        In a single process the first stage-2 batch opens the cache and each new image's features are stored.
        """
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
            if self.reason is None:
                with torch.autocast(images.device.type, enabled=False):
                    opened = self._open(paths, [f.float() for f in features], images.device)
                if opened:
                    self._log_opened()
            else:
                self._log_refusal()
        if self.store is not None and paths is not None and not self._distributed:
            self._store(paths, images, features)
        return features

    def _store(self, paths: Sequence[str], images: torch.Tensor, features: Sequence[torch.Tensor]) -> None:
        """Put a batch of images the store does not hold yet into its next rows."""
        if self.store is None or any(path in self.store.positions for path in paths):
            return
        if len(self.store) + len(paths) <= self._count:
            self.store.put(len(self.store), paths, images, features)
            self.stored = len(self.store)

    def _open(self, paths: Sequence[str] | None, features: Sequence[torch.Tensor], device: torch.device) -> bool:
        """After the first batch: storage dtype (agreed by all processes), then where the store goes, if anywhere."""
        if paths is None or any(path is None for path in paths):
            self.reason = "the training batches carry no image paths to key the cache by"
            self._log_refusal()
            return False
        half = self._half_precision_keeps_loss(features)
        agreed = self._strategy.reduce_boolean_decision(half, all=True) if self._strategy is not None else half
        dtype = torch.float16 if agreed else torch.float32
        needed = self._count * FeatureStore.bytes_per_image(features, dtype)
        shapes = [f.shape[1:] for f in features]
        spare = self._spare_device_memory(features, device)
        if spare is not None and needed <= spare:
            self.placement = f"on {device}"
            self.dtype = dtype
            self.store = FeatureStore(shapes, self._count, dtype, device, device)
            return True
        budget_gb = self.budget_gb / self._processes  # each process on this machine holds its own copy
        if needed <= budget_gb * 1e9:
            pinned = device.type == "cuda"
            self.placement = "in pinned host memory" if pinned else "in host memory"
            self.dtype = dtype
            self.store = FeatureStore(shapes, self._count, dtype, device, torch.device("cpu"), pin_memory=pinned)
            return True
        share = f" / {self._processes} processes on this machine" if self._processes > 1 else ""
        gpu = f" and more than the {spare / 1e9:.3g} GB the GPU can spare" if spare is not None else ""
        self.reason = (
            f"it would take {needed / 1e9:.3g} GB for {self._count} images, over cache_budget_gb={self.budget_gb}"
            f"{share}{gpu}; raise the budget to use it"
        )
        self._log_refusal()
        return False

    def _log_opened(self) -> None:
        if self.store is None:
            return
        logger.info(
            "AAND stage 2 trains from cached teacher features: %d images, %.3g GB in %s, %s.",
            self._count,
            self.store.nbytes / 1e9,
            str(self.store.dtype).removeprefix("torch."),
            self.placement,
        )

    def _log_refusal(self) -> None:
        log = logger.warning if self.requested else logger.info
        log("AAND stage 2 recomputes the teacher features every step: %s.", self.reason)

    def _half_precision_keeps_loss(self, features: Sequence[torch.Tensor]) -> bool:
        """Whether float16 fits the features and moves the first batch's loss by at most ``half_precision_rtol``."""
        if self._probe is None or any(f.abs().amax() >= torch.finfo(torch.float16).max for f in features):
            return False
        with torch.no_grad():
            full = float(self._probe(features))
            half = float(self._probe([f.half().float() for f in features]))
        return abs(half - full) <= self.half_precision_rtol * abs(full)

    def _spare_device_memory(self, features: Sequence[torch.Tensor], device: torch.device) -> int | None:
        """CUDA memory the cache may take: ``DEVICE_MEMORY_SHARE`` of what is free after a training step's needs.

        A step's needs are measured on the first batch: twice the peak of the student's forward pass with gradients
        (activations kept for the backward pass, and their gradients), plus the student's gradients and Adam's two
        moments. ``None`` off CUDA.
        """
        if device.type != "cuda" or self._probe is None or self._state is None:
            return None
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.enable_grad():
            self._probe(features)
        activations = torch.cuda.max_memory_allocated(device) - before
        parameters = sum(p.nbytes for p in self._state.parameters() if p.requires_grad)
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # held by this process
        return max(0, int(DEVICE_MEMORY_SHARE * (free - 2 * activations - 3 * parameters)))


def _batches(
    loader: DataLoader, pre_process: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device
) -> Iterator[tuple[Sequence[str] | None, torch.Tensor]]:
    """``(paths, images)`` of the training loader's dataset once, in order, pre-processed on ``device``."""
    for batch in _in_order(loader):
        images = batch.image.to(device, non_blocking=True)
        yield getattr(batch, "image_path", None), images if pre_process is None else pre_process(images)


def _in_order(loader: DataLoader) -> DataLoader:
    """The training loader's dataset once, in order: same collate function, batch size and workers."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size or 1,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
    )


def _side_effect_free(state: nn.Module, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()``, then ``state``'s buffers as they were (BatchNorm running statistics)."""
    buffers = list(state.buffers())
    saved = [b.clone() for b in buffers]
    result = run()
    with torch.no_grad():
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
