"""``kdet distill`` and ``kdet check``: a training run whose objective is a :class:`Distiller`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..config import DistillConfig
from ..structures import DatasetIndex
from .distiller import Distiller, check_pairing, load_teacher
from .pairing import PairingReport

Log = Callable[[str], None]


def check(config: DistillConfig, log: Log = print) -> PairingReport:
    """Build the student (resolving its anchors from the data) and the teacher, and pair them."""
    from ..engine.trainer import load_data, resolve_model_config
    from ..models import build_model

    index = load_data(config, log)
    student = build_model(resolve_model_config(config, index, log), index.class_names, config.data.input_size)
    _, report = check_pairing(config, student, index.class_names)
    return report


def distill(config: DistillConfig, out_dir: str | Path, *, resume: bool = False, log: Log = print, progress: bool = True) -> dict:
    """Distil ``config.teacher`` into the student ``config.model``; results as :func:`kdet.engine.trainer.train`,
    plus the teacher's own test metrics and profile under ``"teacher"``."""
    from ..engine.trainer import train

    out_dir = Path(out_dir)
    made: dict = {}

    def build(student, index: DatasetIndex, run_log: Log) -> Distiller:
        teacher = load_teacher(config.teacher, index.class_names, config.data.input_size)
        _, report = check_pairing(config, student, index.class_names, teacher=teacher)
        for line in report_lines(report):
            run_log(line)
        (out_dir / "pairing.json").write_text(json.dumps(report_dict(report), indent=1))
        made.update(teacher=teacher[0], index=index)
        return Distiller(teacher[0], report, config.distill.hard_weight, schedule=config.distill.schedule,
                         final_ratio=config.distill.final_ratio)

    results = train(config, out_dir, resume=resume, log=log, progress=progress, objective=build)
    results["teacher"] = teacher_results(made["teacher"], config, made["index"], log)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def teacher_results(teacher, config: DistillConfig, index: DatasetIndex, log: Log) -> dict:
    """The teacher scored on the same split and input size as the student, with its size and speed."""
    from ..engine.evaluate import evaluate_model
    from ..engine.profile import profile_model
    from ..engine.trainer import eval_settings

    split = config.data.test_split if config.data.test_split in index.splits else config.data.val_split
    metrics = evaluate_model(teacher, index.split(split), config.data.input_size, **eval_settings(config))
    profile = profile_model(teacher, config.data.input_size, threads=config.train.threads)
    coco = metrics["coco"]
    log(f"teacher on {split}: AP {coco['AP']:.3f}, AP50 {coco['AP50']:.3f}, VOC mAP50 {metrics['voc']['mAP50_all']:.3f}")
    return {"split": split, "checkpoint": config.teacher.checkpoint, "params": profile.params, "metrics": metrics, "profile": profile.__dict__}


def report_lines(report: PairingReport) -> list[str]:
    """The pairing report as plain lines (what ``kdet distill`` logs; ``kdet check`` prints tables)."""
    lines = [f"pairing: teacher {report.teacher.family} ({len(report.teacher.levels)} levels, strides "
             f"{'/'.join(str(l.stride) for l in report.teacher.levels)}) -> student {report.student.family} "
             f"({len(report.student.levels)} levels, strides {'/'.join(str(l.stride) for l in report.student.levels)})"]
    lines += [f"  note: {note}" for note in report.notes]
    for plan in report.terms:
        state = "on" if plan.active else "off"
        lines.append(f"  {plan.key}, weight {plan.config.weight} [{state}]")
        lines += [f"    {note}" for note in plan.notes]
    lines += [f"  ERROR: {error}" for error in report.errors]
    return lines


def report_dict(report: PairingReport) -> dict:
    return {
        "ok": report.ok,
        "notes": report.notes,
        "errors": report.errors,
        "terms": [
            {"key": p.key, "loss": p.config.loss, "kind": p.kind, "active": p.active, "weight": p.config.weight,
             "level_pairs": p.level_pairs, "box_space": p.box_space, "pick_teacher_anchor": p.pick_teacher_anchor,
             "features": [f.__dict__ for f in p.features], "notes": p.notes}
            for p in report.terms
        ],
    }
