"""AAND as an anomalib model: both training stages in one ``fit``.

Tang et al., "Advancing Pre-trained Teacher: Towards Robust Feature Discrepancy for Anomaly
Detection", arXiv 2405.02068. Epochs ``[0, stage1_epochs)`` train the Residual Anomaly
Amplification modules on synthetic anomalies; the next ``stage2_epochs`` train the
reverse-distillation student on the amplified features of normal images. The stage is read from
the epoch, so a checkpoint saved in either stage resumes in the right one.
"""

import logging
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib import LearningType, TaskType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.deploy import CompressionType
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torchmetrics import Metric

from .components.calibration import (
    CalibrationMode,
    calibration_enabled,
    check_map_calibration,
    resolve_map_calibration,
)
from .components.checkpoints import (
    CALIBRATION_PREFIX,
    check_checkpoint,
    check_checkpoint_file,
    check_finished,
    check_finite_state,
    check_resumable,
    check_thresholds,
    foreign_checkpoint_message,
    saved_checkpoints,
)
from .components.data_checks import check_datamodule_once, check_pixel_depth, loader_image_paths
from .components.errors import AandInputError
from .components.feature_cache import Stage2FeatureCache
from .components.settings import category_choice, check_export_size, check_hyperparameters, paper_defaults
from .components.synthesis import (
    AnomalySynthesizer,
    ForegroundEstimator,
    drop_synthesizer_state,
    normalize_statistics,
)
from .components.teacher import (
    check_normalization,
    load_teacher_weights,
    pre_processor_normalization,
    teacher_input_adapter,
    teacher_pre_processor,
)
from .int8 import accuracy_control_metric, check_calibration_data, quantize_openvino_ir
from .loss import AmplificationLoss, DistillationLoss, NonFiniteLossGuard
from .torch_model import AandModel
from .workarounds import (
    broadcast_buffers_from_rank_zero,
    check_dataset_before_download,
    ddp_find_unused_parameters,
    evaluator_state_follows_the_model,
    keep_previous_checkpoint_on_failed_save,
    keep_trained_weights_on_retest,
    save_checkpoint_every_epoch,
)

logger = logging.getLogger(__name__)


