"""AAND as an anomalib model: both training stages in one ``fit``.

Tang et al., "Advancing Pre-trained Teacher: Towards Robust Feature Discrepancy for Anomaly
Detection", arXiv 2405.02068. Epochs ``[0, stage1_epochs)`` train the Residual Anomaly
Amplification modules on synthetic anomalies; the next ``stage2_epochs`` train the
reverse-distillation student on the amplified features of normal images. The stage is read from
the epoch, so a checkpoint saved in either stage resumes in the right one.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torchvision.transforms.v2 import Normalize

from .components.checks import (
    check_checkpoint,
    check_checkpoint_file,
    check_datamodule,
    check_dataset_folder,
    check_finite_losses,
)
from .components.feature_cache import FeatureCache, StaleCacheError, random_transforms
from .components.synthesis import AnomalySynthesizer, mask_at
from .components.teacher import load_teacher_weights
from .loss import amplification_loss, cosine_loss, focal_loss, hkd_loss
from .torch_model import AandModel

logger = logging.getLogger(__name__)

# Stage-2 features are cached in float16 when that moves the first batch's loss by at most this share.
HALF_PRECISION_RTOL = 1e-3


class Aand(AnomalibModule):
    """AAND: Anomaly Amplification (stage 1) and Normality Distillation (stage 2).

    Args:
        backbone: timm CNN teacher (``features_only``); paper: ``wide_resnet50_2``.
        layers: Teacher layers, shallow to deep.
        pre_trained: Load ImageNet weights into the teacher when training starts.
        backbone_weights: Local teacher weight file (timm or torchvision state dict), for machines
            without a network; used instead of a download.
        stage1_epochs: Epochs of anomaly amplification; 0 skips it and drops the RAA modules.
        stage2_epochs: Epochs of normality distillation.
        learning_rate: Adam learning rate of both stages.
        num_keys: ``M``: each residual gate holds ``2M`` keys.
        gate_temperature: Softmax temperature of the gate's key matching.
        focal_alpha: Focal loss alpha (gate).
        focal_gamma: Focal loss gamma (gate).
        amplification_weight: Weight of the amplification loss in stage 1.
        amplification_margin: Margin of the amplification loss.
        hkd_top_k: Positions per image in the hard part of the HKD loss.
        distillation_loss: ``"hkd"`` (AAND) or ``"cosine"`` (RD4AD's plain loss, for ablations).
        anomaly_probability: Share of stage-1 images that get a synthetic anomaly.
        anomaly_source_path: Folder of textures for the synthetic anomalies (paper: DTD); ``None``
            blends Perlin noise.
        foreground_mask: Keep synthetic anomalies on an automatic foreground mask.
        cache_features: In stage 2, compute the frozen amplified features of each training image once
            and train the student from that cache, when the training images are the same every epoch
            (checked); ``False`` recomputes them every step.
        cache_budget_gb: Host memory the stage-2 feature cache may take; above it stage 2 runs uncached.
        pre_processor: anomalib pre-processor, or ``True`` for Resize(256) + ImageNet Normalize.
        post_processor: anomalib post-processor, or ``True`` for the default.
        evaluator: anomalib evaluator, or ``True`` for image/pixel AUROC, F1 and AUPRO.
        visualizer: anomalib visualizer, or ``True`` for the default.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        stage1_epochs: int = 100,
        stage2_epochs: int = 120,
        learning_rate: float = 0.005,
        num_keys: int = 50,
        gate_temperature: float = 0.2,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        amplification_weight: float = 0.1,
        amplification_margin: float = 0.3,
        hkd_top_k: int = 10,
        distillation_loss: Literal["hkd", "cosine"] = "hkd",
        anomaly_probability: float = 0.8,
        anomaly_source_path: str | None = None,
        foreground_mask: bool = False,
        cache_features: bool = True,
        cache_budget_gb: float = 4.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        _check_schedule(stage1_epochs, stage2_epochs, learning_rate)
        if distillation_loss not in {"hkd", "cosine"}:
            msg = f"distillation_loss must be 'hkd' or 'cosine', got {distillation_loss!r}."
            raise ValueError(msg)
        if num_keys < 1:
            msg = f"num_keys must be at least 1 (the paper uses 50), got {num_keys}."
            raise ValueError(msg)
        if hkd_top_k < 1:
            msg = f"hkd_top_k must be at least 1 (the paper uses 10), got {hkd_top_k}."
            raise ValueError(msg)
        if not 0.0 <= anomaly_probability <= 1.0:
            msg = f"anomaly_probability must lie in [0, 1], got {anomaly_probability}."
            raise ValueError(msg)
        if not (isinstance(cache_budget_gb, int | float) and math.isfinite(cache_budget_gb) and cache_budget_gb >= 0):
            msg = f"cache_budget_gb must be a number of gigabytes >= 0, got {cache_budget_gb!r}."
            raise ValueError(msg)
        self.stage1_epochs = stage1_epochs
        self.stage2_epochs = stage2_epochs
        self.model = AandModel(
            backbone=backbone,
            layers=layers,
            num_keys=num_keys,
            gate_temperature=gate_temperature,
            amplification=stage1_epochs > 0,
        )
        if self.input_size is not None:
            self._check_input_size(tuple(self.input_size))
        self.synthesizer: AnomalySynthesizer | None = None  # built when a stage-1 epoch starts
        self.register_buffer("teacher_initialised", torch.tensor(False))
        self._accepted_sizes: set[tuple[int, ...]] = set()
        self.automatic_optimization = False
        self._feature_cache: FeatureCache | None = None  # a plain attribute: never in a checkpoint
        self._cache_decided = False
        self._batch_paths: Sequence[str] | None = None

    # ------------------------------------------------------------------ set-up
    def _build_synthesizer(self) -> AnomalySynthesizer:
        transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
        normalize = extract_transforms_by_type(transform, Normalize) if transform is not None else []
        mean = torch.tensor(normalize[0].mean) if normalize else None
        std = torch.tensor(normalize[0].std) if normalize else None
        return AnomalySynthesizer(
            probability=self.hparams.anomaly_probability,
            anomaly_source_path=self.hparams.anomaly_source_path,
            foreground_mask=self.hparams.foreground_mask,
            mean=mean,
            std=std,
        )

    @property
    def _size_stride(self) -> int:
        """Image sides must be multiples of this: twice the deepest teacher layer's reduction."""
        return 2 * self.model.reductions[-1]

    def _check_input_size(self, size: tuple[int, int]) -> None:
        """Refuse image sizes the student cannot mirror, or too small for ``hkd_top_k``."""
        stride = self._size_stride
        if any(s % stride for s in size):
            ok = [stride * k for k in range(max(1, size[0] // stride), size[0] // stride + 3)]
            msg = (
                f"Image size {size[0]}x{size[1]} does not suit backbone {self.hparams.backbone!r} with layers "
                f"{list(self.hparams.layers)}: height and width must be multiples of {stride}, e.g. {ok}. "
                "Set the pre-processor's Resize (or the data's image size) accordingly."
            )
            raise ValueError(msg)
        smallest = (size[0] // self.model.reductions[-1]) * (size[1] // self.model.reductions[-1])
        if self.hparams.hkd_top_k > smallest:
            msg = (
                f"hkd_top_k={self.hparams.hkd_top_k} exceeds the {smallest} positions of the coarsest feature map "
                f"at image size {size[0]}x{size[1]}; lower it or use larger images."
            )
            raise ValueError(msg)

    def configure_callbacks(self) -> Any:
        """Anomalib's callbacks; first refuse a missing dataset folder (this runs before any download)."""
        if self._trainer is not None and self.trainer.datamodule is not None:
            check_dataset_folder(self.trainer.datamodule)
        return super().configure_callbacks()

    def setup(self, stage: str) -> None:
        """Check the images the stage will read; save a checkpoint every epoch while fitting."""
        if self.trainer.datamodule is not None:
            check_datamodule(self.trainer.datamodule, stage)
        if stage == "fit":
            for callback in self.trainer.checkpoint_callbacks:
                # anomalib validates once, at the end; without this an interrupted run leaves no checkpoint
                if callback.monitor is None and callback._save_on_train_epoch_end is None:  # noqa: SLF001
                    callback._save_on_train_epoch_end = True  # noqa: SLF001

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another model or another backbone with a clear message.

        ``anomalib train --ckpt_path`` resumes, then tests with the same ``ckpt_path``, which would put the
        interrupted run's weights (without thresholds) back: a model that trained further keeps its own.
        """
        check_checkpoint(checkpoint, self.state_dict(), self.hparams)
        threshold = checkpoint["state_dict"].get("post_processor._image_threshold", torch.tensor(0.0))
        if (
            self._trainer is not None
            and self.trainer.state.fn != TrainerFn.FITTING
            and checkpoint.get("global_step", 0) < self.trainer.global_step
            and not torch.isfinite(threshold).all()
        ):
            logger.warning(
                "anomalib reloads the interrupted checkpoint (step %d) this run resumed from; keeping the model "
                "trained in this run (step %d) instead.",
                checkpoint.get("global_step", 0),
                self.trainer.global_step,
            )
            checkpoint["state_dict"] = self.state_dict()
            checkpoint.pop("callbacks", None)  # the post-processor's thresholds are callback state too
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> "Aand":
        """Load a trained model (``weights_only=True``, offline); a damaged file raises a clear error."""
        check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _check_batch(self, images: torch.Tensor) -> None:
        """Refuse batches of a size the student cannot mirror (e.g. a pre-processor without Resize)."""
        size = tuple(images.shape[-2:])
        if size not in self._accepted_sizes:
            self._check_input_size(size)
            self._accepted_sizes.add(size)

    def on_fit_start(self) -> None:
        """Load the teacher's ImageNet weights once; a resumed or loaded model already has them."""
        if bool(self.teacher_initialised):
            return
        if self.hparams.backbone_weights is not None or self.hparams.pre_trained:
            load_teacher_weights(self.model.teacher, self.hparams.backbone, self.hparams.backbone_weights)
        else:
            logger.warning("pre_trained=False: the %s teacher keeps random weights.", self.hparams.backbone)
        self.teacher_initialised.fill_(True)

    def configure_optimizers(self) -> tuple[list[optim.Optimizer], list[optim.lr_scheduler.LRScheduler]]:
        """Adam (lr, betas 0.5/0.999) and MultiStepLR (80 % / 90 % of the stage, gamma 0.2) per stage."""
        raa_params = list(self.model.raa.parameters()) if self.model.raa is not None else []
        student_params = list(self.model.bottleneck.parameters()) + list(self.model.decoder.parameters())
        optimizers, schedulers = [], []
        for params, epochs in ((raa_params, self.stage1_epochs), (student_params, self.stage2_epochs)):
            params = params or [torch.nn.Parameter(torch.zeros(()))]  # stage 1 skipped: an idle optimiser
            optimizer = optim.Adam(params, lr=self.hparams.learning_rate, betas=(0.5, 0.999))
            milestones = sorted({max(1, int(0.8 * epochs)), max(1, int(0.9 * epochs))})
            optimizers.append(optimizer)
            schedulers.append(optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.2))
        return optimizers, schedulers

    # ---------------------------------------------------------------- training
    @property
    def stage(self) -> int:
        """1 during anomaly amplification, 2 during normality distillation."""
        return 1 if self.current_epoch < self.stage1_epochs else 2

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step of the current stage."""
        del args, kwargs
        self._check_batch(batch.image)
        if self.stage == 1:
            losses = self._stage1_losses(batch.image)
            optimizer = self.optimizers()[0]
        else:
            losses = self._stage2_losses(batch.image)
            optimizer = self.optimizers()[1]
        check_finite_losses(losses, self.stage, self.current_epoch, self.global_step, self.hparams.learning_rate)
        loss = losses["loss"]
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        size = len(batch.image)
        self.log("stage", float(self.stage), prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        for name, value in losses.items():
            self.log(f"stage{self.stage}_{name}", value.detach(), prog_bar=True, on_epoch=True, batch_size=size)
        return {"loss": loss.detach()}

    def _stage1_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        augmented, mask, foreground = self.synthesizer(images)
        features = self.model.extract(augmented)
        masks = [mask_at(mask, f.shape[-2:]) for f in features]
        foregrounds = [mask_at(foreground, f.shape[-2:]) for f in features]
        amplified, gates = self.model.amplify(features, masks)
        focal = sum(
            focal_loss(g, m, self.hparams.focal_alpha, self.hparams.focal_gamma)
            for g, m in zip(gates, masks, strict=True)
        )
        amplification = sum(
            amplification_loss(f, a, m, fg, margin=self.hparams.amplification_margin)
            for f, a, m, fg in zip(features, amplified, masks, foregrounds, strict=True)
        )
        loss = focal + self.hparams.amplification_weight * amplification
        return {"loss": loss, "focal": focal, "amplification": amplification}

    def _stage2_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        amplified = self._stage2_targets(images, self._batch_paths)
        return {"loss": self._distillation_loss(amplified, self.model.distill(amplified))}

    def _distillation_loss(self, amplified: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.hparams.distillation_loss == "hkd":
            return hkd_loss(amplified, student, self.hparams.hkd_top_k)
        return cosine_loss(amplified, student)

    # ------------------------------------------------------- stage-2 feature cache
    def _stage2_targets(self, images: torch.Tensor, paths: Sequence[str] | None) -> list[torch.Tensor]:
        """Frozen amplified features of the batch: from the cache when it holds them, else computed (and cached)."""
        cache = self._feature_cache
        if cache is not None:
            try:
                cached = cache.get(paths, images)
            except StaleCacheError as error:
                logger.warning("%s Stage 2 continues without the feature cache.", error)
                self._feature_cache = cache = None
            else:
                if cached is not None:
                    return cached
        with torch.no_grad():
            amplified = self.model.amplified_features(images)
        if not self._cache_decided:
            self._cache_decided = True
            self._feature_cache = cache = self._start_feature_cache(images, paths, amplified)
        if cache is not None:
            cache.put(paths, images, amplified)
        return amplified

    def _start_feature_cache(
        self,
        images: torch.Tensor,
        paths: Sequence[str] | None,
        amplified: Sequence[torch.Tensor],
    ) -> FeatureCache | None:
        """On the first stage-2 batch: a cache if it may and can be used, else ``None`` and a log line saying why."""
        reason = self._cache_blocker(paths)
        if reason is None:
            dtype = self._cache_dtype(amplified)
            images_total = self._num_train_images(len(images))
            needed_gb = images_total * FeatureCache.bytes_per_image(amplified, dtype) / 1e9
            if needed_gb > self.hparams.cache_budget_gb:
                reason = (
                    f"it would take {needed_gb:.3g} GB for {images_total} images, over cache_budget_gb="
                    f"{self.hparams.cache_budget_gb}; raise the budget to use it"
                )
        if reason is not None:
            log = logger.warning if self.hparams.cache_features else logger.info
            log("AAND stage 2 recomputes the teacher features every step: %s.", reason)
            return None
        logger.info(
            "AAND stage 2 trains from cached teacher features: %d images, %.3g GB in %s.",
            images_total,
            needed_gb,
            str(dtype).removeprefix("torch."),
        )
        return FeatureCache(dtype)

    def _cache_blocker(self, paths: Sequence[str] | None) -> str | None:
        """Why stage 2 cannot use the feature cache, or ``None``."""
        if not self.hparams.cache_features:
            return "cache_features=False"
        if paths is None or any(path is None for path in paths):
            return "the training batches carry no image paths to key the cache by"
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        transforms = [
            getattr(datamodule, "train_augmentations", None),
            getattr(dataset, "augmentations", None),
            self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None,
        ]
        if found := sorted({name for transform in transforms for name in random_transforms(transform)}):
            return f"the training transforms are random ({', '.join(found)}), so the features change every epoch"
        return None

    def _cache_dtype(self, amplified: Sequence[torch.Tensor]) -> torch.dtype:
        """float16 when it fits the features and leaves the first batch's loss within ``HALF_PRECISION_RTOL``."""
        half_max = torch.finfo(torch.float16).max
        if any(f.abs().amax() >= half_max for f in amplified):
            return torch.float32
        student = [self.model.bottleneck, self.model.decoder]
        buffers = [b for module in student for b in module.buffers()]
        saved = [b.clone() for b in buffers]  # the probe must not move BatchNorm's running statistics
        with torch.no_grad():
            full = self._distillation_loss(amplified, self.model.distill(amplified))
            rounded = [f.half().float() for f in amplified]
            half = self._distillation_loss(rounded, self.model.distill(rounded))
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
        return torch.float16 if abs(float(half - full)) <= HALF_PRECISION_RTOL * abs(float(full)) else torch.float32

    def _num_train_images(self, batch_size: int) -> int:
        try:
            return len(self.trainer.train_dataloader.dataset)
        except (AttributeError, TypeError):
            return self.trainer.num_training_batches * batch_size

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Remember the batch's image paths: the keys of the stage-2 feature cache."""
        del batch_idx
        self._batch_paths = getattr(batch, "image_path", None)

    def on_train_start(self) -> None:
        """A new fit (or a resumed one) builds its own feature cache in stage 2."""
        self._feature_cache, self._cache_decided = None, False

    def on_train_end(self) -> None:
        """Free the feature cache; it must not travel with the model."""
        self._feature_cache = None

    def on_train_epoch_start(self) -> None:
        """Freeze what the current stage does not train, and say which stage runs."""
        if self.stage == 1 and self.synthesizer is None:  # built here: the texture folder may be absent elsewhere
            self.synthesizer = self._build_synthesizer().to(self.device)
        if self.model.raa is not None:
            self.model.raa.requires_grad_(self.stage == 1)
        if self.current_epoch in {0, self.stage1_epochs}:
            logger.info("AAND stage %d starts at epoch %d.", self.stage, self.current_epoch)

    def on_train_epoch_end(self) -> None:
        """Step the active stage's learning-rate schedule."""
        self.lr_schedulers()[self.stage - 1].step()

    # -------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict, so that anomalib computes thresholds and normalisation statistics."""
        del args, kwargs
        self._check_batch(batch.image)
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image and pixel AUROC and F1, pixel F1Max and AUPRO (FPR limit 0.3)."""
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
                F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
            ],
        )

    # ------------------------------------------------------------------ export
    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401  (passed on to anomalib and torch.onnx.export)
    ) -> Path:
        """Anomalib's ONNX export (also the first step of its OpenVINO export), after checking the input size.

        With a Resize in the pre-processor (the default) the graph takes images of any size. Without one,
        the model sees the raw size, so the export needs a fixed ``input_size`` that suits the student.
        ONNX opset 18 is the default: the exporter writes it natively (anomalib asks for 14 and warns).
        """
        if self.input_size is None:
            if input_size is None:
                stride = self._size_stride
                msg = (
                    "Dynamic input size needs a Resize in the pre-processor. This model's pre-processor has none, so "
                    f"the exported graph would see raw images, and backbone {self.hparams.backbone!r} with layers "
                    f"{list(self.hparams.layers)} only takes heights and widths that are multiples of {stride} "
                    f"(e.g. {2 * stride}, {4 * stride}, 256). Export with a fixed size (`--input_size '[256,256]'`, "
                    "`input_size=(256, 256)`), or train with the default pre-processor (Resize + Normalize), whose "
                    "exported graph takes any image size."
                )
                raise ValueError(msg)
            self._check_input_size(tuple(input_size))
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Both stages in one fit; validation (thresholds) once, after the last epoch."""
        epochs = self.stage1_epochs + self.stage2_epochs
        return {
            "max_epochs": epochs,
            "gradient_clip_val": 0,
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": epochs,
        }

    @property
    def learning_type(self) -> LearningType:
        """AAND trains on normal images only."""
        return LearningType.ONE_CLASS


def _check_schedule(stage1_epochs: int, stage2_epochs: int, learning_rate: float) -> None:
    if not isinstance(stage1_epochs, int) or stage1_epochs < 0:
        msg = (
            f"stage1_epochs must be an integer >= 0 (0 skips amplification; the paper uses 100), got {stage1_epochs!r}."
        )
        raise ValueError(msg)
    if not isinstance(stage2_epochs, int) or stage2_epochs < 1:
        msg = f"stage2_epochs must be an integer >= 1 (the paper uses 120), got {stage2_epochs!r}."
        raise ValueError(msg)
    if not (isinstance(learning_rate, int | float) and math.isfinite(learning_rate) and learning_rate > 0):
        msg = f"learning_rate must be a positive number (the paper uses 0.005), got {learning_rate!r}."
        raise ValueError(msg)


__all__ = ["Aand"]
