"""``kdet distill`` and ``kdet check``: a training run whose step is a :class:`Distiller`;
``kdet cache``: build a run's teacher-output cache without training (:mod:`kdet.distill.cache`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, DistillConfig
from ..data.pipeline import DetectionDataset
from ..engine import distributed
from ..models import Detector
from ..structures import DatasetIndex
from .cache import CachedTeacher
from .distiller import Distiller
from .pairing import PairingReport
from .recipe import with_default_recipe
from .setup import (build_step, check_strategies, check_train_rest, evaluate_teacher, pair_config, prepare_caches, shown,
                    teacher_entries, unlabelled_feed)

Log = Callable[[str], None]


def check(config: DistillConfig, log: Log = print) -> PairingReport:
    """Build the student (resolving its anchors from the data) and the teacher, and pair them."""
    from ..data.labelled import labelled_line
    from ..engine.trainer import labelled_summary, load_data, resolve_model_config
    from ..models import build_model

    config, recipe = with_default_recipe(config, log)
    index = load_data(config, log)
    student = build_model(resolve_model_config(config, index, log), index.class_names, config.data.input_size)
    report = shown(pair_config(config, student, index.class_names)[1])
    labelled = labelled_summary(config, index)
    if labelled is not None:
        report.notes.insert(0, labelled_line(labelled))
    if recipe is not None:
        report.notes.insert(0, f"recipe: distill.terms is empty, so the default recipe {recipe.name}: {recipe.why}")
    check_train_rest(config, index)
    return report


def distill(config: DistillConfig, out_dir: str | Path, *, resume: bool = False, log: Log = print, progress: bool = True) -> dict:
    """Distil ``config.teacher`` into the student ``config.model``; results as :func:`kdet.engine.trainer.train`,
    plus the teacher's own test metrics and profile under ``"teacher"`` and, with the teacher cache
    (``config.distill.cache.dir``), what its build did under ``"teacher_cache"``."""
    from ..engine.trainer import train

    out_dir = Path(out_dir)
    made: dict = {}
    check_cache_settings(config)
    check_strategies(config)
    config, _ = with_default_recipe(config, log)

    def build(student, index: DatasetIndex, train_set: DetectionDataset, run_log: Log) -> Distiller:
        step, built = build_step(config, student, index, train_set, out_dir, run_log)
        made.update(built)
        return step

    results = train(config, out_dir, resume=resume, log=log, progress=progress, step=build)
    if not distributed.is_main_process():  # under torchrun, rank 0 alone scores the teachers and writes results.json
        return results
    results.update(teacher_entries(made, config, log))
    if "cache" in made:
        results["teacher_cache"] = made["cache"]
    if "unlabelled" in made:
        results["unlabelled"] = made["unlabelled"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    if config.model.family == "ultralytics":  # the student also as an Ultralytics checkpoint
        from ..models.ultralytics import write_ultralytics_copy

        write_ultralytics_copy(out_dir, log)
    return results


def check_cache_settings(config: DistillConfig) -> None:
    cache = config.distill.cache
    if not cache.dir and (cache.views is not None or cache.dtype != "fp16"):
        raise ConfigError("distill.cache.views and distill.cache.dtype apply to the teacher cache only; "
                          "set its directory too (kdet distill --teacher-cache DIR, or distill.cache.dir)")


def prepare_cache(config: DistillConfig, teacher: Detector, report: PairingReport, train_set: DetectionDataset,
                  log: Log) -> tuple[CachedTeacher | None, dict]:
    """Open (and build what is missing of) the teacher cache for ``config``'s training set
    ``train_set``, on the augmented samples the trainer makes of it."""
    from .cache import prepare

    return prepare(config.distill.cache, teacher=teacher, report=report, dataset=train_set, epochs=config.train.epochs,
                   batch_size=config.train.batch_size, workers=config.data.workers, log=log)


def build_cache(config: DistillConfig, log: Log = print) -> dict:
    """``kdet cache``: build the teacher cache a ``kdet distill`` of ``config`` will read, and
    nothing else. Returns what the build did (as ``results.json`` records it)."""
    from ..engine.trainer import load_data, pick_device, resolve_model_config, training_set
    from ..models import build_model

    check_cache_settings(config)
    if not config.distill.cache.dir:
        raise ConfigError("no cache directory; pass --teacher-cache DIR (or set distill.cache.dir)")
    config, _ = with_default_recipe(config, log)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    index = load_data(config, log)
    student = build_model(resolve_model_config(config, index, lambda _: None), index.class_names, config.data.input_size)
    links, pairing = pair_config(config, student, index.class_names)
    pairing.raise_errors()
    train_set = training_set(config, index)
    feed = unlabelled_feed(config, index, len(train_set), log)
    return prepare_caches(config, links, train_set, feed, pick_device(config.train.device), log)


def record_cache_build(out_dir: Path, stats: dict) -> dict:
    """Keep what the teacher cache did in ``teacher_cache.json`` of the run directory; the build
    times of a resumed run's processes add up."""
    path = out_dir / "teacher_cache.json"
    if path.is_file() and stats.get("used"):
        earlier = json.loads(path.read_text()).get("build_time_s", 0.0)
        stats = {**stats, "build_time_s": round(earlier + stats["build_time_s"], 2)}
    path.write_text(json.dumps(stats, indent=1))
    return stats


def teacher_results(teacher, config: DistillConfig, index: DatasetIndex, log: Log) -> dict:
    """The teacher scored on the same split and input size as the student, with its size and speed."""
    from ..engine.profile import profile_model
    from ..engine.trainer import eval_settings, test_split

    split = test_split(config, index)
    metrics = evaluate_teacher(teacher, index.split(split), index.class_names, config.data.input_size, **eval_settings(config))
    profile = profile_model(teacher, config.data.input_size, threads=config.train.threads)
    coco = metrics["coco"]
    log(f"teacher on {split}: AP {coco['AP']:.3f}, AP50 {coco['AP50']:.3f}, VOC mAP50 {metrics['voc']['mAP50_all']:.3f}")
    return {"split": split, "checkpoint": config.teachers()[0].checkpoint, "params": profile.params, "metrics": metrics, "profile": profile.__dict__}


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
