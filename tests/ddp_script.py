"""Train AAND through anomalib's Engine, in one process or under DDP, and dump what each process saw.

Run as a script (Lightning's DDP launcher starts the other processes by running it again):
``python tests/ddp_script.py --root R --out O --devices 2``. Each process writes ``O/rank<r>.json``:
the sampler, the images, stage and both learning rates of every epoch, the training losses next to the
loss of the uncached path, the stage-2 cache's statistics, hashes of the weights after each stage, the
images of validation and test, the thresholds and normalisation statistics, and the test metrics.
A second checkpoint callback keeps every epoch's checkpoint in ``O/epochs``.
"""

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from anomalib_aand import Aand


def tensor_hashes(module: torch.nn.Module, buffers: bool) -> dict[str, str]:
    """SHA-256 of every parameter (or buffer) of ``module``, by name."""
    items = module.named_buffers() if buffers else module.named_parameters()
    return {name: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for name, t in items}


class Probe(Callback):
    """Records, per process, what the tests compare across processes and with one process."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict[str, Any] = {"epochs": [], "steps": [], "val_paths": [], "test_paths": []}
        self.uncached: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.record["start"] = {"parameters": tensor_hashes(pl_module.model, buffers=False)}
        self.record["threads"] = torch.get_num_threads()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        self.record["sampler"] = type(sampler).__name__
        self.record["sync_batchnorm"] = any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules())
        lrs = [config.scheduler.get_last_lr()[0] for config in trainer.lr_scheduler_configs]
        entry = {"epoch": trainer.current_epoch, "stage": pl_module.stage, "lr": lrs, "paths": []}
        self.record["epochs"].append(entry)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        del trainer, batch_idx
        self.record["epochs"][-1]["paths"].extend(batch.image_path)
        self.uncached = None
        if pl_module.stage != 2:
            return
        model = pl_module.model
        student = [b for m in (model.bottleneck, model.decoder) for b in m.buffers()]
        saved = [b.clone() for b in student]
        # the loss the uncached path computes, with the same weights (anomalib pre-processes after this hook)
        with torch.no_grad():
            amplified = model.amplified_features(pl_module.pre_processor.transform(batch.image))
            self.uncached = float(pl_module.distillation_loss(amplified, model.distill(amplified)))
            for buffer, value in zip(student, saved, strict=True):
                buffer.copy_(value)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        del batch, batch_idx
        step = {"epoch": trainer.current_epoch, "stage": pl_module.stage, "loss": float(outputs["loss"])}
        step["uncached"] = self.uncached
        self.record["steps"].append(step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        targets = pl_module.feature_cache
        if targets.enabled:
            self.record.setdefault("cache", []).append(
                {
                    "epoch": trainer.current_epoch,
                    "keys": sorted(targets.store.positions),
                    "hits": targets.hits,
                    "dtype": str(targets.dtype),
                }
            )
        epoch, stage1 = trainer.current_epoch, pl_module.stage1_epochs
        if epoch in {stage1 - 1, trainer.max_epochs - 1}:
            self.record[f"stage{pl_module.stage}"] = {
                "parameters": tensor_hashes(pl_module.model, buffers=False),
                "buffers": tensor_hashes(pl_module.model, buffers=True),
            }

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        del trainer, pl_module, outputs, args
        self.record["val_paths"].extend(batch.image_path)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        del trainer, pl_module, outputs, args
        self.record["test_paths"].extend(batch.image_path)

    def _post_processing(self, pl_module: LightningModule) -> dict[str, float]:
        post = pl_module.post_processor
        return {
            "image_threshold": float(post.image_threshold),
            "pixel_threshold": float(post.pixel_threshold),
            **{name: float(getattr(post, name)) for name in ("image_min", "image_max", "pixel_min", "pixel_max")},
        }

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["fit_post_processing"] = self._post_processing(pl_module)
        self.record["final"] = {
            "parameters": tensor_hashes(pl_module.model, buffers=False),
            "buffers": tensor_hashes(pl_module.model, buffers=True),
        }
        self._dump(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["test_post_processing"] = self._post_processing(pl_module)
        self.record["test_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if "_" in k}
        self._dump(trainer)

    def _dump(self, trainer: Trainer) -> None:
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--stage1", type=int, default=1)
    parser.add_argument("--stage2", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--no-test", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(7, workers=True)
    model = Aand(
        backbone="resnet18",
        pre_trained=False,
        stage1_epochs=args.stage1,
        stage2_epochs=args.stage2,
        cache_budget_gb=args.budget,
        pre_processor=Aand.configure_pre_processor(image_size=(64, 64)),
    )
    datamodule = MVTecAD(
        root=args.root,
        category="toy",
        train_batch_size=args.batch,
        eval_batch_size=args.batch,
        num_workers=0,
    )
    # mode="max" (no effect without a monitor) only gives it a state key of its own beside anomalib's checkpoint
    epochs = ModelCheckpoint(
        dirpath=out / "epochs", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True, mode="max"
    )
    engine = Engine(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        default_root_dir=out / "runs",
        callbacks=[Probe(out), epochs],
        logger=False,
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=datamodule, ckpt_path=args.ckpt)
    if not args.no_test:
        engine.test(model, datamodule=datamodule)


if __name__ == "__main__":
    main()
