"""Can this teacher teach this student? Pair levels, features and classes before training.

:func:`pair` compares the two models' :class:`~kdet.models.ModelSpec` (shapes at the configured
input size) for every configured term, and returns a :class:`PairingReport`: what will be paired
with what, what kdet adapts (connectors, resampling, class reordering, anchor selection) and in
plain words what cannot be paired and how to fix it. ``kdet check`` prints it; ``kdet distill``
refuses to start while it holds errors, so a mismatch never surfaces as a shape error deep
inside a loss.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..config import ConfigError, DistillSettings, TermConfig
from ..losses.yolo import decode_cell_boxes
from ..models import ModelSpec
from ..structures import HeadLevel
from .losses import CONTEXT, DISTILL_LOSSES, DistillLoss, ResponseLevel


CONTEXT_WORDS = {
    "gt_boxes": "the ground-truth boxes", "gt_labels": "the ground-truth classes", "stride": "the stride",
    "strides": "the strides", "input_size": "the input size", "assignment": "the student's target assignment",
    "labelled": "which images are labelled", "teacher_quality": "the teacher's scores", "mask": "the ground-truth mask",
}


class PairingError(ConfigError):
    """The teacher and the student cannot be paired as configured; the message says why and how to fix it."""


@dataclass
class FeaturePair:
    student: str
    teacher: str
    student_shape: tuple[int, int, int]  # channels, H, W
    teacher_shape: tuple[int, int, int]
    stride: tuple[int, int]  # student, teacher
    connector: str  # "conv" | "converter" | "none" | "loss" (the loss compares the maps as they are)
    resample: bool


@dataclass
class TermPlan:
    """How one configured term will be computed."""

    index: int
    config: TermConfig
    kind: str  # "response" | "feature"
    active: bool
    level_pairs: list[tuple[int, int]] = field(default_factory=list)  # (student level, teacher level)
    box_space: str = "raw"  # response: "raw" head maps or "decoded" ltrb in stride units
    pick_teacher_anchor: bool = False  # response: teacher anchors differ: use its best anchor per location
    features: list[FeaturePair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    levels: str = "each"  # feature terms: one loss call per pair ("each") or one over every pair ("all")
    context: list[str] = field(default_factory=list)  # what the loss reads besides the two models' maps

    @property
    def key(self) -> str:
        return f"distill.terms.{self.index} ({self.config.loss})"


@dataclass
class PairingReport:
    teacher: ModelSpec
    student: ModelSpec
    student_classes: list[int]  # indices of the shared classes in the student's list ...
    teacher_classes: list[int]  # ... and the same classes in the teacher's list
    terms: list[TermPlan]
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    assign_from_teacher: bool = False  # distill.assign: teacher

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_errors(self) -> None:
        if self.errors:
            raise PairingError("the teacher and the student cannot be paired as configured:\n  - " + "\n  - ".join(self.errors)
                               + "\nRun `kdet check` on the config for the full report.")


def _strides(spec_levels) -> str:
    return "/".join(str(level.stride) for level in spec_levels)


def pair(teacher: ModelSpec, student: ModelSpec, settings: DistillSettings, *, teacher_input_size: int | None = None,
         only: set[int] | None = None) -> PairingReport:
    """Plan every term of ``settings`` for ``teacher`` and ``student`` (described at the same input size);
    with ``only``, the terms of those indices alone (the terms that read this teacher of several)."""
    report = PairingReport(teacher, student, [], [], [])
    _pair_classes(report)
    if teacher_input_size and teacher_input_size != student.input_size[0]:
        report.notes.append(
            f"input size: the teacher was trained at {teacher_input_size}px and will run at the student's "
            f"{student.input_size[0]}px on the same images; objects look {student.input_size[0] / teacher_input_size:.2f}x "
            f"their training size to it. Check it with `kdet eval TEACHER --set data.input_size={student.input_size[0]}`, "
            f"or set data.input_size: {teacher_input_size}."
        )
    if teacher.family != student.family:
        report.notes.append(
            f"families differ (teacher {teacher.family}, student {student.family}): response terms compare class "
            f"probabilities and boxes decoded to a shared form (distances from each cell to the box edges, in strides); "
            f"raw head maps (l2_logits) cannot be compared."
        )
    _note_necks(report)
    two_stage = [side for side, spec in (("teacher", teacher), ("student", student)) if spec.two_stage]
    if "teacher" in two_stage:
        report.notes.append(
            f"the {teacher.family} teacher is two-stage: it feeds feature terms (its backbone and neck maps) and, as a score "
            f"map, its region proposal network's objectness (terms that weight locations by the teacher's scores: "
            f"score_l2); its classes and boxes belong to proposals, not to locations, so response terms cannot read them")
    if not settings.terms:
        report.errors.append("distill.terms is empty: add at least one term, for example {loss: objectness_scaled, weight: 1.0}")
    for index, term in enumerate(settings.terms):
        if only is not None and index not in only:
            continue
        try:
            loss = DISTILL_LOSSES.get(term.loss)
        except KeyError as error:
            report.errors.append(f"distill.terms.{index}.loss: {error.args[0]}")
            continue
        _check_args(report, index, term, loss)
        active = term.enabled and (settings.response if loss.kind == "response" else settings.features)
        plan = TermPlan(index, term, loss.kind, active, levels=loss.levels if loss.kind == "feature" else "all",
                        context=loss.context)
        if term.mask == "gt" and not loss.supports_mask:
            masked = [name for name in DISTILL_LOSSES.names() if DISTILL_LOSSES.get(name).supports_mask]
            report.errors.append(f"{plan.key}.mask: {term.loss} does not take a ground-truth mask; "
                                 f"leave mask: none, or use a loss that does ({', '.join(masked)})")
        if "assignment" in loss.context and not student.assigns:
            report.errors.append(f"{plan.key}: {term.loss} reads the student's own target assignment, which the "
                                 f"{student.family} student does not expose; use a yolo student")
        if loss.kind == "response" and two_stage:
            spec = teacher if "teacher" in two_stage else student
            report.errors.append(
                f"{plan.key}: {term.loss} compares per-location class scores and boxes, but the {two_stage[0]} "
                f"({spec.family}) is two-stage: its classes and boxes belong to region proposals, and its per-location maps "
                f"are the proposal network's class-agnostic objectness. Use feature terms (pkd, cwd, fitnet, mgd, fgd, "
                f"relation) or score_l2, which reads that objectness as the teacher's score map")
            report.terms.append(plan)
            continue
        if loss.needs_box_dist:
            _check_box_dist(report, plan)
        if loss.kind == "response":
            _pair_response(report, plan, loss.box_space)
        else:
            _pair_features(report, plan, loss.connector)
        if "teacher_quality" in loss.context:
            head_strides = {level.stride for level in teacher.levels}
            missing = sorted({f.stride[1] for f in plan.features} - head_strides)
            if missing:
                report.errors.append(f"{plan.key}: {term.loss} weights locations by the teacher's scores, but the teacher's head "
                                     f"has no level of stride {missing} (its strides: {_strides(teacher.levels)}); "
                                     f"distil features of the strides the head has")
        reads = [CONTEXT_WORDS[name] for name in loss.context if name in CONTEXT_WORDS and (name != "mask" or term.mask == "gt")]
        if reads:
            plan.notes.append("also reads " + ", ".join(reads))
        if loss.module is not None:
            plan.notes.append(f"{term.loss} trains a module of its own beside the student")
        report.terms.append(plan)
    if settings.assign == "teacher":
        report.assign_from_teacher = True
        _pair_assignment(report)
    if settings.terms and not any(plan.active for plan in report.terms):
        report.notes.append("every term is switched off (enabled, distill.response, distill.features): this run trains "
                            "the student on its labels only")
    return report


def _neck(spec: ModelSpec) -> list[tuple[str, int, int]]:
    return [(name, stride, channels) for name, (channels, stride, _) in spec.features.items() if name.startswith("neck.")]


def _note_necks(report: PairingReport) -> None:
    """When the two necks give different levels (their number or strides), say so and how they
    are paired: the mismatch that otherwise surfaces as a broadcast error inside a loss. (Channel
    counts alone differ between any two sizes; the feature table shows them.)"""
    teacher, student = _neck(report.teacher), _neck(report.student)
    if [s for _, s, _ in teacher] == [s for _, s, _ in student]:
        return

    def describe(levels: list[tuple[str, int, int]]) -> str:
        return ", ".join(f"{name[5:]} /{stride} {channels} ch" for name, stride, channels in levels) or "none"

    shared = sorted({s for _, s, _ in teacher} & {s for _, s, _ in student})
    parts = [f"necks differ: the teacher's neck gives {len(teacher)} level(s) ({describe(teacher)}), the student's "
             f"{len(student)} ({describe(student)})"]
    if shared:
        parts.append(f"terms pair them by stride ({'/'.join(map(str, shared))} shared)")
        if any(tc != sc for _, ts, tc in teacher for _, ss, sc in student if ts == ss):
            parts.append("where channels differ, feature terms bridge them with connectors")
        unpaired = [name[5:] for name, stride, _ in teacher + student if stride not in shared]
        if unpaired:
            parts.append(f"{', '.join(unpaired)} have no partner of their stride and are left out")
    else:
        parts.append("no stride is shared: feature terms need resample: true, response terms cannot pair levels")
    report.notes.append("; ".join(parts))


def _check_args(report: PairingReport, index: int, term: TermConfig, loss: DistillLoss) -> None:
    """A misspelt loss argument fails here, naming its key, not after the first epoch; so does
    an argument that is context the distiller fills in."""
    valid = loss.arguments
    for key in term.args:
        if key in loss.context:
            report.errors.append(f"distill.terms.{index}.args.{key}: {key} is filled in by the distiller "
                                 f"({CONTEXT[key]}); remove it from args")
        elif key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            report.errors.append(f"distill.terms.{index}.args.{key}: {term.loss} has no argument {key!r}.{hint} "
                                 f"Its arguments: {', '.join(valid) or 'none'}.")


def _pair_classes(report: PairingReport) -> None:
    teacher, student = list(report.teacher.class_names), list(report.student.class_names)
    shared = [name for name in student if name in teacher]
    report.student_classes = [student.index(name) for name in shared]
    report.teacher_classes = [teacher.index(name) for name in shared]
    if teacher == student:
        return
    if not shared:
        report.errors.append(
            f"classes: the teacher knows {teacher} and the student's data has {student}; no class name is shared, "
            f"so the teacher's class outputs mean nothing to the student. Use a teacher trained on these classes "
            f"(class lists are matched by name)."
        )
        return
    if set(shared) == set(teacher) == set(student):
        report.notes.append(f"classes: same names in another order (teacher {teacher}, student {student}); "
                            f"the teacher's class outputs are reordered to the student's")
        return
    only_student = [n for n in student if n not in teacher]
    only_teacher = [n for n in teacher if n not in student]
    parts = [f"classes: {len(shared)} shared ({', '.join(shared)}), matched by name"]
    if only_student:
        parts.append(f"the student's {only_student} have no teacher output and learn from the labels only")
    if only_teacher:
        parts.append(f"the teacher's {only_teacher} are not in the student's data and are ignored")
    report.notes.append("; ".join(parts))


def _pair_response(report: PairingReport, plan: TermPlan, box_space: str) -> None:
    teacher, student = report.teacher, report.student
    where = plan.key
    if plan.config.student != "head" or (plan.config.teacher or "head") != "head":
        report.errors.append(f"{where}: response losses read the head; set student: head (and teacher: head or leave it out), "
                             f"got student: {plan.config.student}, teacher: {plan.config.teacher}")
        return
    if not report.student_classes:
        return  # the class error is already reported
    by_stride = {level.stride: i for i, level in enumerate(teacher.levels)}
    for s_index, level in enumerate(student.levels):
        t_index = by_stride.get(level.stride)
        if t_index is None:
            plan.notes.append(f"student level {level.name} (stride {level.stride}) has no teacher level of that stride: "
                              f"no response loss there")
            continue
        plan.level_pairs.append((s_index, t_index))
    unused = [t.name for t in teacher.levels if t.stride not in {s.stride for s in student.levels}]
    if unused:
        plan.notes.append(f"teacher level(s) {', '.join(unused)} have no student level of the same stride and are not used")
    if not plan.level_pairs:
        report.errors.append(
            f"{where}: the teacher's head has strides {_strides(teacher.levels)} and the student's {_strides(student.levels)}; "
            f"no level has a partner of the same stride. Use a teacher and a student whose pyramids share strides, "
            f"or use a feature term with resample: true."
        )
        return
    anchors_differ = any(
        student.levels[s].num_anchors != teacher.levels[t].num_anchors for s, t in plan.level_pairs
    )
    formats_differ = any(student.levels[s].box_format != teacher.levels[t].box_format for s, t in plan.level_pairs)
    boxes_differ = teacher.family != student.family or formats_differ or any(
        not _same_anchors(student.levels[s].anchors, teacher.levels[t].anchors) for s, t in plan.level_pairs
    )
    plan.pick_teacher_anchor = anchors_differ
    if box_space == "raw":
        if anchors_differ or boxes_differ:
            fix = "Use objectness_scaled or kl, which compare probabilities and decoded boxes"
            if teacher.family != student.family:
                why = f"the heads' families differ (teacher {teacher.family}, student {student.family})"
            elif formats_differ:
                why = (f"the heads encode boxes differently (teacher {teacher.levels[0].box_format}, student "
                       f"{student.levels[0].box_format}: model.head anchor and dfl)")
                fix += ", or give both models the same model.head"
            else:
                why = ("the heads have different anchors per location" if anchors_differ else
                       "the two heads use different anchor boxes, so their raw box outputs mean different boxes")
                if teacher.levels[0].anchors is not None:
                    anchors = [[list(a) for a in level.anchors] for level in teacher.levels]
                    fix += f", or give the student the teacher's anchors (model.anchors: {anchors})"
            report.errors.append(f"{where}: {plan.config.loss} compares raw head maps one to one, but {why}. {fix}.")
            return
        plan.box_space = "raw"
    elif box_space == "decoded":
        plan.box_space = "decoded"
    else:
        plan.box_space = "decoded" if anchors_differ or boxes_differ else "raw"
    if anchors_differ:
        s_a = sorted({student.levels[s].num_anchors for s, _ in plan.level_pairs})
        t_a = sorted({teacher.levels[t].num_anchors for _, t in plan.level_pairs})
        plan.notes.append(f"anchors per location: teacher {t_a}, student {s_a}; every student anchor learns from the "
                          f"teacher's most confident anchor at the same location")
    if plan.config.loss == "kl" and len(report.student_classes) == 1 and plan.config.args.get("mode", "softmax") == "softmax":
        plan.notes.append("one shared class: a softmax over one class is always 1, so kl would be 0; "
                          "set args: {mode: sigmoid} (one Bernoulli per class)")
    pairs = ", ".join(f"{student.levels[s].name}<-{teacher.levels[t].name}" for s, t in plan.level_pairs)
    plan.notes.insert(0, f"levels paired by stride: {pairs}; boxes compared as "
                         + ("raw head outputs" if plan.box_space == "raw" else "distances to the box edges in strides"))


def _pair_assignment(report: PairingReport) -> None:
    """``distill.assign: teacher``: the student's task-aligned assignment reads the teacher's
    class scores and boxes, so every student level needs a teacher level of its stride and grid
    with one anchor per location and boxes as edge distances."""
    teacher, student = report.teacher, report.student
    if any(level.box_format != "ltrb_center" for level in student.levels):
        report.errors.append("distill.assign: teacher needs a student whose task-aligned assignment reads predictions "
                             f"(model.head: dfl, or the ultralytics family); this student's head assigns by anchor shape "
                             f"({student.levels[0].box_format} boxes). Set model.head: dfl or leave distill.assign: own")
        return
    by_stride = {level.stride: level for level in teacher.levels}
    for level in student.levels:
        partner = by_stride.get(level.stride)
        if partner is None or partner.grid != level.grid:
            report.errors.append(f"distill.assign: teacher: the student's level {level.name} (stride {level.stride}) has no teacher "
                                 f"level of the same stride and grid; the teacher's strides are {_strides(teacher.levels)}")
        elif partner.num_anchors != 1 or partner.box_format not in ("ltrb", "ltrb_center"):
            report.errors.append(f"distill.assign: teacher: the teacher's level {partner.name} has {partner.num_anchors} anchors "
                                 f"and {partner.box_format} boxes; the assignment reads heads with one anchor per location and "
                                 f"edge-distance boxes (dfl or fcos teachers)")
    if not any("distill.assign" in error for error in report.errors):
        report.notes.append("assignment: the student's positives and their soft class targets come from the teacher's scores "
                            "and boxes (distill.assign: teacher)")


def _check_box_dist(report: PairingReport, plan: TermPlan) -> None:
    """Losses on box distributions need them on both sides, with the same number of bins."""
    sides = {"teacher": report.teacher, "student": report.student}
    lacking = [side for side, spec in sides.items() if any(level.box_bins is None for level in spec.levels)]
    if lacking:
        report.errors.append(
            f"{plan.key}: {plan.config.loss} distils box-edge distributions, which the {' and the '.join(lacking)} "
            f"head{'s' if len(lacking) > 1 else ''} do{'' if len(lacking) > 1 else 'es'} not have (only model.head: dfl "
            f"predicts them). Use a dfl head on both sides, or objectness_scaled / kl, which compare decoded boxes and scores."
        )
        return
    bins = {side: sorted({level.box_bins for level in spec.levels}) for side, spec in sides.items()}
    if bins["teacher"] != bins["student"]:
        report.errors.append(f"{plan.key}: {plan.config.loss} compares box distributions bin by bin, but the teacher has "
                             f"{bins['teacher']} bins per edge and the student {bins['student']}; use heads with the same bins")


def _same_anchors(a, b) -> bool:
    """Anchor lists equal up to float rounding (a checkpoint may store them in fp16)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(x - y) <= 1e-3 * max(1.0, abs(y)) for p, q in zip(a, b) for x, y in zip(p, q))


