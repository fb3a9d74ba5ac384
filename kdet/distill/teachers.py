"""The teachers of a distillation step, and how each term reads them.

A run has one teacher or several (``teacher:`` a list). Each teacher is a :class:`TeacherLink`:
its name, its weight, the model (or its cached outputs) and the pairing report of that teacher
with the student, which matches its classes to the student's by name. A term reads

* one teacher: the only one, or the one it names (``teacher: NAME``, or ``teacher: NAME.neck.p4``
  for a feature term reading the teacher's ``neck.p4``); it is computed exactly as with a single
  teacher;
* every teacher, averaged: a response term that names no teacher when there are several. The
  teachers' head outputs are combined into one teacher level per student level
  (:func:`average_levels`): class probabilities averaged over the teachers that know each class,
  weighted by ``teacher.weight``, so two specialists trained on different classes together
  teach every class; the quality (objectness) of a location is the largest of the per-class
  averages of the teachers' qualities, which is their average when all teachers know the same
  classes and the larger one for specialists (an object either specialist sees is an object);
  boxes are averaged with each teacher's weight times its quality at the location, so the
  teacher that sees an object there speaks for its box. Boxes are compared decoded (edge
  distances in strides), whatever the heads are.

Feature terms always read one teacher: with several, they name it. Losses that compare raw head
maps (``l2_logits``) or box distributions (``ld``) name one teacher too.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..config import DistillSettings, ModelConfig, TeacherConfig, TermConfig
from ..models import Detector, ModelSpec
from .cache import CachedTeacher
from .losses import DISTILL_LOSSES, ResponseLevel
from .pairing import PairingError, PairingReport, TermPlan, pair


@dataclass
class TeacherLink:
    """One teacher of a distillation step: ``mode`` is ``frozen`` (a fixed model, or its cached
    outputs), ``ema`` (the student's own moving average, the mean teacher) or ``trained`` (online
    distillation: trained in the same step, from its labels and the student). A trained teacher
    has ``reverse``, the student paired as its teacher (for the response terms it learns
    through), and ``model_config``, its architecture (to save it)."""

    name: str
    model: Detector
    report: PairingReport
    weight: float = 1.0
    cached: CachedTeacher | None = None
    mode: str = "frozen"
    cached_unlabelled: CachedTeacher | None = None  # its cached outputs on the unlabelled images (data.unlabelled)
    reverse: PairingReport | None = None
    model_config: ModelConfig | None = None
    batch_stats: bool = False  # its BatchNorm layers read the batch's statistics (teacher.batch_stats)

    @property
    def student_classes(self) -> list[int] | None:
        """Indices of the classes this teacher knows in the student's list; ``None``: all, in order."""
        same = self.report.student_classes == list(range(len(self.report.student.class_names)))
        return None if same else self.report.student_classes

    @property
    def teacher_classes(self) -> list[int] | None:
        """The same classes in the teacher's list; ``None``: every class of the teacher, in order."""
        same = self.report.teacher_classes == list(range(len(self.report.teacher.class_names)))
        return None if same else self.report.teacher_classes


@dataclass
class Term:
    """One configured term and the plan of each teacher it reads (one, or every teacher for an
    averaged response term). ``levels``: the student levels an averaged term compares (those
    every teacher has a level of the same stride for); ``classes``: the student classes at least
    one teacher knows."""

    index: int
    config: TermConfig
    kind: str
    plans: dict[str, TermPlan]
    levels: list[int] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)

    @property
    def averaged(self) -> bool:
        return len(self.plans) > 1

    @property
    def active(self) -> bool:
        return all(plan.active for plan in self.plans.values())

    @property
    def plan(self) -> TermPlan:
        """The plan of the (first) teacher the term reads."""
        return next(iter(self.plans.values()))

    @property
    def key(self) -> str:
        return f"distill.terms.{self.index} ({self.config.loss})"


@dataclass
class TeacherPairing:
    """Every teacher's pairing report with the student, and the terms routed to them."""

    reports: dict[str, PairingReport]
    terms: list[Term]
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def single(name: str, report: PairingReport) -> "TeacherPairing":
        return TeacherPairing({name: report}, [Term(p.index, p.config, p.kind, {name: p}) for p in report.terms],
                              weights={name: 1.0})

    @property
    def several(self) -> bool:
        return len(self.reports) > 1

    def all_errors(self) -> list[str]:
        if not self.several:
            return [*next(iter(self.reports.values())).errors, *self.errors]
        return [f"teacher {name}: {error}" for name, report in self.reports.items() for error in report.errors] + self.errors

    @property
    def ok(self) -> bool:
        return not self.all_errors()

    def raise_errors(self) -> None:
        errors = self.all_errors()
        if errors:
            raise PairingError("the teachers and the student cannot be paired as configured:\n  - " + "\n  - ".join(errors)
                               + "\nRun `kdet check` on the config for the full report.")


