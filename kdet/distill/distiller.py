"""The distiller: a frozen teacher, the connectors, and the terms that tie them to the student.

:class:`Distiller` is the training step of a distillation run: from one batch it computes the
student's own detection loss and every active distillation term, and returns their weighted sum.
The teacher runs in eval mode under ``torch.no_grad``; it holds no trainable parameter, so
gradients reach the student, the connectors and the loss modules only. With a teacher-output
cache (:mod:`kdet.distill.cache`) the teacher does not run during training: its outputs on the
batch's samples are read back instead. The trainer (:mod:`kdet.engine.trainer`) owns the loop,
the optimiser and the checkpoints.

Besides one frozen teacher the step takes several (:mod:`kdet.distill.teachers`), the
student's own moving average (a mean teacher), or a teacher it trains beside the student
(:mod:`kdet.distill.online`); and batches with unlabelled images, which reach the terms but not
the detection losses (:mod:`kdet.distill.unlabelled`).
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AutoWeightConfig, ConfigError, DistillConfig, ModelConfig, PseudoLabelConfig, TeacherConfig
from ..engine.distributed import mean_of_present
from ..engine.step import Batch, TrainStep
from ..models import Detector, build_model
from ..models.backbones import load_weights_file
from ..data.unlabelled import UnlabelledFeed
from ..structures import DetectorOutput, Targets
from .cache import CachedTeacher
from .losses import DISTILL_LOSSES
from .pairing import FeaturePair, PairingReport, TermPlan, level_quality, pair, pick_best_anchor, response_level
from .online import OnlineTeacher, detached
from .unlabelled import (extend, in_batch_order, labelled_part, merge_pseudo_labels, pseudo_labels, rows,
                         split_forward)
from .teachers import TeacherLink, TeacherPairing, Term, average_levels, batch_statistics


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
        if config.model.family == "yolo" and config.model.head == "anchor" and config.model.anchors == "auto":
            raise ConfigError("teacher.model.anchors: 'auto' is only for training; give the anchors the teacher was trained "
                              "with (or 'default')")
        if not config.weights:
            raise ConfigError("teacher.weights: teacher.model needs the weights file it was trained to")
        model_config = config.model.model_dump()
        if model_config["anchors"] == "auto":  # only yolo reads anchors
            model_config["anchors"] = "default"
        teacher = build_model(ModelConfig.model_validate({**model_config, "pretrained_backbone": None}), class_names, input_size)
        load_weights_file(teacher, config.weights, what="teacher.weights", allow_partial=config.partial_weights,
                          option="teacher.partial_weights")
        trained_size = config.input_size or input_size
    else:
        raise ConfigError("teacher: set teacher.checkpoint (a kdet checkpoint such as bundled:bccd_teacher or runs/x/best.pt), "
                          "or teacher.model and teacher.weights")
    teacher.eval().requires_grad_(False)
    return teacher, trained_size


class Distiller(TrainStep):
    """The training step of a distillation run:
    ``hard_weight * student loss + factor * sum(weight * term)``.

    It owns what the run trains: the student, the connectors (student map -> teacher channels)
    and the modules losses register (:attr:`loss_modules`: MGD's generator, FGD's global
    blocks ...). The teacher is frozen and stays in eval mode whatever ``train()`` is called
    with. With ``cached`` the teacher's outputs come from the cache, and the teacher is kept
    outside the module, so it is not moved to the training device.

    ``teacher`` and ``report`` are one teacher and its pairing report, or for several teachers
    their :class:`~kdet.distill.teachers.TeacherLink` objects and the
    :class:`~kdet.distill.teachers.TeacherPairing` that routes each term to the teacher(s) it
    reads (a term that averages several teachers: :meth:`averaged_term`).

    ``factor`` is the weight schedule (:meth:`weight_factor`); before ``start_epoch`` and after
    ``stop_epoch`` the terms and the teacher are skipped and the student trains on its labels
    alone. A term with ``weight: auto`` gets the weight that makes its gradient on the student's
    parameters ``auto.fraction`` of the detection loss's, averaged over the first ``auto.steps``
    steps (:meth:`term_weight`); the chosen weights are saved with the run and reused on resume.
    """

    def __init__(
        self, student: Detector, teacher: Detector | list[TeacherLink], report: PairingReport | TeacherPairing,
        hard_weight: float = 1.0, *, schedule: str = "constant",
        final_ratio: float = 0.0, cached: CachedTeacher | None = None, start_epoch: int = 1, stop_epoch: int | None = None,
        assign: str = "own",
        auto: AutoWeightConfig | None = None, log: Callable[[str], None] | None = None, auto_weights_file: Path | None = None,
        online: OnlineTeacher | None = None, unlabelled: UnlabelledFeed | None = None, pseudo_labels: PseudoLabelConfig | None = None,
    ) -> None:
        super().__init__(student)
        if isinstance(teacher, nn.Module):
            report.raise_errors()
            links = [TeacherLink("teacher", teacher, report, cached=cached)]
            pairing = TeacherPairing.single("teacher", report)
        else:
            links, pairing = list(teacher), report
            pairing.raise_errors()
        self.links = links
        self.pairing = pairing
        self.report = links[0].report
        self.cached = links[0].cached
        # live teachers follow the step to its device (a trained one is optimised with the student);
        # cached ones stay outside the module
        for link in links:
            if link.mode == "frozen":
                link.model.eval().requires_grad_(False)
            elif link.mode == "trained":
                link.model.train().requires_grad_(True)
        live = {link.name: link.model for link in links if link.cached is None and link.mode in ("frozen", "trained")}
        self.teachers = nn.ModuleDict(live)
        self.trained = next((link for link in links if link.mode == "trained"), None)
        self.online = None
        if self.trained is not None:
            if self.trained.reverse is None:
                raise ValueError("Distiller: a trained teacher needs its reverse pairing (the student as its teacher)")
            self.online = online or OnlineTeacher(self.trained.model, self.trained.model_config, input_size=self.report.student.input_size[0],
                                                  out_dir=None, validate=None)
            if self.online.ema is not None:
                self.online_average = self.online.ema.module  # moves with the step; never optimised
            # the teacher learns through the response terms in reverse: the student paired as its teacher
            self.reverse_link = TeacherLink("student", student, self.trained.reverse)
            self.reverse_plans = {plan.index: plan for plan in self.trained.reverse.terms if plan.active}
        self.epoch = 1
        self.hard_weight = hard_weight
        self.schedule = schedule
        self.final_ratio = final_ratio
        self.start_epoch = start_epoch
        self.stop_epoch = stop_epoch
        self.assign_from_teacher = assign == "teacher"
        self.auto = auto or AutoWeightConfig()
        self.log = log or (lambda _: None)
        self.auto_weights_file = auto_weights_file
        self.progress = 0.0
        self.unlabelled = unlabelled
        self.pseudo_labels = pseudo_labels
        self._unlabelled_epoch = None  # this epoch's unlabelled images, one chunk per step
        self._pending = None  # the chunk the next step adds to its batch
        self.terms = [term for term in pairing.terms if term.active]
        self.plans = [term.plan for term in self.terms]
        self.connectors = nn.ModuleDict()
        self.loss_modules = nn.ModuleDict()
        for plan in self.plans:
            loss = DISTILL_LOSSES.get(plan.config.loss)
            for feature in plan.features:
                if feature.connector != "loss":
                    self.connectors[self.connector_key(plan, feature)] = build_connector(
                        feature.connector, feature.student_shape[0], feature.teacher_shape[0]
                    )
            if loss.module is not None:
                channels = [(f.teacher_shape[0] if f.connector != "loss" else f.student_shape[0], f.teacher_shape[0])
                            for f in plan.features]
                if plan.levels == "all":
                    self.loss_modules[f"term{plan.index}"] = loss.module([c[0] for c in channels], [c[1] for c in channels])
                else:
                    for feature, (s_ch, t_ch) in zip(plan.features, channels):
                        self.loss_modules[self.connector_key(plan, feature)] = loss.module(s_ch, t_ch)
        # weight: auto -> [sum of measured weights, steps measured]; fixed once steps reach auto.steps
        self.auto_state = {plan.index: [0.0, 0] for plan in self.plans if plan.config.weight == "auto"}

    @property
    def teacher(self) -> Detector:
        """The (first) teacher's model."""
        return self.links[0].model

    def link(self, name: str) -> TeacherLink:
        return next(link for link in self.links if link.name == name)

    @staticmethod
    def connector_key(plan: TermPlan, feature: FeaturePair) -> str:
        return f"term{plan.index}_{feature.student.replace('.', '_')}"

    # hooks ---------------------------------------------------------------------------------
    def before_train(self, trainer) -> None:
        for link in self.links:
            if link.mode == "ema":
                link.model = _student_ema(trainer)

    def before_epoch(self, trainer) -> None:
        self.epoch = trainer.epoch
        self._unlabelled_epoch = None
        if self.unlabelled is not None and self.distilling:
            from ..engine import distributed

            self._unlabelled_epoch = self.unlabelled.epoch(trainer.epoch, self.data_epoch(trainer.epoch), trainer.steps_per_epoch,
                                                           rank=distributed.rank(), world=distributed.world_size())

    def before_step(self, trainer) -> None:
        self.progress = trainer.progress
        self._pending = next(self._unlabelled_epoch, None) if self._unlabelled_epoch is not None else None

    def after_step(self, trainer) -> None:
        if self.online is not None:
            self.online.after_step()

    def after_epoch(self, trainer) -> None:
        if self.online is not None:
            self.online.after_epoch(trainer.epoch, trainer.epochs)
        if self.auto_state and self.auto_weights_file is not None:
            record = {**self.auto_weights(), "steps_measured": {f"distill.terms.{i}": n for i, (_, n) in self.auto_state.items()},
                      "fraction": self.auto.fraction}
            self.auto_weights_file.write_text(json.dumps(record, indent=1))

    def data_epoch(self, epoch: int) -> int:
        return self.cached.data_epoch(epoch) if self.cached is not None else epoch

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

    @property
    def distilling(self) -> bool:
        """Whether the terms apply in the current epoch (``start_epoch`` to ``stop_epoch``)."""
        return ((bool(self.plans) or self.assign_from_teacher) and self.epoch >= self.start_epoch
                and (self.stop_epoch is None or self.epoch <= self.stop_epoch))

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for link in self.links:
            if link.mode != "trained" and link.model is not self.student:
                link.model.eval()
        return self

    # saved state ---------------------------------------------------------------------------
    def state_dict_to_save(self) -> dict:
        """The connectors' weights under their own keys, the loss modules' under
        ``loss_modules.``, the auto weights under ``auto_weight.`` (the teacher is a fixed input
        of the run, never saved with it)."""
        state = dict(self.connectors.state_dict())
        state.update({f"loss_modules.{k}": v for k, v in self.loss_modules.state_dict().items()})
        state.update({f"auto_weight.{i}": torch.tensor(v, dtype=torch.float64) for i, v in self.auto_state.items()})
        if self.online is not None:  # a teacher trained online is part of the run
            state.update({f"online.{k}": v for k, v in self.online.state_dict().items()})
        return state

    def load_saved_state(self, state: dict) -> None:
        if self.online is not None:
            self.online.load_state_dict({k.removeprefix("online."): v for k, v in state.items() if k.startswith("online.")})
        connectors = {k: v for k, v in state.items() if not k.startswith(("loss_modules.", "auto_weight.", "online."))}
        self.connectors.load_state_dict(connectors)
        self.loss_modules.load_state_dict({k.removeprefix("loss_modules."): v for k, v in state.items() if k.startswith("loss_modules.")})
        for key, value in state.items():
            if key.startswith("auto_weight."):
                total, steps = value.tolist()
                self.auto_state[int(key.removeprefix("auto_weight."))] = [total, int(steps)]

    def auto_weights(self) -> dict[str, float]:
        """The weight each ``weight: auto`` term has now, by term key."""
        return {f"distill.terms.{i}": total / max(steps, 1) for i, (total, steps) in self.auto_state.items()}

    # the step ------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch. Its unlabelled images (``batch.labelled`` false, and those the
        step adds from ``data.unlabelled``) reach the distillation terms only: each model's own
        detection loss reads the labelled images (:func:`~kdet.distill.unlabelled.split_forward`),
        and with pseudo-labels the student's also the teachers' boxes on the unlabelled ones."""
        pending, self._pending = self._pending, None
        if pending is not None and self.distilling:
            batch = extend(batch, *pending)
        mixed = not bool(batch.labelled.all())
        if not self.distilling:
            if mixed:  # unlabelled images teach nothing without the terms
                batch = labelled_part(batch)
            out = self.student(batch.images, batch.targets)
            total, losses = self.hard_weight * out.loss, {f"det_{k}": v.detach() for k, v in out.losses.items()}
            if self.trained is not None:  # both models go on learning from the labels
                taught = self.trained.model(batch.images, batch.targets)
                total = total + self.hard_weight * taught.loss
                losses.update({f"teacher_det_{k}": v.detach() for k, v in taught.losses.items()})
            return total, losses
        teacher_outs, taught = {}, None
        for link in self.links:
            if link.mode == "trained":  # with gradients and its own loss; the student reads it detached
                taught = split_forward(link.model, batch) if mixed else (link.model(batch.images, batch.targets),) * 2
                teacher_outs[link.name] = detached(taught[0])
            else:
                teacher_outs[link.name] = self.teacher_output(link, batch)
        pseudo = self.pseudo_labels is not None and mixed
        if pseudo:
            batch = self.with_pseudo_labels(batch, teacher_outs)
        assign_from = self.assignment_levels(teacher_outs[self.links[0].name]) if self.assign_from_teacher else None
        if mixed:
            out, own, on_unlabelled = split_forward(self.student, batch, unlabelled_targets=pseudo, assign_from=assign_from)
        elif assign_from is not None:
            out = own = self.student(batch.images, batch.targets, assign_from=assign_from)
        else:
            out = own = self.student(batch.images, batch.targets)
        losses = {f"det_{k}": v.detach() for k, v in own.losses.items()}
        total = self.hard_weight * own.loss
        if pseudo:
            total = total + self.pseudo_labels.weight * on_unlabelled.loss
            losses.update({f"pseudo_det_{k}": v.detach() for k, v in on_unlabelled.losses.items()})
            unlabelled_targets = [t for t, flag in zip(batch.targets, batch.labelled.tolist()) if not flag]
            losses["pseudo_boxes"] = torch.tensor(sum(len(t["boxes"]) for t in unlabelled_targets) / max(1, len(unlabelled_targets)))
        context = BatchContext(batch, out, teacher_outs[self.links[0].name], self)
        factor = self.weight_factor()
        weights = {}
        for term in self.terms:
            if term.averaged:
                value = self.averaged_term(term, out, teacher_outs, context)
            else:
                link = self.link(next(iter(term.plans)))
                value = self.term(term.plan, out, teacher_outs[link.name], context.for_teacher(link, teacher_outs[link.name]), link)
            losses[f"kd{term.index}_{term.config.loss}"] = value.detach()
            weights[term.index] = self.term_weight(term.plan, value, own.loss)
            total = total + factor * weights[term.index] * value
        if taught is not None:
            total = total + self.hard_weight * taught[1].loss + factor * self.reverse_terms(batch, out, taught[0], taught[1].losses,
                                                                                          weights, losses)
        if self.schedule != "constant":
            losses["kd_weight_factor"] = torch.tensor(factor)
        return total, losses

    def reverse_terms(self, batch: Batch, student: DetectorOutput, teacher: DetectorOutput, teacher_losses: dict[str, Tensor],
                      weights: dict[int, float], losses: dict[str, Tensor]) -> Tensor:
        """What the teacher trained online learns besides its labels: every response term with
        the roles swapped (the student's outputs detached), each weighted as its forward term.
        Adds its own loss terms (``teacher_det_*``) and the reversed terms (``tkd<i>_*``) to ``losses``."""
        losses.update({f"teacher_det_{k}": v.detach() for k, v in teacher_losses.items()})
        target = detached(student)
        context = BatchContext(batch, teacher, target, self, self.reverse_link)
        total = teacher.head[0].cls_logits.new_zeros(())
        for term in self.terms:
            plan = self.reverse_plans.get(term.index)
            if plan is None:
                continue
            value = self.term(plan, teacher, target, context, self.reverse_link)
            losses[f"tkd{term.index}_{term.config.loss}"] = value.detach()
            total = total + weights[term.index] * value
        return total

    def assignment_levels(self, teacher: DetectorOutput) -> list:
        """The teacher's head levels the student's assignment reads (``distill.assign:
        teacher``): one per student level, of the same stride, with the student's classes."""
        by_stride = {level.stride: level for level in teacher.head}
        levels = [by_stride[level.stride] for level in self.report.student.levels]
        classes = self.links[0].teacher_classes
        if classes is not None:
            levels = [replace(level, cls_logits=level.cls_logits[:, :, classes]) for level in levels]
        return levels

    def term_weight(self, plan: TermPlan, value: Tensor, detection_loss: Tensor) -> float:
        """A term's weight: its configured number, or for ``weight: auto`` the running mean of
        ``fraction * |grad detection loss| / |grad term|`` over the student's parameters during
        the first ``auto.steps`` steps, then that mean; each step's ratio is averaged over the
        processes of a torchrun run first."""
        if plan.config.weight != "auto":
            return plan.config.weight
        state = self.auto_state[plan.index]
        if state[1] < self.auto.steps and value.requires_grad:
            params = [p for p in self.student.parameters() if p.requires_grad]
            detection = _grad_norm(detection_loss, params)
            term = _grad_norm(value, params)
            # under torchrun every process measures its own share of the batch: the weight is
            # the mean over the processes, so that all of them train with the same one
            ratio = mean_of_present(self.auto.fraction * detection / term if term > 0 and detection > 0 else None,
                                    value.device)
            if ratio is not None:
                state[0] += ratio
                state[1] += 1
                if state[1] == self.auto.steps:
                    self.log(f"distill.terms.{plan.index} ({plan.config.loss}): weight auto -> {state[0] / state[1]:.4g} "
                             f"(its gradient {self.auto.fraction:g} of the detection loss's, over {state[1]} steps)")
        return state[0] / state[1] if state[1] else 0.0

    def teacher_output(self, link: TeacherLink, batch: Batch) -> DetectorOutput:
        """A teacher's outputs on the batch's images: a forward pass without gradients, or with
        the cache the stored outputs of the same samples (training-set indices, this epoch's view)."""
        if link.mode == "ema" and link.model is self.student:
            raise RuntimeError("Distiller: the student's EMA teacher is found when training starts (before_train)")
        if link.cached is None:
            with torch.no_grad(), (batch_statistics(link.model) if link.batch_stats else nullcontext()):
                return link.model(batch.images)
        flags = batch.labelled
        if bool(flags.all()):
            return link.cached.outputs(batch.indices, self.epoch, batch.images.device)
        mine = [batch.indices[i] for i in flags.nonzero().flatten().tolist()]
        theirs = [batch.indices[i] - self.unlabelled.offset for i in (~flags).nonzero().flatten().tolist()]
        return in_batch_order(flags, link.cached.outputs(mine, self.epoch, batch.images.device),
                              link.cached_unlabelled.outputs(theirs, self.epoch, batch.images.device))

    def with_pseudo_labels(self, batch: Batch, teachers: dict[str, DetectorOutput]) -> Batch:
        """``batch`` whose unlabelled images hold the teachers' pseudo-labels as targets
        (:func:`~kdet.distill.unlabelled.pseudo_labels`, merged over the teachers)."""
        theirs = (~batch.labelled).nonzero().flatten()
        found = []
        for link in self.links:
            head = rows(DetectorOutput({}, teachers[link.name].head), theirs).head
            found.append(pseudo_labels(head, link.report.teacher_classes, link.report.student_classes,
                                       score=self.pseudo_labels.score, input_size=tuple(batch.images.shape[-2:])))
        targets = list(batch.targets)
        for i, target in zip(theirs.tolist(), merge_pseudo_labels(found, self.pseudo_labels.nms_iou)):
            targets[i] = target
        return replace(batch, targets=targets)

    def teacher_outputs(self, images: Tensor, indices: list[int] | None) -> DetectorOutput:
        """The (first) teacher's outputs on ``images``: a forward pass, or with the cache the
        stored outputs of the same samples (training-set ``indices``, in this epoch's view)."""
        if self.cached is not None and indices is None:
            raise ValueError("Distiller: with the teacher cache, pass the training-set indices of the batch's images")
        batch = Batch(images, [], list(indices or []), torch.ones(len(images), dtype=torch.bool), self.epoch)
        return self.teacher_output(self.links[0], batch)

    def term(self, plan: TermPlan, student: DetectorOutput, teacher: DetectorOutput, context: "BatchContext",
             link: TeacherLink | None = None) -> Tensor:
        """The unweighted value of one term on one batch, reading one teacher (``link``, by
        default the first)."""
        link = link or self.links[0]
        loss = DISTILL_LOSSES.get(plan.config.loss)
        if plan.kind == "response":
            s_levels, t_levels = [], []
            for s_index, t_index in plan.level_pairs:
                s_level = response_level(student.head[s_index], plan.box_space, link.student_classes)
                t_level = response_level(teacher.head[t_index], plan.box_space, link.teacher_classes)
                if plan.pick_teacher_anchor:
                    t_level = pick_best_anchor(t_level, s_level.cls_logits.shape[1])
                s_levels.append(s_level)
                t_levels.append(t_level)
            strides = [student.head[s].stride for s, _ in plan.level_pairs]
            extra = context.for_response(plan, loss.context, strides, [s for s, _ in plan.level_pairs])
            return loss.fn(s_levels, t_levels, **extra, **plan.config.args)
        pairs = []
        for feature in plan.features:
            s_map = student.features[feature.student].tensor
            target = teacher.features[feature.teacher].tensor
            if feature.connector != "loss":
                s_map = self.connectors[self.connector_key(plan, feature)](s_map)
                if s_map.shape[-2:] != target.shape[-2:]:
                    s_map = F.interpolate(s_map, size=target.shape[-2:], mode="bilinear", align_corners=False)
            pairs.append((feature, s_map, target))
        if plan.levels == "all":
            extra = context.for_features(plan, loss.context, [f for f, _, _ in pairs], [t for _, _, t in pairs])
            if "module" in loss.context:
                extra["module"] = self.loss_modules[f"term{plan.index}"]
            return loss.fn([s for _, s, _ in pairs], [t for _, _, t in pairs], **extra, **plan.config.args)
        values = []
        for feature, s_map, target in pairs:
            extra = {k: v[0] if k in PER_PAIR else v for k, v in context.for_features(plan, loss.context, [feature], [target]).items()}
            if "module" in loss.context:
                extra["module"] = self.loss_modules[self.connector_key(plan, feature)]
            values.append(loss.fn(s_map, target, **extra, **plan.config.args))
        return torch.stack(values).mean()

    def averaged_term(self, term: Term, student: DetectorOutput, teachers: dict[str, DetectorOutput], context: "BatchContext") -> Tensor:
        """A response term against the teachers' outputs averaged into one teacher
        (:func:`~kdet.distill.teachers.average_levels`), on the student levels and classes the
        teachers share with the student."""
        loss = DISTILL_LOSSES.get(term.config.loss)
        s_levels, t_levels = [], []
        for s_index in term.levels:
            s_level = response_level(student.head[s_index], "decoded", term.classes)
            levels, positions, weights = [], [], []
            for name, plan in term.plans.items():
                link = self.link(name)
                t_index = dict(plan.level_pairs)[s_index]
                t_level = response_level(teachers[name].head[t_index], "decoded", link.report.teacher_classes)
                if t_level.cls_logits.shape[1] != s_level.cls_logits.shape[1]:
                    t_level = pick_best_anchor(t_level, s_level.cls_logits.shape[1])
                levels.append(t_level)
                positions.append([term.classes.index(c) for c in link.report.student_classes])
                weights.append(link.weight)
            s_levels.append(s_level)
            t_levels.append(average_levels(levels, positions, weights, len(term.classes)))
        strides = [student.head[s].stride for s in term.levels]
        extra = context.for_response(term.plan, loss.context, strides, term.levels)
        return loss.fn(s_levels, t_levels, **extra, **term.config.args)


PER_PAIR = ("stride", "strides", "mask", "teacher_quality", "assignment")
"""Context names whose value differs between the pairs of a feature term."""


class BatchContext:
    """What losses may ask for besides the two models' maps (:data:`~kdet.distill.losses.CONTEXT`),
    computed for one batch on first request."""

    def __init__(self, batch: Batch, student_out: DetectorOutput, teacher_out: DetectorOutput, distiller: Distiller,
                 link: TeacherLink | None = None) -> None:
        self.batch, self.student_out, self.teacher_out, self.distiller = batch, student_out, teacher_out, distiller
        self.link = link or distiller.links[0]
        self._shared: dict = {}  # computed once per batch, whichever teacher a term reads

    def for_teacher(self, link: TeacherLink, teacher_out: DetectorOutput) -> "BatchContext":
        """The same batch's context for a term that reads ``link``'s outputs."""
        if link is self.link:
            return self
        other = BatchContext(self.batch, self.student_out, teacher_out, self.distiller, link)
        other._shared = self._shared
        return other

    def common(self, name: str):
        batch = self.batch
        if name == "gt_boxes":
            return [t["boxes"] for t in batch.targets]
        if name == "gt_labels":
            return [t["labels"] for t in batch.targets]
        if name == "input_size":
            return tuple(batch.images.shape[-2:])
        if name == "labelled":
            return batch.labelled
        raise KeyError(name)

    def assignment(self) -> list[Tensor]:
        """The student's own assignment per head level, ``[N, A, H, W]``."""
        if "assignment" not in self._shared:
            with torch.no_grad():
                self._shared["assignment"] = self.distiller.student.assign(self.student_out.head, self.batch.targets)
        return self._shared["assignment"]

    def for_response(self, plan: TermPlan, names: list[str], strides: list[int], levels: list[int]) -> dict:
        out = {}
        for name in names:
            if name == "strides":
                out[name] = strides
            elif name == "assignment":
                out[name] = [self.assignment()[i] for i in levels]
            else:
                out[name] = self.common(name)
        return out

    def for_features(self, plan: TermPlan, names: list[str], features: list[FeaturePair], targets: list[Tensor]) -> dict:
        """Context for feature pairs: what differs between pairs (:data:`PER_PAIR`) as lists with
        one entry per pair, what is the same for the batch (ground truth, input size) as it is."""
        out = {}
        strides = [f.stride[1] for f in features]  # the maps are compared on the teacher's grid
        grids = [tuple(t.shape[-2:]) for t in targets]
        for name in names:
            if name in ("stride", "strides"):
                out[name] = strides
            elif name == "mask":
                out[name] = [box_mask(self.batch.targets, s, g) if plan.config.mask == "gt" else None for s, g in zip(strides, grids)]
            elif name == "teacher_quality":
                out[name] = [self.teacher_quality(s, g) for s, g in zip(strides, grids)]
            elif name == "assignment":
                out[name] = [self.assignment_at(f.stride[0], g) for f, g in zip(features, grids)]
            elif name != "module":
                out[name] = self.common(name)
        return out

    def teacher_quality(self, stride: int, grid: tuple[int, int]) -> Tensor:
        """``[N, 1, H, W]``: the teacher's quality at its head level of ``stride`` (best anchor,
        shared classes only), resized to ``grid`` if the level's grid differs."""
        level = next((lv for lv in self.teacher_out.head if lv.stride == stride), None)
        if level is None:
            raise ValueError(f"the teacher has no head level of stride {stride}")
        classes = self.link.teacher_classes
        quality = level_quality(replace(level, cls_logits=level.cls_logits[:, :, classes])
                                if classes is not None and level.num_classes else level)  # [N, A, 1, H, W]
        quality = quality.amax(1)  # [N, 1, H, W]
        if tuple(quality.shape[-2:]) != grid:
            quality = F.interpolate(quality, size=grid, mode="bilinear", align_corners=False)
        return quality

    def assignment_at(self, stride: int, grid: tuple[int, int]) -> Tensor:
        """``[N, H, W]``: the student's assignment at its head level of ``stride`` (any anchor)."""
        level = next((i for i, lv in enumerate(self.student_out.head) if lv.stride == stride), None)
        if level is None:
            raise ValueError(f"the student has no head level of stride {stride}")
        owner = self.assignment()[level].amax(1)  # [N, H, W]
        if tuple(owner.shape[-2:]) != grid:
            owner = F.interpolate(owner[:, None].float(), size=grid, mode="nearest")[:, 0].long()
        return owner


def box_mask(targets: Targets, stride: int, grid: tuple[int, int]) -> Tensor:
    """``[N, 1, H, W]`` float: 1 on every cell of a ``grid`` at ``stride`` that a ground-truth box
    overlaps (at least the cell holding its centre), 0 elsewhere."""
    height, width = grid
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    mask = torch.zeros(len(targets), 1, height, width, device=device)
    for i, target in enumerate(targets):
        for x1, y1, x2, y2 in (target["boxes"].reshape(-1, 4) / stride).tolist():
            c1, r1 = max(0, min(width - 1, int(math.floor(x1)))), max(0, min(height - 1, int(math.floor(y1))))
            c2, r2 = max(c1 + 1, min(width, int(math.ceil(x2)))), max(r1 + 1, min(height, int(math.ceil(y2))))
            mask[i, 0, r1:r2, c1:c2] = 1.0
    return mask


def _student_ema(trainer) -> nn.Module:
    """The moving average of the student the trainer keeps (``train.ema``)."""
    from ..engine.trainer import EMAHook

    hook = next((hook for hook in trainer.hooks if isinstance(hook, EMAHook)), None)
    if hook is None:
        raise ConfigError("teacher: {self: ema} reads the student's exponential moving average; set train.ema: true")
    return hook.ema.module


def _grad_norm(value: Tensor, params: list[nn.Parameter]) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    squares = [g.detach().float().square().sum() for g in grads if g is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def check_pairing(config: DistillConfig, student: Detector, class_names: list[str], log: Callable[[str], None] | None = None,
                  teacher: tuple[Detector, int] | None = None) -> tuple[Detector, PairingReport]:
    """Load the teacher (unless given) and pair it with ``student`` at the configured input size."""
    size = config.data.input_size
    model, trained_size = teacher or load_teacher(config.teacher, class_names, size)
    report = pair(model.describe((size, size)), student.describe((size, size)), config.distill, teacher_input_size=trained_size)
    return model, report


__all__ = ["BatchContext", "Distiller", "box_mask", "build_connector", "check_pairing", "converter", "load_teacher"]
