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


def _trainer(fn: TrainerFn, step: int) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(fn=fn), global_step=step)


@pytest.mark.parametrize(
    ("fn", "saved_step", "threshold", "replaced"),
    [
        (TrainerFn.TESTING, 5, math.nan, True),  # anomalib re-tests the interrupted checkpoint it resumed from
        (TrainerFn.TESTING, 5, 0.7, False),  # a finished checkpoint (finite thresholds) is what the user asked for
        (TrainerFn.TESTING, 10, math.nan, False),  # not older than the run
        (TrainerFn.FITTING, 5, math.nan, False),  # resuming itself loads it
    ],
)
def test_retest_keeps_the_weights_this_run_trained(
    fn: TrainerFn, saved_step: int, threshold: float, replaced: bool
) -> None:
    trained = {"model.w": torch.ones(2)}
    checkpoint = {
        "global_step": saved_step,
        "state_dict": {"model.w": torch.zeros(2), "post_processor._image_threshold": torch.tensor(threshold)},
        "callbacks": {"x": 1},
    }
    keep_trained_weights_on_retest(_trainer(fn, 10), checkpoint, trained)
    assert (checkpoint["state_dict"] == trained) is replaced
    assert ("callbacks" not in checkpoint) is replaced


def test_quiet_import_silences_future_warnings_only() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_anomalib_import():
            warnings.warn("deprecated module", FutureWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [type(w.message) for w in caught] == [UserWarning]
