"""Workarounds of anomalib and Lightning behaviour that AAND's two-stage training runs into.

Each is one function, called in one line from a hook of ``Aand`` (``allow_non_ascii_paths`` and the three
``..._in_anomalib_cli``: when the package is imported, as datamodules are set up and the CLI builds the model
before any hook runs); its docstring names the upstream
behaviour and the versions it was seen in (anomalib 2.7.0, lightning 2.6.6, jsonargparse 4.46.0, torch 2.14).
Remove a function when the versions the package supports no longer behave that way.
"""

import contextlib
import functools
import logging
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
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


def keep_previous_checkpoint_on_failed_save(trainer: Trainer) -> None:
    """Save checkpoints so that a failed save (a full disk) leaves the previous checkpoint intact.

    anomalib 2.7.0 saves every epoch into the same ``weights/lightning/model.ckpt``. Lightning 2.6.6's
    ``TorchCheckpointIO`` (``_atomic_save``) writes the new file through an fsspec transaction: a temporary file in
    ``$TMPDIR``, then ``shutil.move`` onto the checkpoint. When ``$TMPDIR`` is on another filesystem (a tmpfs
    ``/tmp``, results on a data disk or NFS), the move copies, and the copy truncates the old checkpoint first:
    ``ENOSPC`` then leaves a cut-off file and nothing to resume from. ``CheckedCheckpointIO`` writes beside the
    target and renames (and checks what it loads); it replaces only Lightning's default IO and the one anomalib's
    ``Engine`` installs (``AnomalibCheckpointIO``, whose allowed types it keeps), never a user's own.
    """
    from anomalib.engine.plugins import AnomalibCheckpointIO

    from .components.checkpoints import CheckedCheckpointIO

    current = trainer.strategy.checkpoint_io
    if type(current) in {TorchCheckpointIO, AnomalibCheckpointIO}:
        trainer.strategy.checkpoint_io = CheckedCheckpointIO(getattr(current, "extra_safe_globals", None))


