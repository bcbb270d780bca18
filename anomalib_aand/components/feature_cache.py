"""Stage-2 feature cache: the frozen amplified teacher features of each training image, computed once.

In AAND's second stage the teacher and the RAA modules are frozen and the training images carry no
synthetic anomalies, so with deterministic data every epoch would recompute the same features. The
cache keys them by image path and checks, on every hit, that the image is the one cached (a
fingerprint of the pre-processed tensor): random augmentations can never be served stale features,
they only switch the cache off. Batches keep coming from the datamodule's own loader, so batch order,
epoch length, distributed sampling and resuming stay Lightning's.
"""

from collections.abc import Iterable, Sequence

import torch
from torch import nn

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


class FeatureCache:
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
