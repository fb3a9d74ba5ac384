"""The distiller: a frozen teacher, the connectors, and the terms that tie them to the student.

:class:`Distiller` computes, from one batch, the student's own detection loss and every active
distillation term, and returns their weighted sum. The teacher runs in eval mode under
``torch.no_grad``; it holds no trainable parameter, so gradients reach the student and the
connectors only. With a teacher-output cache (:mod:`kdet.distill.cache`) the teacher does not
run during training: its outputs on the batch's samples are read back instead. The trainer
(:mod:`kdet.engine.trainer`) owns the loop, the optimiser and the checkpoints; it treats a
distiller as a training objective.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, DistillConfig, ModelConfig, TeacherConfig
from ..engine.trainer import Objective
from ..models import Detector, build_model
from ..models.backbones import load_weights_file
from ..structures import DetectorOutput, Targets
from .cache import CachedTeacher
from .losses import DISTILL_LOSSES
from .pairing import FeaturePair, PairingReport, TermPlan, pair, pick_best_anchor, response_level


def converter(in_channels: int, out_channels: int) -> nn.Module:
    """The FitNets converter of mobile-yolov5-pruning-distillation: 1x1 conv + BN + ReLU6."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


def build_connector(kind: str, in_channels: int, out_channels: int) -> nn.Module:
    if kind == "converter":
        return converter(in_channels, out_channels)
    if kind == "conv":
        return nn.Conv2d(in_channels, out_channels, 1)
    if in_channels != out_channels:
        raise ValueError(f"connector 'none' between {in_channels} and {out_channels} channels")
    return nn.Identity()


def load_teacher(config: TeacherConfig, class_names: list[str], input_size: int) -> tuple[Detector, int]:
    """The teacher in eval mode, frozen, and the input size it was trained at."""
    if config.checkpoint and config.model:
        raise ConfigError("teacher: give either teacher.checkpoint (a kdet checkpoint) or teacher.model with teacher.weights, not both")
    if config.checkpoint:
        from ..engine.checkpoint import load_detector

        try:
            teacher, payload = load_detector(config.checkpoint)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"teacher.checkpoint: {error}") from None
        trained_size = config.input_size or int(payload["input_size"])
    elif config.model:
        if config.model.family == "yolo" and config.model.anchors == "auto":
            raise ConfigError("teacher.model.anchors: 'auto' is only for training; give the anchors the teacher was trained "
                              "with (or 'default')")
        if not config.weights:
            raise ConfigError("teacher.weights: teacher.model needs the weights file it was trained to")
        model_config = config.model.model_dump()
        if model_config["anchors"] == "auto":  # only yolo reads anchors
            model_config["anchors"] = "default"
        teacher = build_model(ModelConfig.model_validate({**model_config, "pretrained_backbone": None}), class_names, input_size)
        load_weights_file(teacher, config.weights, what="teacher.weights")
        trained_size = config.input_size or input_size
    else:
        raise ConfigError("teacher: set teacher.checkpoint (a kdet checkpoint such as bundled:bccd_teacher or runs/x/best.pt), "
                          "or teacher.model and teacher.weights")
    teacher.eval().requires_grad_(False)
    return teacher, trained_size