def evaluator_state_follows_the_model(checkpoint: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load trained weights into a model built with another evaluator (``evaluator=False``, or a user's own).

    anomalib 2.7.0's ``AUPRO`` keeps ``fpr_limit`` in a persistent buffer, so a checkpoint of Aand (whose default
    evaluator has AUPRO) holds ``evaluator.test_metrics.5.fpr_limit``, and lightning 2.6.6's strict loading refuses
    it for a model without that metric ("Unexpected key(s) in state_dict"); no built-in model's default evaluator
    has AUPRO, so theirs load. The evaluator is configuration, not training: the checkpoint's ``evaluator.``
    entries are replaced by those of the model it is loaded into (``state_dict``).
    """
    saved = {key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("evaluator.")}
    saved.update({key: value for key, value in state_dict.items() if key.startswith("evaluator.")})
    checkpoint["state_dict"] = saved


def keep_trained_weights_on_retest(
    trainer: Trainer | None,
    checkpoint: dict[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    resumed_from: str | Path | None,
) -> None:
    """Keep the weights this run trained when anomalib reloads the checkpoint the run resumed from.

    ``anomalib train --ckpt_path X`` (anomalib 2.7.0) resumes from ``X``, then calls ``Engine.test`` with the
    same ``ckpt_path=X``: lightning 2.6.6 loads ``X`` again, which would test the interrupted run's weights
    (without thresholds), or, when a finished run was resumed to train longer, print the old model's metrics.
    When not fitting, the checkpoint this trainer's fit resumed from (``resumed_from``), if older than the
    trainer's step, is replaced by the module's own ``state_dict``; its callback state (the thresholds live
    there too) is dropped.
    """
    if (
        trainer is None
        or trainer.state.fn == TrainerFn.FITTING
        or resumed_from is None
        or trainer.ckpt_path is None
        or Path(trainer.ckpt_path).resolve() != Path(resumed_from).resolve()
        or checkpoint.get("global_step", 0) >= trainer.global_step
    ):
        return
    logger.warning(
        "anomalib reloads the checkpoint (step %d) this run resumed from; keeping the model trained in this run "
        "(step %d) instead.",
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


def _wrap_cli_method(method: str, name: str, wrapper: Callable[[Callable[[Any], None], Any], None]) -> None:
    """Wrap anomalib's ``AnomalibCLI.<method>`` with ``wrapper(original, cli)``, once per ``name``."""
    from anomalib.cli.cli import AnomalibCLI

    original = getattr(AnomalibCLI, method)
    if name in getattr(original, "aand_workarounds", ()):
        return

    @functools.wraps(original)
    def wrapped(cli: Any) -> None:  # noqa: ANN401  (an AnomalibCLI)
        wrapper(original, cli)

    wrapped.aand_workarounds = {*getattr(original, "aand_workarounds", ()), name}
    setattr(AnomalibCLI, method, wrapped)


def _seed_then_instantiate(instantiate: Callable[[Any], None], cli: Any) -> None:  # noqa: ANN401
    from lightning.pytorch import seed_everything

    config = cli.config.get(str(cli.subcommand), cli.config)
    seed = config.get("seed_everything") if hasattr(config, "get") else None
    if seed is True:  # a process launched for DDP inherits rank 0's seed
        seed = int(os.environ.get("PL_GLOBAL_SEED") or secrets.randbelow(2**31))
    if seed is not None and seed is not False:
        config["seed_everything"] = seed_everything(seed, workers=True)
    instantiate(cli)


def seed_everything_in_anomalib_cli() -> None:
    """Make ``anomalib train/fit/test/... --seed_everything N`` seed the run, as its help text says.

    anomalib 2.7.0's ``AnomalibCLI`` declares ``--seed_everything`` ("Set to an int to run seed_everything with this
    value before classes instantiation. Set to True to use a random seed.", default ``True``) but, unlike
    lightning 2.6.6's ``LightningCLI._set_seed``, never calls ``seed_everything``: two runs of one configuration
    start from different weights and synthetic anomalies. This seeds before the classes are built, as
    ``LightningCLI`` does, but with ``True`` (the default) drawing a random seed as anomalib's help says (lightning
    2.6.6's ``seed_everything(None)`` would give every run seed 0), or taking ``PL_GLOBAL_SEED`` in a process that
    Lightning launched for DDP; ``False`` seeds nothing. The seed used is written into the configuration, which the
    run's ``config.yaml`` records.
    """
    _wrap_cli_method("instantiate_classes", "seed_everything", _seed_then_instantiate)


def _model_error(cli: Any) -> Exception | None:  # noqa: ANN401
    """The exception that Aand's constructor raises for the CLI's model arguments, or None."""
    from .lightning_model import Aand

    config = cli.config.get(str(cli.subcommand), cli.config)
    model = config.get("model") if hasattr(config, "get") else None
    class_path = getattr(model, "class_path", None)
    if not isinstance(class_path, str) or class_path.rsplit(".", 1)[-1] != "Aand":
        return None
    init_args = dict(vars(model.get("init_args") or {}))
    plain = {key: value for key, value in init_args.items() if not hasattr(value, "class_path")}
    try:
        Aand(**plain)
    except Exception as error:  # noqa: BLE001  (whatever the constructor raises is the user's answer)
        return error
    return None


def _model_errors_last(instantiate: Callable[[Any], None], cli: Any) -> None:  # noqa: ANN401
    try:
        instantiate(cli)
    except ValueError as error:
        cause = _model_error(cli)
        if cause is None:
            raise
        print(f"error: --model {cli.config[cli.subcommand]['model'].class_path}: {cause}", file=sys.stderr)
        raise SystemExit(2) from error


def model_errors_last_in_anomalib_cli() -> None:
    """End an ``anomalib`` command whose model arguments Aand refuses with Aand's message, exit code 2.

    jsonargparse 4.46.0 builds the model inside a ``Union[AnomalibModule, None]`` and turns the constructor's
    exception into "Does not validate against any of the Union subtypes", whose last lines are the model's whole
    ``Namespace(...)``; anomalib 2.7.0 prints it with a 200-line traceback, Aand's sentence (an unknown backbone, a
    layer that does not exist, a negative epoch count) somewhere in the middle. When building the model fails,
    the constructor is called once more with the plain arguments; its exception, if any, is printed as
    ``error: ...`` (as jsonargparse prints an argument it cannot parse) and the command exits with code 2.
    """
    _wrap_cli_method("instantiate_classes", "model_errors_last", _model_errors_last)


def _input_errors_without_traceback(run: Callable[[Any], None], cli: Any) -> None:  # noqa: ANN401
    from .components.errors import AandInputError
    from .components.teacher import TeacherError

    try:
        run(cli)
    except (AandInputError, TeacherError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


def input_errors_without_traceback_in_anomalib_cli() -> None:
    """End an ``anomalib`` command that Aand refuses for its input with Aand's message alone, exit code 2.

    anomalib 2.7.0's CLI lets every exception of a run through, and its rich handler prints some 100 lines of
    traceback through Lightning and anomalib before the message. Aand's ``AandInputError`` and ``TeacherError``
    (a dataset, image, mask, checkpoint, export setting or teacher weight file it cannot use) are mistakes in
    the command's input, not failures of the code: only the message is printed, as ``error: ...`` (as
    jsonargparse prints an argument it cannot parse), and the command exits with code 2.
    """
    _wrap_cli_method("_run_subcommand", "input_errors", _input_errors_without_traceback)


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