def _feature_names(spec: ModelSpec, name: str) -> list[str]:
    if name in spec.features:
        return [name]
    return [n for n in spec.features if n.startswith(name + ".")]


def _pair_features(report: PairingReport, plan: TermPlan, default_connector: str | None) -> None:
    teacher, student = report.teacher, report.student
    term = plan.config
    where = plan.key
    teacher_name = term.teacher or term.student
    s_names, t_names = _feature_names(student, term.student), _feature_names(teacher, teacher_name)
    for side, name, names, spec in (("student", term.student, s_names, student), ("teacher", teacher_name, t_names, teacher)):
        if not names:
            close = difflib.get_close_matches(name, list(spec.features), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            report.errors.append(f"{where}.{side}: the {side} has no feature {name!r}.{hint} "
                                 f"It has: {', '.join(spec.features)} (or 'neck'/'backbone' for every level).")
    if not s_names or not t_names:
        return
    if default_connector is None and term.connector not in ("auto", "none"):
        report.errors.append(f"{where}.connector: {term.loss} compares each model's maps with its own kind (no connector); "
                             f"leave connector: auto")
        return
    connector = "loss" if default_connector is None else default_connector if term.connector == "auto" else term.connector
    if len(s_names) == 1 and len(t_names) == 1:
        candidates = [(s_names[0], t_names[0])]
    else:  # a group: pair levels by stride
        t_by_stride = {teacher.features[n][1]: n for n in t_names}
        candidates = []
        for s_name in s_names:
            t_name = t_by_stride.get(student.features[s_name][1])
            if t_name is None:
                plan.notes.append(f"student {s_name} (stride {student.features[s_name][1]}) has no teacher feature of that stride in "
                                  f"{teacher_name!r}: not distilled")
            else:
                candidates.append((s_name, t_name))
        if not candidates:
            report.errors.append(f"{where}: no feature of the student's {term.student!r} shares a stride with the teacher's "
                                 f"{teacher_name!r} (student strides {sorted({student.features[n][1] for n in s_names})}, "
                                 f"teacher {sorted({teacher.features[n][1] for n in t_names})}).")
            return
    for s_name, t_name in candidates:
        s_ch, s_stride, s_grid = student.features[s_name]
        t_ch, t_stride, t_grid = teacher.features[t_name]
        if connector == "loss":
            plan.features.append(FeaturePair(s_name, t_name, (s_ch, *s_grid), (t_ch, *t_grid), (s_stride, t_stride), connector, False))
            plan.notes.append(f"{s_name} ({s_ch} ch, stride {s_stride}) with teacher {t_name} ({t_ch} ch, stride {t_stride}), "
                              f"each read as it is")
            continue
        if s_grid != t_grid and not term.resample:
            same = [n for n, (_, stride, _) in teacher.features.items() if stride == s_stride]
            report.errors.append(
                f"{where}: student {s_name} is {s_grid[0]}x{s_grid[1]} (stride {s_stride}), teacher {t_name} is "
                f"{t_grid[0]}x{t_grid[1]} (stride {t_stride}). Pick a teacher feature of stride {s_stride}"
                + (f" ({', '.join(same)})" if same else " (the teacher has none)")
                + f", or set {where.split(' ')[0]}.resample: true to resize the student map to the teacher's grid."
            )
            continue
        if s_ch != t_ch and connector == "none":
            report.errors.append(f"{where}: student {s_name} has {s_ch} channels and teacher {t_name} {t_ch}; "
                                 f"connector: none cannot bridge that; use connector: conv or converter (or auto)")
            continue
        plan.features.append(FeaturePair(s_name, t_name, (s_ch, *s_grid), (t_ch, *t_grid), (s_stride, t_stride), connector,
                                         s_grid != t_grid))
        what = {"conv": "a learned 1x1 conv", "converter": "a learned converter (1x1 conv + BN + ReLU6)", "none": "no connector"}[connector]
        resized = f", resized {s_grid[0]}x{s_grid[1]} -> {t_grid[0]}x{t_grid[1]}" if s_grid != t_grid else ""
        plan.notes.append(f"{s_name} ({s_ch} ch) -> {what} -> {t_ch} ch{resized} vs teacher {t_name}")


# ---------------------------------------------------------------------------------------------
# Head maps -> the form response losses read
# ---------------------------------------------------------------------------------------------
def level_quality(level: HeadLevel) -> Tensor:
    """``[N, A, 1, H, W]`` in ``[0, 1]``: objectness for YOLO heads and the region proposal
    network of two-stage detectors; centerness x best class probability for FCOS heads; best
    class probability for heads without a score (YOLO DFL, RetinaNet)."""
    if level.score is not None and level.score_kind == "objectness":
        return level.score.sigmoid()
    best_class = level.cls_logits.sigmoid().amax(2, keepdim=True)
    if level.score is None:
        return best_class
    return level.score.sigmoid() * best_class


def ltrb_in_strides(level: HeadLevel) -> Tensor:
    """Boxes as distances from each cell's corner point ``(col, row) * stride`` to the four box
    edges, in units of the stride, ``[N, A, 4, H, W]``: the same numbers for any head family."""
    if level.box_format == "ltrb":
        return level.box
    if level.box_format == "ltrb_center":  # from the cell centre, half a stride right of and below the corner
        shift = torch.tensor([-0.5, -0.5, 0.5, 0.5], device=level.box.device, dtype=level.box.dtype)
        return level.box + shift.view(1, 1, 4, 1, 1)
    if level.box_format == "yolov5":
        anchors = (level.anchors.to(level.box) / level.stride).view(1, -1, 1, 1, 2)
        cell = decode_cell_boxes(level.box.permute(0, 1, 3, 4, 2), anchors)  # cx, cy from the corner, w, h; grid units
        half = cell[..., 2:] / 2
        ltrb = torch.cat([half - cell[..., :2], cell[..., :2] + half], -1)
        return ltrb.permute(0, 1, 4, 2, 3)
    if level.box_format == "deltas":  # torchvision BoxCoder deltas against anchors (RetinaNet, an RPN)
        from ..models.torchvision_detectors import deltas_to_ltrb

        return deltas_to_ltrb(level)
    raise ValueError(f"level {level.name}: unknown box format {level.box_format!r}")


def response_level(level: HeadLevel, box_space: str, classes: list[int] | None) -> ResponseLevel:
    """``level`` as response losses read it, keeping only ``classes`` (the classes both models
    know, in the student's order): a teacher's confidence in a class the student does not have
    is background to the student, so the quality takes the best of the kept classes only."""
    if classes is not None:
        level = replace(level, cls_logits=level.cls_logits[:, :, classes])
    if box_space == "raw":
        return ResponseLevel(level.cls_logits, level.box, level.score, level_quality(level), "raw", level.box_dist)
    return ResponseLevel(level.cls_logits, ltrb_in_strides(level), level.score, level_quality(level), "ltrb", level.box_dist)


def pick_best_anchor(level: ResponseLevel, num_anchors: int) -> ResponseLevel:
    """Reduce a teacher level to its most confident anchor at every location and repeat it for
    ``num_anchors`` student anchors."""
    best = level.quality.argmax(1, keepdim=True)  # [N, 1, 1, H, W]

    def take(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        index = best.expand(-1, 1, t.shape[2], -1, -1)
        return t.gather(1, index).expand(-1, num_anchors, -1, -1, -1)

    return ResponseLevel(take(level.cls_logits), take(level.box), take(level.score), take(level.quality), level.box_space)