def teacher_reference(value: str | None, names: list[str]) -> tuple[str | None, str | None]:
    """A term's ``teacher:`` as ``(teacher name, feature)``: ``bars`` -> ``("bars", None)``,
    ``bars.neck.p4`` -> ``("bars", "neck.p4")``, ``neck.p4`` -> ``(None, "neck.p4")``."""
    if value is None:
        return None, None
    first, _, rest = value.partition(".")
    if first in names:
        return first, rest or None
    return None, value


def pair_teachers(teachers: list[tuple[TeacherConfig, ModelSpec, int | None]], student: ModelSpec,
                  settings: DistillSettings) -> TeacherPairing:
    """Pair every teacher (its config with the name set, its spec at the student's input size and
    the input size it was trained at) with ``student`` and route each term of ``settings`` to the
    teacher(s) it reads (see the module docstring)."""
    names = [config.name for config, _, _ in teachers]
    routes: dict[int, list[str]] = {}
    terms: list[TermConfig] = []
    errors: list[str] = []
    for index, term in enumerate(settings.terms):
        named, feature = teacher_reference(term.teacher, names)
        terms.append(term.model_copy(update={"teacher": feature}) if named else term)
        if named or len(names) == 1:
            routes[index] = [named or names[0]]
            continue
        loss = DISTILL_LOSSES._items.get(term.loss)
        key = f"distill.terms.{index} ({term.loss})"
        if loss is None:
            routes[index] = names[:1]  # the pairing of the first teacher names the unknown loss
        elif loss.kind == "feature":
            errors.append(f"{key}: a feature term reads one teacher's maps; with several teachers name the one it reads: "
                          f"teacher: NAME (its feature of the student's name) or NAME.FEATURE; teachers: {', '.join(names)}")
        elif loss.box_space == "raw" or loss.needs_box_dist:
            what = "raw head maps" if loss.box_space == "raw" else "box-edge distributions"
            errors.append(f"{key}: {term.loss} compares {what}, which cannot be averaged over teachers; name the teacher it "
                          f"reads (teacher: NAME; teachers: {', '.join(names)}), or use kl, objectness_scaled or soft_bce, "
                          f"which average the teachers' probabilities")
        else:
            routes[index] = list(names)
    settings = settings.model_copy(update={"terms": terms})
    reports = {}
    for config, spec, trained_size in teachers:
        mine = {index for index, route in routes.items() if config.name in route}
        reports[config.name] = pair(spec, student, settings, teacher_input_size=trained_size,
                                    only=None if len(names) == 1 else mine)
    result = TeacherPairing(reports, [], errors=errors, weights={config.name: config.weight for config, _, _ in teachers})
    if len(names) == 1:
        result.terms = TeacherPairing.single(names[0], reports[names[0]]).terms
        return result
    unread = [name for name in names if not any(name in route for route in routes.values())]
    if unread:
        errors.append(f"teacher(s) {', '.join(unread)} are read by no term; name them in a term (teacher: NAME) or remove them")
    if settings.assign == "teacher":
        errors.append("distill.assign: teacher reads one teacher's predictions; with several teachers leave distill.assign: own")
    for index, route in sorted(routes.items()):
        plans = {name: plan for name in route for plan in reports[name].terms if plan.index == index}
        if len(plans) != len(route):
            continue  # the pairing of some teacher refused it and says why
        term = Term(index, terms[index], next(iter(plans.values())).kind, plans)
        if term.averaged:
            _plan_average(term, reports, student, result)
        result.terms.append(term)
    _note_classes(result, student)
    return result


def _plan_average(term: Term, reports: dict[str, PairingReport], student: ModelSpec, result: TeacherPairing) -> None:
    levels = None
    for plan in term.plans.values():
        paired = {s for s, _ in plan.level_pairs}
        levels = paired if levels is None else levels & paired
    term.levels = sorted(levels or ())
    term.classes = sorted(set().union(*(reports[name].student_classes for name in term.plans)))
    if not term.levels:
        if all(plan.level_pairs for plan in term.plans.values()):
            result.errors.append(f"{term.key}: no student level has a level of the same stride in every teacher; name the teacher "
                                 f"the term reads (teacher: NAME)")
        return
    weights = ", ".join(f"{name} {result.weights[name]:g}" for name in term.plans)
    names = ", ".join(student.levels[s].name for s in term.levels)
    term.plan.notes.insert(0, f"averaged over the teachers (weights: {weights}) on student levels {names}: class "
                              f"probabilities over the teachers that know each class, quality the largest per-class average, "
                              f"boxes (edge distances in strides) weighted by each teacher's quality")