class Distiller(Objective):
    """Training objective of a distillation run: ``hard_weight * student loss + sum(weight * term)``.

    Only :attr:`connectors` hold trainable parameters; :attr:`teacher` is frozen and stays in
    eval mode whatever ``train()`` is called with. With ``cached`` the teacher's outputs come from
    the cache, and the teacher is kept outside the module, so it is not moved to the training
    device.
    """

    def __init__(
        self, teacher: Detector, report: PairingReport, hard_weight: float = 1.0, *, schedule: str = "constant",
        final_ratio: float = 0.0, cached: CachedTeacher | None = None,
    ) -> None:
        super().__init__()
        report.raise_errors()
        if cached is None:
            self.teacher = teacher.eval().requires_grad_(False)
        else:
            self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.cached = cached
        self.epoch = 1
        self.report = report
        self.hard_weight = hard_weight
        self.schedule = schedule
        self.final_ratio = final_ratio
        self.progress = 0.0
        self.plans = [plan for plan in report.terms if plan.active]
        self.connectors = nn.ModuleDict()
        for plan in self.plans:
            for feature in plan.features:
                self.connectors[self.connector_key(plan, feature)] = build_connector(
                    feature.connector, feature.student_shape[0], feature.teacher_shape[0]
                )
        same = report.student_classes == list(range(len(report.student.class_names)))
        self._student_classes = None if same else report.student_classes
        self._teacher_classes = None if report.teacher_classes == list(range(len(report.teacher.class_names))) else report.teacher_classes

    @staticmethod
    def connector_key(plan: TermPlan, feature: FeaturePair) -> str:
        return f"term{plan.index}_{feature.student.replace('.', '_')}"

    def set_progress(self, fraction: float) -> None:
        self.progress = fraction

    def data_epoch(self, epoch: int) -> int:
        return self.cached.data_epoch(epoch) if self.cached is not None else epoch

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def weight_factor(self) -> float:
        """Factor on every term's weight at the current point of training: 1 for a constant
        schedule; a linear or cosine decay from 1 to ``final_ratio`` over the run otherwise,
        so the student leans on the teacher early and fits the labels at the end."""
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "linear":
            decay = 1.0 - self.progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * self.progress))
        return self.final_ratio + (1.0 - self.final_ratio) * decay

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def state_dict_to_save(self) -> dict:
        """The connectors' weights (the teacher is a fixed input of the run, never saved with it)."""
        return self.connectors.state_dict()

    def load_saved_state(self, state: dict) -> None:
        self.connectors.load_state_dict(state)

    def forward(
        self, student: Detector, images: Tensor, targets: Targets, indices: list[int] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        out = student(images, targets)
        teacher_out = self.teacher_outputs(images, indices)
        losses = {f"det_{k}": v.detach() for k, v in out.losses.items()}
        total = self.hard_weight * out.loss
        factor = self.weight_factor()
        for plan in self.plans:
            value = self.term(plan, out, teacher_out)
            losses[f"kd{plan.index}_{plan.config.loss}"] = value.detach()
            total = total + factor * plan.config.weight * value
        if self.schedule != "constant":
            losses["kd_weight_factor"] = torch.tensor(factor)
        return total, losses

    def teacher_outputs(self, images: Tensor, indices: list[int] | None) -> DetectorOutput:
        """The teacher's outputs on ``images``: a forward pass, or with the cache the stored
        outputs of the same samples (training-set ``indices``, in this epoch's view)."""
        if self.cached is None:
            with torch.no_grad():
                return self.teacher(images)
        if indices is None:
            raise ValueError("Distiller: with the teacher cache, pass the training-set indices of the batch's images")
        return self.cached.outputs(indices, self.epoch, images.device)

    def term(self, plan: TermPlan, student: DetectorOutput, teacher: DetectorOutput) -> Tensor:
        """The unweighted value of one term on one batch."""
        loss = DISTILL_LOSSES.get(plan.config.loss)
        if plan.kind == "response":
            s_levels, t_levels = [], []
            for s_index, t_index in plan.level_pairs:
                s_level = response_level(student.head[s_index], plan.box_space, self._student_classes)
                t_level = response_level(teacher.head[t_index], plan.box_space, self._teacher_classes)
                if plan.pick_teacher_anchor:
                    t_level = pick_best_anchor(t_level, s_level.cls_logits.shape[1])
                s_levels.append(s_level)
                t_levels.append(t_level)
            return loss.fn(s_levels, t_levels, **plan.config.args)
        values = []
        for feature in plan.features:
            mapped = self.connectors[self.connector_key(plan, feature)](student.features[feature.student].tensor)
            target = teacher.features[feature.teacher].tensor
            if mapped.shape[-2:] != target.shape[-2:]:
                mapped = F.interpolate(mapped, size=target.shape[-2:], mode="bilinear", align_corners=False)
            values.append(loss.fn(mapped, target, **plan.config.args))
        return torch.stack(values).mean()


def check_pairing(config: DistillConfig, student: Detector, class_names: list[str], log: Callable[[str], None] | None = None,
                  teacher: tuple[Detector, int] | None = None) -> tuple[Detector, PairingReport]:
    """Load the teacher (unless given) and pair it with ``student`` at the configured input size."""
    size = config.data.input_size
    model, trained_size = teacher or load_teacher(config.teacher, class_names, size)
    report = pair(model.describe((size, size)), student.describe((size, size)), config.distill, teacher_input_size=trained_size)
    return model, report


__all__ = ["Distiller", "build_connector", "check_pairing", "converter", "load_teacher"]
