"""Workarounds of anomalib and Lightning behaviour that AAND's two-stage training runs into.

Each is one function, called in one line from a hook of ``Aand`` (``allow_non_ascii_paths``: when the
package is imported, as datamodules are set up before any hook runs); its docstring names the upstream
behaviour and the versions it was seen in (anomalib 2.7.0, lightning 2.6.6). Remove a function when
the versions the package supports no longer behave that way.
"""

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

logger = logging.getLogger(__name__)


def save_checkpoint_every_epoch(trainer: Trainer) -> None:
    """Make anomalib's checkpoint callback save at the end of every training epoch.

    anomalib 2.7.0's ``Engine`` adds a ``ModelCheckpoint`` without ``monitor``; with validation only after
    the last epoch (``Aand.trainer_arguments``), lightning 2.6.6 then saves only after that validation, so an
    interrupted run leaves no checkpoint to resume from. Lightning decides this with the private
    ``ModelCheckpoint._save_on_train_epoch_end`` (``None``: "after validation if there is any"); a callback
    configured by the user (a ``monitor``, or that attribute set) is left alone.
    """
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is None and callback._save_on_train_epoch_end is None:  # noqa: SLF001
            callback._save_on_train_epoch_end = True  # noqa: SLF001


def keep_trained_weights_on_retest(
    trainer: Trainer | None,
    checkpoint: dict[str, Any],
    state_dict: Mapping[str, torch.Tensor],
) -> None:
    """Keep the weights this run trained when anomalib reloads the checkpoint the run resumed from.

    ``anomalib train --ckpt_path X`` (anomalib 2.7.0) resumes from ``X``, then calls ``Engine.test`` with the
    same ``ckpt_path=X``: lightning 2.6.6 loads ``X`` again, which would test the interrupted run's weights
    (without thresholds) instead of the finished model. When not fitting, a checkpoint older than the
    trainer's step and without finite thresholds (anomalib's private post-processor buffer
    ``post_processor._image_threshold``) is replaced by the module's own ``state_dict``; its callback state
    (the thresholds live there too) is dropped.
    """
    threshold = checkpoint["state_dict"].get("post_processor._image_threshold", torch.tensor(0.0))
    if (
        trainer is None
        or trainer.state.fn == TrainerFn.FITTING
        or checkpoint.get("global_step", 0) >= trainer.global_step
        or torch.isfinite(threshold).all()
    ):
        return
    logger.warning(
        "anomalib reloads the interrupted checkpoint (step %d) this run resumed from; keeping the model "
        "trained in this run (step %d) instead.",
        checkpoint.get("global_step", 0),
        trainer.global_step,
    )
    checkpoint["state_dict"] = dict(state_dict)
    checkpoint.pop("callbacks", None)


def check_dataset_before_download(trainer: Trainer | None) -> None:
    """Refuse a mistyped dataset folder before anomalib downloads a dataset into it, and unpaired masks.

    anomalib 2.7.0's datamodules (MVTecAD, Visa, ...) download their dataset in ``prepare_data`` when the
    category folder is missing, so a typo in ``--data.root``/``--data.category`` starts a multi-GB download.
    ``configure_callbacks`` is the first module hook lightning 2.6.6 calls with the datamodule attached and
    before ``prepare_data``: the check runs there (``check_dataset_folder``). So does ``check_masks_present``:
    the datamodule's ``setup``, which lightning runs before the module's ``setup`` hook, pairs masks with
    defective images (MVTecAD, Folder) and fails with a pandas/numpy error naming no file when one is missing.
    """
    from .components.data_checks import check_dataset_folder, check_masks_present

    if trainer is not None and trainer.datamodule is not None:
        check_dataset_folder(trainer.datamodule)
        check_masks_present(trainer.datamodule)


def _contains_non_printable_characters(path: str | Path) -> bool:
    """True when ``path`` holds a character that is not printable (control characters, invisible separators)."""
    return not str(path).isprintable()


def allow_non_ascii_paths() -> None:
    """Let dataset paths hold non-ASCII letters (``données/``, ``検査/``).

    anomalib 2.7.0's ``validate_path`` (``anomalib.data.utils.path``), which MVTecAD, Folder and other
    datasets call on their folders in ``setup``, refuses every path outside printable ASCII
    (characters 0x20 to 0x7E) as "Path contains non-printable characters". This replaces the module's
    ``contains_non_printable_characters`` with one that refuses only what is not printable
    (``str.isprintable``: a newline, NUL or other control character stays refused).
    """
    from anomalib.data.utils import path

    if hasattr(path, "contains_non_printable_characters"):
        path.contains_non_printable_characters = _contains_non_printable_characters


def ddp_find_unused_parameters(trainer: Trainer) -> None:
    """Let DDP train a model whose stages leave parameters without gradients, with no flag from the user.

    AAND's stage 1 trains only the RAA modules and stage 2 only the student (one optimiser each, manual
    optimisation), so every backward leaves the other stage's parameters unused (and anomalib 2.7.0's RD4AD
    bottleneck holds ``conv4``/``bn4``, which it never calls). Lightning 2.6.6's ``DDPStrategy``
    (``--trainer.strategy ddp``, and ``auto`` on several devices) wraps the module with
    ``find_unused_parameters=False``, and DDP then stops at the second step ("parameters that were not used in
    producing the loss"). The LightningModule's ``setup`` hook runs before ``DDPStrategy.setup`` wraps the
    module, so this sets the flag there, in the strategy's (private) ``_ddp_kwargs``, exactly as the registered
    strategy ``ddp_find_unused_parameters_true`` does. Frozen parameters (the teacher) are not registered with
    DDP at all; the idle stage's parameters are detected as unused each step (one graph traversal) and their
    gradient buckets are reduced as zeros.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or strategy._ddp_kwargs.get("find_unused_parameters"):  # noqa: SLF001
        return
    if strategy._ddp_kwargs.get("static_graph"):  # noqa: SLF001
        msg = (
            "AAND trains different parameters in its two stages, which DDP's static_graph=True does not allow. "
            "Use --trainer.strategy ddp without static_graph."
        )
        raise ValueError(msg)
    strategy._ddp_kwargs["find_unused_parameters"] = True  # noqa: SLF001
    logger.debug("DDP: find_unused_parameters=True (each AAND stage trains only its own modules).")


def broadcast_buffers_from_rank_zero(module: torch.nn.Module, trainer: Trainer) -> None:
    """Give every process rank 0's buffers (the student's BatchNorm running statistics).

    Under DDP each process updates its BatchNorm running statistics from its own images; torch 2.14's
    ``DistributedDataParallel`` (``broadcast_buffers=True``) copies rank 0's buffers to the others only at the
    start of the next training forward, and Lightning 2.6.6's validation during ``fit`` does not. Without this,
    the processes end an epoch with different statistics, and validation (thresholds, normalisation) would
    score each process's share of the images with a slightly different model than the checkpoint (rank 0's).
    """
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


@contextlib.contextmanager
def quiet_anomalib_import() -> Iterator[None]:
    """Import anomalib inside this block without its import-time ``FutureWarning``s.

    ``import anomalib.deploy`` (anomalib 2.7.0, timm 1.0.31) imports every model, which warns twice before a tool
    prints anything: timm's "Importing from timm.models.layers is deprecated" and anomalib's "The
    anomalib.models.components.dinov2 package is deprecated". Neither concerns AAND or its user. Only
    ``FutureWarning``s raised while the block runs are ignored.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