class Aand(AnomalibModule):
    """AAND: Anomaly Amplification (stage 1) and Normality Distillation (stage 2).

    Args:
        backbone: timm CNN teacher (``features_only``), optionally with a timm pretrained tag that chooses its
            weights; paper: ``wide_resnet50_2.tv_in1k`` (torchvision's weights; the bare name gets timm's default).
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
        anomaly_source_path: Folder of textures for the synthetic anomalies (paper: DTD); ``"procedural"``
            generates a bank of textures when stage 1 starts; ``None`` blends Perlin noise.
        foreground_mask: Keep synthetic anomalies (and the amplification loss's normal positions) on an automatic
            foreground mask: ``True``, ``False``, or the categories to mask (the datamodule's ``category``
            decides; others use the whole image).
        cache_features: In stage 2, compute the frozen amplified features of each training image once
            and train the student from that cache, when the training images are the same every epoch
            (checked); ``False`` recomputes them every step.
        cache_budget_gb: Host memory the stage-2 feature caches of all processes on a machine may take; above it stage 2
            runs uncached. On a GPU the cache goes to device memory first when it fits beside training (measured).
        normalization: Mean/std the teacher sees: ``"imagenet"`` (anomalib's default) or ``"teacher"`` (those the
            teacher's weights were trained with, timm's ``pretrained_cfg``), set in the default pre-processor; or a
            mapping of categories (and ``"default"``) to those, which the datamodule's ``category`` decides when
            training starts: the pre-processor keeps the default's and the model re-normalises the teacher's input.
            A given pre-processor is used as it is (a mapping then re-normalises from its Normalize).
        map_calibration: Score each scale's distance against its level on the normal training images, measured
            after the last epoch: ``"scale"`` (one mean and spread per scale), ``"position"`` (a mean per position,
            for aligned objects), ``"envelope"`` (the default: only what exceeds the largest normal distance at the
            position; measured better than the plain sum on all three demo means), or ``"none"`` (the paper's plain
            sum); or a mapping of categories (and ``"default"``) to those, which the datamodule's ``category``
            decides. See ``components/calibration.py``.
        map_foreground: With a map calibration, score only where the training images showed the object: the union of
            their automatic foregrounds (``ForegroundEstimator``) inside the frame, measured with the calibration.
            Categories whose images show no object inside the frame (textures) keep the whole image.
        map_sigma: Standard deviation in pixels of the anomaly map's Gaussian blur (the paper: 4); or a mapping of
            categories (and ``"default"``) to those, which the datamodule's ``category`` decides when training
            starts. The kernel travels in the checkpoint and the exported graph.
        pre_processor: anomalib pre-processor, or ``True`` for Resize(256) + Normalize (see ``normalization``).
        post_processor: anomalib post-processor, or ``True`` for the default.
        evaluator: anomalib evaluator, or ``True`` for image/pixel AUROC, F1 and AUPRO.
        visualizer: anomalib visualizer, or ``True`` for the default.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
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
        foreground_mask: bool | list[str] = False,
        cache_features: bool = True,
        cache_budget_gb: float = 4.0,
        normalization: Literal["imagenet", "teacher"] | dict[str, Literal["imagenet", "teacher"]] = "imagenet",
        map_calibration: CalibrationMode | dict[str, CalibrationMode] = "envelope",
        map_foreground: bool = True,
        map_sigma: float | dict[str, float] = 4.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_normalization(normalization)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(backbone=backbone, normalization=normalization)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        check_hyperparameters(self.hparams, paper_defaults(Aand))
        check_map_calibration(map_calibration)
        self.automatic_optimization = False
        self.stage1_epochs = stage1_epochs
        self.stage2_epochs = stage2_epochs
        self.learning_rate = learning_rate
        self.pre_trained = pre_trained or backbone_weights is not None  # settings.py warns when they disagree
        self.backbone_weights = backbone_weights
        self.amplification_loss = AmplificationLoss(
            focal_alpha, focal_gamma, amplification_weight, amplification_margin
        )
        self.distillation_loss = DistillationLoss(distillation_loss, hkd_top_k)
        self.loss_guard = NonFiniteLossGuard()
        self.model = AandModel(
            backbone,
            layers,
            num_keys,
            gate_temperature,
            amplification=stage1_epochs > 0,
            map_calibration=calibration_enabled(map_calibration),
            teacher_input=not isinstance(normalization, str),
            map_sigma=map_sigma.get("default", 4.0) if isinstance(map_sigma, Mapping) else map_sigma,
        )
        self.normalization = normalization
        self.map_calibration = map_calibration
        self.map_foreground = map_foreground
        self.map_sigma = map_sigma
        self.register_buffer("teacher_initialised", torch.tensor(data=False))
        self.synthesizer_arguments = {
            "probability": anomaly_probability,
            "anomaly_source_path": anomaly_source_path,
            "foreground_mask": foreground_mask,
        }
        self.synthesizer: AnomalySynthesizer | None = None  # built when a stage-1 epoch starts: textures needed then
        self.feature_cache = Stage2FeatureCache(cache_features, cache_budget_gb)
        self.resumed_from: str | Path | None = None  # the checkpoint this module's fit resumed from

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str | None = None,
        normalization: Literal["imagenet", "teacher"] | dict[str, Literal["imagenet", "teacher"]] | None = None,
    ) -> PreProcessor:
        """Resize (256 by default) + Normalize, as anomalib's default, with ImageNet's or the teacher's mean/std.

        ``backbone`` and ``normalization`` default to the constructor's defaults.
        """
        defaults = paper_defaults(Aand)
        return teacher_pre_processor(
            super().configure_pre_processor(image_size),
            backbone or defaults["backbone"],
            pre_processor_normalization(normalization or defaults["normalization"]),
        )

    @property
    def stage(self) -> int:
        """1 during anomaly amplification, 2 during normality distillation."""
        return 1 if self.current_epoch < self.stage1_epochs else 2

    def configure_optimizers(self) -> tuple[list[optim.Optimizer], list[optim.lr_scheduler.LRScheduler]]:
        """Adam (lr, betas 0.5/0.999) and MultiStepLR (80 % / 90 % of the stage, gamma 0.2) per stage."""
        raa = list(self.model.raa.parameters()) if self.model.raa is not None else []
        student = [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()]
        optimizers = []
        schedulers = []
        for params, epochs in ((raa, self.stage1_epochs), (student, self.stage2_epochs)):
            optimizer = optim.Adam(  # stage 1 skipped: an idle optimiser
                params or [torch.nn.Parameter(torch.zeros(()))], lr=self.learning_rate, betas=(0.5, 0.999)
            )
            milestones = sorted({max(1, int(0.8 * epochs)), max(1, int(0.9 * epochs))})
            optimizers.append(optimizer)
            schedulers.append(optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.2))
        return optimizers, schedulers

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step of the current stage: its targets -> model -> loss module."""
        del args, kwargs
        self.model.check_input_size(batch.image.shape[-2:], self.distillation_loss.top_k)
        stage = self.stage
        if stage == 1:
            images, mask, foreground = (self.model.tile(x) for x in self.synthesizer(batch.image))
            features = self.model.extract(images)
            amplified, gates = self.model.amplify(features, mask)
            losses = self.amplification_loss(features, amplified, gates, mask, foreground)
        else:
            targets = self.stage2_targets(batch)
            losses = {"loss": self.distillation_loss(targets, self.model.distill(targets))}
        if self.loss_guard.record(losses, stage, self.current_epoch, self.global_step):
            self.check_losses()
        optimizer = self.optimizers()[stage - 1]
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        optimizer.step()
        size = len(batch.image)
        self.log("stage", float(stage), prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log("train_loss", losses["loss"].detach(), on_epoch=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"stage{stage}_{name}", value.detach(), prog_bar=True, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"].detach()}

    def stage2_targets(self, batch: Batch) -> list[torch.Tensor]:
        """The batch's frozen amplified features: from the feature cache, or, when tiling, of each tile (uncached)."""
        if self.model.tiler is None:
            return self.feature_cache(batch.image, batch.image_path, self.model.amplified_features)
        with torch.no_grad():
            return self.model.amplified_features(self.model.tile(batch.image))

    def check_losses(self) -> None:
        """Stop training if a loss recorded since the last check was NaN or infinite (``NonFiniteLossGuard``)."""
        self.loss_guard.check(self.learning_rate, saved_checkpoints(self.trainer), self.trainer.strategy)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict, so that anomalib computes thresholds and normalisation statistics."""
        del args, kwargs
        self.model.check_input_size(batch.image.shape[-2:], self.distillation_loss.top_k)
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # --------------------------------------------------------------------------------- hooks
    def on_fit_start(self) -> None:
        """Load the teacher's weights, set a per-category normalisation and map blur once; a loaded model has them."""
        if bool(self.teacher_initialised):
            return
        if self.pre_trained:
            load_teacher_weights(self.model.teacher, self.model.backbone, self.backbone_weights)
        else:
            logger.warning("pre_trained=False: the %s teacher keeps random weights.", self.model.backbone)
        if self.model.teacher_input:
            choice = category_choice(self.normalization, self.trainer.datamodule, "imagenet", "normalization")
            statistics = normalize_statistics(self.pre_processor)
            scale, shift = teacher_input_adapter(statistics, self.model.backbone, choice)
            self.model.set_teacher_input(scale, shift)
        if isinstance(self.map_sigma, Mapping):
            sigma = category_choice(self.map_sigma, self.trainer.datamodule, 4.0, "map_sigma")
            self.model.anomaly_map_generator.set_sigma(sigma)
            self.model.check_input_size(self.input_size, self.distillation_loss.top_k)
        self.teacher_initialised.fill_(value=True)

    def on_train_start(self) -> None:
        """Each fit (or resumed fit) decides on its own stage-2 feature cache."""
        self.feature_cache.start(self.trainer, self.model.distill, self.distillation_loss, self.model)

    def on_train_end(self) -> None:
        """Free the feature cache; it must not travel with the model."""
        self.feature_cache.stop()

    def on_train_epoch_start(self) -> None:
        """Freeze what the current stage does not train, say which stage runs; under DDP fill the stage-2 cache."""
        if self.stage == 1 and self.synthesizer is None:
            self.synthesizer = AnomalySynthesizer.for_pre_processor(
                self.pre_processor, self.trainer.datamodule, **self.synthesizer_arguments
            )
            self.synthesizer.to(self.device)
        if self.model.raa is not None:
            self.model.raa.requires_grad_(self.stage == 1)
        if self.current_epoch in {0, self.stage1_epochs}:
            logger.info("AAND stage %d starts at epoch %d.", self.stage, self.current_epoch)
        if self.stage == 2 and self.model.tiler is None:  # tiled steps compute their targets per tile
            transform = getattr(self.pre_processor, "transform", None)
            self.feature_cache.fill(self.trainer, transform, self.model.amplified_features, self.device)

    def on_train_epoch_end(self) -> None:
        """Check the epoch's losses and weights before its checkpoint is saved; step the stage's learning-rate schedule.

        All processes end the epoch with rank 0's buffers.
        """
        self.check_losses()
        self.lr_schedulers()[self.stage - 1].step()
        broadcast_buffers_from_rank_zero(self.model, self.trainer)
        check_finite_state(
            self.model, self.stage, self.current_epoch, self.learning_rate, saved_checkpoints(self.trainer)
        )

    def on_predict_start(self) -> None:
        """Refuse images deeper than 8 bits, which anomalib would score clipped (predict reads any folder)."""
        check_pixel_depth(loader_image_paths(self.trainer.predict_dataloaders), "images to predict")

    def on_validation_start(self) -> None:
        """All processes validate rank 0's model (the one the checkpoint holds), its map calibrated after fitting."""
        broadcast_buffers_from_rank_zero(self.model, self.trainer)
        if self.trainer.state.fn == TrainerFn.FITTING and self.current_epoch == self.trainer.max_epochs - 1:
            self.calibrate_map()

    def calibrate_map(self) -> None:
        """Measure the map calibration (``map_calibration``) and support on the training images, per process."""
        mode = resolve_map_calibration(self.map_calibration, self.trainer.datamodule)
        calibration = self.model.anomaly_map_generator.calibration
        if self.map_foreground:
            calibration.measure_support(
                self.training_foregrounds(), self.model.reductions[0], self.reduce_over_processes
            )
        calibration.measure(
            mode,
            (
                self.model.distances(self.pre_processor.transform(batch.image.to(self.device)))
                for batch in self.trainer.train_dataloader
            ),
            reduce=self.reduce_over_processes,
        )

    def reduce_over_processes(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` combined over the processes (``op``: ``"sum"`` or ``"max"``); itself in one process."""
        return self.trainer.strategy.reduce(tensor, reduce_op=op)

    def training_foregrounds(self) -> Iterator[torch.Tensor]:
        """Automatic foreground masks of the pre-processed training images, at the size the model sees."""
        estimator = ForegroundEstimator().to(self.device)
        statistics = normalize_statistics(self.pre_processor)
        for batch in self.trainer.train_dataloader:
            images = self.pre_processor.transform(batch.image.to(self.device))
            if statistics is not None:
                mean, std = (value.to(images).view(1, -1, 1, 1) for value in statistics)
                images = images * std + mean
            yield estimator(images.clamp(0, 1))

    def configure_callbacks(self) -> Any:  # noqa: ANN401  (Lightning's own return type)
        """The callbacks of anomalib, after refusing a missing dataset folder (this runs before any download)."""
        check_dataset_before_download(self._trainer)
        return super().configure_callbacks()

    def setup(self, stage: str) -> None:
        """Check the image (or tile) size and the images the stage will read; let DDP train both stages; save safely.

        The images are checked once, on rank 0. Checkpoints are saved every epoch, a failed save never damages the
        previous one, and a checkpoint loaded is checked first.
        """
        self.model.check_input_size(self.input_size, self.distillation_loss.top_k)
        if self.trainer.datamodule is not None:
            check_datamodule_once(self.trainer.datamodule, stage, self.trainer.strategy)
        ddp_find_unused_parameters(self.trainer)
        keep_previous_checkpoint_on_failed_save(self.trainer)
        if stage == "fit":
            save_checkpoint_every_epoch(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints that do not fit; keep this run's weights on anomalib's re-test; ignore evaluator state.

        Refused: another model or backbone, another stage schedule when resuming, an interrupted run's checkpoint
        for test or predict. The stage-1 synthesizer's entries are dropped first: it is rebuilt when stage 1 starts.
        The map calibration's per-position statistics take the checkpoint's map size.
        """
        drop_synthesizer_state(checkpoint)
        trained = self.state_dict()  # before the calibration takes the checkpoint's shapes (and zeros)
        calibration = self.model.anomaly_map_generator.calibration
        calibration.take_shapes(checkpoint.get("state_dict", {}), CALIBRATION_PREFIX)
        check_checkpoint(checkpoint, self.state_dict(), self.hparams)
        if self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:
            check_resumable(checkpoint, self.stage1_epochs)
            self.resumed_from = self._trainer.ckpt_path
        keep_trained_weights_on_retest(self._trainer, checkpoint, trained, self.resumed_from)
        check_finished(checkpoint, self._trainer)
        evaluator_state_follows_the_model(checkpoint, self.state_dict())
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> "Aand":
        """Load a trained model (``weights_only=True``, offline); a damaged or foreign file raises a clear error."""
        check_checkpoint_file(checkpoint_path)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except pickle.UnpicklingError:
            raise AandInputError(foreign_checkpoint_message(checkpoint_path)) from None

    # ------------------------------------------------------------------------ anomalib contract
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

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Anomalib's torch export, once the model has thresholds (it was validated after training)."""
        check_thresholds(self.post_processor)
        return super().to_torch(export_root=export_root, model_file_name=model_file_name)

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
            check_export_size(self.model, input_size, self.distillation_loss.top_k)
        check_thresholds(self.post_processor)
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(
            export_root=export_root, model_file_name=model_file_name, input_size=input_size, **kwargs
        )

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | str | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
        **kwargs: Any,  # noqa: ANN401  (passed on to anomalib)
    ) -> Path:
        """Anomalib's OpenVINO export; ``INT8_PTQ`` and ``INT8_ACQ`` quantise with AAND's recipe.

        See :mod:`anomalib_aand.int8`; ``INT8_ACQ`` then runs NNCF's accuracy control with ``metric`` and
        ``max_drop`` on the datamodule's test split, as anomalib does. Settings are checked before anything is written.
        """
        if compression_type not in {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ}:
            return super().to_openvino(
                export_root=export_root,
                model_file_name=model_file_name,
                input_size=input_size,
                compression_type=compression_type,
                datamodule=datamodule,
                metric=metric,
                task=task,
                max_drop=max_drop,
                **kwargs,
            )
        if compression_type == CompressionType.INT8_ACQ:
            metric = accuracy_control_metric(metric, max_drop)
        check_calibration_data(datamodule)
        xml = super().to_openvino(
            export_root=export_root,
            model_file_name=model_file_name,
            input_size=input_size,
            compression_type=None,
            datamodule=datamodule,
            **kwargs,
        )
        if compression_type == CompressionType.INT8_PTQ:
            return quantize_openvino_ir(Path(xml), datamodule)
        return quantize_openvino_ir(Path(xml), datamodule, accuracy_control=metric, max_drop=max_drop)

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


__all__ = ["Aand"]