def _note_classes(result: TeacherPairing, student: ModelSpec) -> None:
    """Which teacher teaches which student class; classes no teacher knows learn from the labels."""
    taught: dict[str, list[str]] = {}
    for name, report in result.reports.items():
        for index in report.student_classes:
            taught.setdefault(student.class_names[index], []).append(name)
    parts = [f"{cls} from {' and '.join(names)}" for cls, names in taught.items()]
    result.notes.append("classes matched by name per teacher: " + "; ".join(parts))
    untaught = [cls for cls in student.class_names if cls not in taught]
    if untaught:
        result.notes.append(f"no teacher knows {untaught}: those classes learn from the labels only")


def average_levels(levels: list[ResponseLevel], positions: list[list[int]], weights: list[float], num_classes: int) -> ResponseLevel:
    """One teacher level from several (see the module docstring).

    ``levels``: each teacher's level with boxes decoded (``box_space="ltrb"``) and the same anchors
    and grid as the student level, holding the classes it knows; ``positions``: where each of
    those classes sits among the ``num_classes`` classes of the result; ``weights``: each
    teacher's weight. Returns class logits ``[N, A, num_classes, H, W]`` (logits of the averaged
    probabilities), the averaged boxes and the combined quality; no score or box distributions.
    """
    first = levels[0].quality
    n, a, _, h, w = first.shape
    prob_sum = first.new_zeros(n, a, num_classes, h, w)
    quality_sum = first.new_zeros(n, a, num_classes, h, w)
    class_weight = first.new_zeros(num_classes)
    box_sum = first.new_zeros(n, a, 4, h, w)
    box_weight = first.new_zeros(n, a, 1, h, w)
    for level, where, weight in zip(levels, positions, weights):
        index = torch.as_tensor(where, device=first.device)
        prob_sum.index_add_(2, index, weight * level.cls_logits.sigmoid())
        quality_sum.index_add_(2, index, (weight * level.quality).expand(-1, -1, len(where), -1, -1))
        class_weight.index_add_(0, index, torch.full((len(where),), float(weight), device=first.device, dtype=first.dtype))
        share = weight * (level.quality + 1e-6)
        box_sum = box_sum + share * level.box
        box_weight = box_weight + share
    norm = class_weight.clamp_min(1e-12).view(1, 1, -1, 1, 1)
    probs = (prob_sum / norm).clamp(1e-6, 1 - 1e-6)
    quality = (quality_sum / norm).amax(2, keepdim=True)
    return ResponseLevel(torch.logit(probs), box_sum / box_weight, None, quality, "ltrb", None)


def several_report_dict(pairing: TeacherPairing, report_dict) -> dict:
    """``pairing.json`` of a run with several teachers: each teacher's report (``report_dict``)."""
    return {"ok": pairing.ok, "notes": pairing.notes, "errors": pairing.all_errors(),
            "teachers": {name: {"weight": pairing.weights.get(name, 1.0), **report_dict(report)}
                         for name, report in pairing.reports.items()},
            "terms": [{"key": t.key, "teachers": list(t.plans), "averaged": t.averaged} for t in pairing.terms]}


def teacher_lines(pairing: TeacherPairing, report_lines) -> list[str]:
    """The pairing of several teachers as plain lines: each teacher's report, then the routing."""
    lines = []
    for name, report in pairing.reports.items():
        lines.append(f"teacher {name} (weight {pairing.weights.get(name, 1.0):g}):")
        lines += [f"  {line}" for line in report_lines(report)]
    lines += [f"note: {note}" for note in pairing.notes]
    for term in pairing.terms:
        lines.append(f"{term.key} reads " + ("every teacher, averaged" if term.averaged else f"teacher {next(iter(term.plans))}"))
    lines += [f"ERROR: {error}" for error in pairing.errors]
    return lines


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its BatchNorm layers normalising by each batch's own statistics (as in
    training mode) without updating their running statistics; every other layer keeps its mode.
    The layers' modes are restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:  # training without tracking: batch statistics, running ones neither read nor written
            m.training, m.track_running_stats = True, False
        yield model
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


__all__ = ["TeacherLink", "TeacherPairing", "Term", "average_levels", "batch_statistics", "pair_teachers",
           "teacher_reference"]
