"""The workarounds of anomalib and Lightning behaviour, each on small objects (their wiring is in the slow tests)."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_aand.workarounds import (
    ddp_find_unused_parameters,
    keep_trained_weights_on_retest,
    quiet_anomalib_import,
)


def test_ddp_static_graph_is_refused_with_advice() -> None:
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(static_graph=True), logger=False)
    with pytest.raises(ValueError, match="without static_graph"):
        ddp_find_unused_parameters(trainer)


def _trainer(fn: TrainerFn, step: int, ckpt_path: str = "run/model.ckpt") -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(fn=fn), global_step=step, ckpt_path=ckpt_path)


@pytest.mark.parametrize(
    ("fn", "saved_step", "threshold", "resumed_from", "replaced"),
    [
        (TrainerFn.TESTING, 5, math.nan, "run/model.ckpt", True),  # anomalib re-tests the interrupted checkpoint
        (TrainerFn.TESTING, 5, 0.7, "run/model.ckpt", True),  # a finished run resumed to train longer: the new model
        (TrainerFn.TESTING, 5, 0.7, None, False),  # this run did not resume: the file is what the user asked for
        (TrainerFn.TESTING, 5, 0.7, "other/model.ckpt", False),  # it resumed from another file
        (TrainerFn.TESTING, 10, math.nan, "run/model.ckpt", False),  # not older than the run
        (TrainerFn.FITTING, 5, math.nan, "run/model.ckpt", False),  # resuming itself loads it
    ],
)
def test_retest_keeps_the_weights_this_run_trained(
    fn: TrainerFn, saved_step: int, threshold: float, resumed_from: str | None, replaced: bool
) -> None:
    trained = {"model.w": torch.ones(2)}
    checkpoint = {
        "global_step": saved_step,
        "state_dict": {"model.w": torch.zeros(2), "post_processor._image_threshold": torch.tensor(threshold)},
        "callbacks": {"x": 1},
    }
    keep_trained_weights_on_retest(_trainer(fn, 10), checkpoint, trained, resumed_from)
    assert (checkpoint["state_dict"] == trained) is replaced
    assert ("callbacks" not in checkpoint) is replaced


def test_quiet_import_silences_future_warnings_only() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_anomalib_import():
            warnings.warn("deprecated module", FutureWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [type(w.message) for w in caught] == [UserWarning]
