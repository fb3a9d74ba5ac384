"""A distillation step from a config: the teachers loaded and paired with the student, their
caches, and the :class:`~kdet.distill.distiller.Distiller` that trains the student against them.
``kdet distill``, ``kdet check`` and ``kdet cache`` build their teachers here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import DistillConfig, TeacherConfig
from ..data.pipeline import DetectionDataset
from ..models import Detector
from ..structures import DatasetIndex, ImageRecord
from .distiller import Distiller, load_teacher
from .pairing import PairingReport
from .teachers import TeacherLink, TeacherPairing, pair_teachers, several_report_dict, teacher_lines

Log = Callable[[str], None]


def load_teachers(config: DistillConfig, class_names: list[str]) -> list[tuple[TeacherConfig, Detector, int]]:
    """Every teacher of ``config`` (named), loaded frozen, with the input size it was trained at."""
    out = []
    for teacher in config.teachers():
        model, trained_size = load_teacher(teacher, class_names, config.data.input_size)
        out.append((teacher, model, trained_size))
    return out


def pair_config(config: DistillConfig, student: Detector, class_names: list[str],
                teachers: list[tuple[TeacherConfig, Detector, int]] | None = None) -> tuple[list[TeacherLink], TeacherPairing]:
    """Load the teachers (unless given) and pair each with ``student`` at the configured input size."""
    size = (config.data.input_size, config.data.input_size)
    teachers = teachers if teachers is not None else load_teachers(config, class_names)
    pairing = pair_teachers([(t, model.describe(size), trained) for t, model, trained in teachers], student.describe(size),
                            config.distill)
    links = [TeacherLink(t.name, model, pairing.reports[t.name], t.weight) for t, model, _ in teachers]
    return links, pairing


def shown(pairing: TeacherPairing) -> PairingReport | TeacherPairing:
    """What ``kdet check`` and ``pairing.json`` show: the one teacher's report, or every teacher's."""
    return pairing if pairing.several else next(iter(pairing.reports.values()))


def report_lines(report: PairingReport | TeacherPairing) -> list[str]:
    from .run import report_lines as single

    return teacher_lines(report, single) if isinstance(report, TeacherPairing) else single(report)


def report_dict(report: PairingReport | TeacherPairing) -> dict:
    from .run import report_dict as single

    return several_report_dict(report, single) if isinstance(report, TeacherPairing) else single(report)


def build_step(config: DistillConfig, student: Detector, index: DatasetIndex, train_set: DetectionDataset, out_dir: Path,
               log: Log) -> tuple[Distiller, dict]:
    """The run's distillation step, after logging the pairing and writing ``pairing.json``;
    and what the run needs afterwards: the teachers (``links``), the data ``index`` and, with
    the teacher cache, what its build did (``cache``)."""
    from .run import prepare_cache, record_cache_build

    links, pairing = pair_config(config, student, index.class_names)
    for line in report_lines(shown(pairing)):
        log(line)
    (out_dir / "pairing.json").write_text(json.dumps(report_dict(shown(pairing)), indent=1))
    pairing.raise_errors()
    made: dict = {"links": links, "index": index}
    if config.distill.cache.dir:
        device = next(student.parameters()).device
        stats = {}
        for link in links:
            link.cached, stats[link.name] = prepare_cache(config, link.model.to(device), link.report, train_set, log)
            link.model.cpu()
        made["cache"] = record_cache_build(out_dir, cache_stats(stats))
    step = Distiller(student, links, pairing, config.distill.hard_weight, schedule=config.distill.schedule,
                     final_ratio=config.distill.final_ratio, stop_epoch=config.distill.stop_epoch, assign=config.distill.assign,
                     auto=config.distill.auto, log=log, auto_weights_file=out_dir / "auto_weights.json")
    return step, made


def cache_stats(stats: dict[str, dict]) -> dict:
    """What the cache builds of a run did: one teacher's record, or each teacher's under
    ``teachers`` with their build times added up."""
    if len(stats) == 1:
        return next(iter(stats.values()))
    return {"used": any(s.get("used") for s in stats.values()),
            "build_time_s": round(sum(s.get("build_time_s", 0.0) for s in stats.values()), 2), "teachers": stats}


def teacher_entries(made: dict, config: DistillConfig, log: Log) -> dict:
    """``results.json`` entries of the teachers, each scored on the student's test split:
    ``teacher`` for one, ``teachers`` (a list, each with its name and weight) for several."""
    from .run import teacher_results

    links: list[TeacherLink] = made["links"]
    configs = {t.name: t for t in config.teachers()}
    entries = []
    for link in links:
        entry = teacher_results(link.model, config, made["index"], log if len(links) == 1 else _named(log, link.name))
        entry.update(checkpoint=configs[link.name].checkpoint)
        if len(links) > 1:
            entry.update(name=link.name, weight=link.weight)
        entries.append(entry)
    return {"teacher": entries[0]} if len(entries) == 1 else {"teachers": entries}


def evaluate_teacher(teacher: Detector, records: list[ImageRecord], class_names: list[str], input_size: int, **kwargs) -> dict:
    """A teacher's metrics on the student's ``records`` and classes: its predictions matched to
    ``class_names`` by name, so a teacher that knows fewer classes (a specialist) scores 0 on
    those it never predicts and is compared with the student on the same classes."""
    from ..engine.evaluate import predict
    from ..engine.metrics import ImagePredictions, evaluate

    predictions = predict(teacher, records, input_size, **kwargs)
    if list(teacher.class_names) != list(class_names):
        lookup = np.array([class_names.index(n) if n in class_names else -1 for n in teacher.class_names], dtype=np.int64)
        predictions = [ImagePredictions(p.image_id, p.boxes[keep], p.scores[keep], lookup[p.labels][keep])
                       for p in predictions for keep in [lookup[p.labels] >= 0]]
    return evaluate(records, predictions, class_names)


def _named(log: Log, name: str) -> Log:
    return lambda line: log(line.replace("teacher on", f"teacher {name} on", 1))


__all__ = ["build_step", "evaluate_teacher", "load_teachers", "pair_config", "report_dict", "report_lines", "shown", "teacher_entries"]
