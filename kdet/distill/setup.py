"""A distillation step from a config: the teachers loaded and paired with the student, their
caches, and the :class:`~kdet.distill.distiller.Distiller` that trains the student against them.
``kdet distill``, ``kdet check`` and ``kdet cache`` build their teachers here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import TRAIN_REST, TRAIN_REST_NEEDS_FRACTION, ConfigError, DistillConfig, ModelConfig, TeacherConfig
from ..data.pipeline import DetectionDataset
from ..data.unlabelled import UnlabelledFeed, read_unlabelled
from ..engine import distributed
from ..models import Detector, ModelSpec, build_model
from ..structures import DatasetIndex, ImageRecord
from .distiller import Distiller, load_teacher
from .losses import DISTILL_LOSSES
from .online import OnlineTeacher
from .pairing import PairingReport, pair
from .recipe import teacher_model_config
from .teachers import TeacherLink, TeacherPairing, pair_teachers, several_report_dict, teacher_lines

Log = Callable[[str], None]


def check_strategies(config: DistillConfig) -> None:
    """Refuse, before anything is loaded, the combinations of teachers and settings that cannot
    work, saying what to change."""
    teachers = config.teachers()
    for key, teacher in zip(_teacher_keys(config), teachers):
        if teacher.self and (teacher.checkpoint or teacher.model or teacher.weights):
            raise ConfigError(f"{key}.self: ema makes the student's own moving average its teacher; remove {key}.checkpoint, "
                              f".model and .weights, or remove {key}.self")
        if teacher.batch_stats is True and teacher.train:
            raise ConfigError(f"{key}.batch_stats: a teacher trained online (train: true) already normalises with the batch's "
                              f"statistics; remove {key}.batch_stats")
        if teacher.batch_stats is True and config.distill.cache.dir:
            raise ConfigError(f"{key}.batch_stats: with the batch's statistics a teacher's outputs on an image depend on the "
                              "other images of its batch, so they cannot be cached; remove --teacher-cache / "
                              f"distill.cache.dir, or {key}.batch_stats")
    special = [(key, t) for key, t in zip(_teacher_keys(config), teachers) if t.self]
    if special and len(teachers) > 1:
        raise ConfigError(f"{special[0][0]}: the student's own EMA (self: ema) is a teacher on its own; remove the other teachers")
    if special and not config.train.ema:
        raise ConfigError("teacher: {self: ema} reads the student's exponential moving average; set train.ema: true")
    auto = [f"distill.terms.{i} ({term.loss})" for i, term in enumerate(config.distill.terms) if term.weight == "auto"]
    if special and auto:
        raise ConfigError(f"{', '.join(auto)}: weight: auto is measured over the first distill.auto.steps steps, when the "
                          "student's moving average (teacher: {self: ema}) is still the student itself: the terms and their "
                          "gradients are near zero then, so the measured weight is huge and training diverges once the two "
                          "drift apart. Give the weight as a number")
    if special and config.distill.cache.dir:
        raise ConfigError("teacher: {self: ema} changes with every step, so its outputs cannot be cached; remove "
                          "--teacher-cache / distill.cache.dir")
    trained = [(key, t) for key, t in zip(_teacher_keys(config), teachers) if t.train]
    if trained and (len(teachers) > 1 or trained[0][1].self):
        raise ConfigError(f"{trained[0][0]}.train: online distillation trains one teacher beside the student; give one "
                          f"teacher (a checkpoint, or teacher.model) and no self: ema")
    if config.distill.pseudo_labels is not None and not config.data.unlabelled:
        raise ConfigError("distill.pseudo_labels: the teachers' boxes become targets on unlabelled images; set data.unlabelled "
                          "too (a folder of images, or a dataset whose labels are ignored), or remove distill.pseudo_labels")
    if trained and config.distill.cache.dir:
        raise ConfigError("teacher.train: true changes the teacher with every step, so its outputs cannot be cached; remove "
                          "--teacher-cache / distill.cache.dir")


def _teacher_keys(config: DistillConfig) -> list[str]:
    return ["teacher"] if not isinstance(config.teacher, list) else [f"teacher.{i}" for i in range(len(config.teacher))]


def load_teachers(config: DistillConfig, class_names: list[str], student: ModelSpec | None = None
                  ) -> list[tuple[TeacherConfig, Detector | None, int | None]]:
    """Every teacher of ``config`` (named), loaded frozen, with the input size it was trained at;
    ``None`` for the student's own EMA (``self: ema``), which exists once training starts. A
    teacher trained online from scratch (``teacher.model`` without weights) is built new, with
    the ``student``'s anchors for ``anchors: auto``."""
    out = []
    for teacher in config.teachers():
        if teacher.self:
            out.append((teacher, None, None))
        elif teacher.train and teacher.model is not None and not teacher.weights:
            model = build_model(online_model_config(teacher, student), class_names, config.data.input_size)
            out.append((teacher, model.eval(), teacher.input_size or config.data.input_size))
        else:
            model, trained_size = load_teacher(teacher, class_names, config.data.input_size)
            out.append((teacher, model, trained_size))
    return out


def online_model_config(teacher: TeacherConfig, student: ModelSpec | None) -> ModelConfig:
    """The architecture of a teacher trained online, as its ``teacher_best.pt`` records it."""
    if teacher.model is None:
        return teacher_model_config(teacher)
    model = teacher.model
    if model.family == "yolo" and model.head == "anchor" and model.anchors == "auto":
        anchors = [[list(a) for a in level.anchors] for level in student.levels] if (
            not teacher.weights and student is not None and all(level.anchors for level in student.levels)) else "default"
        model = model.model_copy(update={"anchors": anchors})
    return model.model_copy(update={"pretrained_backbone": None if teacher.weights else model.pretrained_backbone})


def pair_config(config: DistillConfig, student: Detector, class_names: list[str],
                teachers: list[tuple[TeacherConfig, Detector | None, int | None]] | None = None) -> tuple[list[TeacherLink], TeacherPairing]:
    """Load the teachers (unless given) and pair each with ``student`` at the configured input
    size. The student's own EMA is paired as the student (it has the student's architecture)."""
    check_strategies(config)
    size = (config.data.input_size, config.data.input_size)
    student_spec = student.describe(size)
    teachers = teachers if teachers is not None else load_teachers(config, class_names, student_spec)
    specs = {t.name: model.describe(size) if model is not None else student_spec for t, model, _ in teachers}
    pairing = pair_teachers([(t, specs[t.name], trained) for t, _, trained in teachers], student_spec, config.distill)
    links = [TeacherLink(t.name, model if model is not None else student, pairing.reports[t.name], t.weight,
                         mode="ema" if t.self else "trained" if t.train else "frozen", batch_stats=t.reads_batch_stats())
             for t, model, _ in teachers]
    # what concerns the whole run goes where kdet check shows it: the teacher's report when there is one
    shown_notes = pairing.notes if pairing.several else links[0].report.notes
    shown_errors = pairing.errors if pairing.several else links[0].report.errors
    if any(link.mode == "ema" for link in links):
        shown_notes.append("teacher: the student's own exponential moving average (mean teacher), updated after every "
                           "step; it starts as the student and lags behind it")
    for link in links:
        if link.batch_stats:
            shown_notes.append(f"{link.name}: its BatchNorm layers normalise with each batch's statistics, as the student's do "
                               "in training (teacher.batch_stats)")
    (start, stop), epochs = config.distilled_epochs(), config.train.epochs
    if (start, stop) != (1, epochs):
        shown_notes.append(f"distillation in epochs {start} to {stop} of {epochs} "
                           f"(distill.start_epoch, distill.stop_epoch); the student trains on its labels alone in the others")
    if config.data.unlabelled:
        per_batch = max(1, round(config.data.unlabelled_ratio * config.train.batch_size))
        source = ("train_rest: the training images data.labelled_fraction leaves out" if config.data.unlabelled == TRAIN_REST
                  else config.data.unlabelled)
        shown_notes.append(
            f"unlabelled images ({source}): {per_batch} join each batch of {config.train.batch_size}; they reach "
            f"the distillation terms only, each model's own detection loss reads the labelled images"
            + (f", and the student's also the teachers' detections on them of score >= {config.distill.pseudo_labels.score:g} "
               f"(after feature-map NMS) as boxes, weighted {config.distill.pseudo_labels.weight:g}"
               if config.distill.pseudo_labels else "; terms that read the ground truth find no box on them"))
    for (config_entry, _, _), link in zip(teachers, links):
        if link.mode == "trained":
            link.model_config = online_model_config(config_entry, student_spec)
            _pair_online(config, link, specs[link.name], student_spec, shown_notes, shown_errors)
    return links, pairing


def _pair_online(config: DistillConfig, link: TeacherLink, teacher: ModelSpec, student: ModelSpec, notes: list[str],
                 errors: list[str]) -> None:
    """A teacher trained online: it learns the run's labels, so it needs the data's classes, and
    it learns from the student through the response terms in reverse (``link.reverse``)."""
    if list(teacher.class_names) != list(student.class_names):
        errors.append(f"teacher.train: true trains the teacher on this data's labels, so it needs the data's classes in "
                      f"order ({list(student.class_names)}); the teacher has {list(teacher.class_names)}. Start it from "
                      f"teacher.model (from scratch) or from a checkpoint trained on this data")
    reversible, skipped = set(), []
    for plan in link.report.terms:
        loss = DISTILL_LOSSES.get(plan.config.loss)
        if plan.kind != "response":
            continue
        if "assignment" in loss.context:
            skipped.append(plan.key)
        else:
            reversible.add(plan.index)
    link.reverse = pair(student, teacher, config.distill, only=reversible)
    errors += [f"the teacher learning from the student (reversed): {error}" for error in link.reverse.errors]
    taught = ", ".join(plan.key for plan in link.reverse.terms) or "no term"
    notes.append(f"online (mutual) distillation: the teacher trains on the labels beside the student and learns from it "
                 f"through {taught} in reverse (the student's outputs as its targets); feature terms teach the student only"
                 + (f"; not reversed: {', '.join(skipped)} (they read the student's own assignment)" if skipped else ""))


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
    from .run import record_cache_build

    links, pairing = pair_config(config, student, index.class_names)
    for line in report_lines(shown(pairing)):
        log(line)
    main = distributed.is_main_process()  # under torchrun, rank 0 alone writes the run directory
    if main:
        (out_dir / "pairing.json").write_text(json.dumps(report_dict(shown(pairing)), indent=1))
    pairing.raise_errors()
    made: dict = {"links": links, "index": index, "out_dir": out_dir}
    feed = unlabelled_feed(config, index, len(train_set), log)
    if feed is not None:
        made["unlabelled"] = {"path": config.data.unlabelled, "images": len(feed.dataset), "per_batch": feed.per_batch}
    if config.distill.cache.dir:
        stats = prepare_caches(config, links, train_set, feed, next(student.parameters()).device, log)
        if main:
            made["cache"] = record_cache_build(out_dir, stats)
    step = Distiller(student, links, pairing, config.distill.hard_weight, schedule=config.distill.schedule,
                     final_ratio=config.distill.final_ratio, start_epoch=config.distill.start_epoch,
                     stop_epoch=config.distill.stop_epoch, assign=config.distill.assign,
                     auto=config.distill.auto, log=log, auto_weights_file=out_dir / "auto_weights.json" if main else None,
                     online=online_teacher(config, links, index, out_dir, log), unlabelled=feed,
                     pseudo_labels=config.distill.pseudo_labels if feed is not None else None)
    return step, made


def check_train_rest(config: DistillConfig, index: DatasetIndex) -> None:
    """Refuse ``data.unlabelled: train_rest`` when the labelled fraction leaves no training image out."""
    if config.data.unlabelled != TRAIN_REST or index.withheld.get(config.data.train_split):
        return
    if config.data.labelled_fraction >= 1:
        raise ConfigError(TRAIN_REST_NEEDS_FRACTION)
    raise ConfigError(f"data.unlabelled: train_rest: data.labelled_fraction {config.data.labelled_fraction:g} keeps all "
                      f"{len(index.split(config.data.train_split))} training images (rounded), so none is left to be "
                      f"unlabelled; give a smaller fraction")


def unlabelled_feed(config: DistillConfig, index: DatasetIndex, offset: int, log: Log) -> UnlabelledFeed | None:
    """The unlabelled images of ``data.unlabelled`` (augmented as the training images are) and
    how many join each batch; ``None`` without them."""
    if not config.data.unlabelled:
        return None
    check_train_rest(config, index)
    records = read_unlabelled(config.data.unlabelled, index, log)
    dataset = DetectionDataset(records, config.data.input_size, augment=config.data.augment, cache=config.data.cache,
                               cache_dir=config.data.cache_dir, seed=config.seed)
    per_batch = max(1, round(config.data.unlabelled_ratio * config.train.batch_size))
    log(f"data.unlabelled: {per_batch} unlabelled image(s) join each batch of {config.train.batch_size} labelled ones")
    return UnlabelledFeed(dataset, per_batch, seed=config.seed, offset=offset, workers=config.data.workers)


def prepare_caches(config: DistillConfig, links: list[TeacherLink], train_set: DetectionDataset, feed: UnlabelledFeed | None,
                   device, log: Log) -> dict:
    """Open (and build what is missing of) every teacher's cache, on the training images and on
    the unlabelled ones (each a cache of its own fingerprint), and set them on the ``links``.
    Returns what the builds did, as ``results.json`` records it."""
    from .cache import prepare

    also = ("head",) if config.distill.pseudo_labels is not None and feed is not None else ()
    settings = dict(settings=config.distill.cache, epochs=config.train.epochs, batch_size=config.train.batch_size,
                    workers=config.data.workers, log=log, also=also,
                    distilled=config.distilled_epochs())
    stats, unlabelled = {}, {}
    for link in links:
        teacher = link.model.to(device)
        with distributed.main_process_first():  # rank 0 builds the cache, the other processes then open it
            link.cached, stats[link.name] = prepare(teacher=teacher, report=link.report, dataset=train_set, **settings)
            if feed is not None:
                link.cached_unlabelled, unlabelled[link.name] = prepare(teacher=teacher, report=link.report, dataset=feed.dataset,
                                                                         **settings)
        link.model.cpu()
    result = cache_stats(stats)
    if unlabelled:
        result = {**result, "unlabelled": cache_stats(unlabelled)}
    return result


def online_teacher(config: DistillConfig, links: list[TeacherLink], index: DatasetIndex, out_dir: Path, log: Log) -> OnlineTeacher | None:
    """What a run keeps of a teacher trained online: its average (as ``train.ema`` keeps the
    student's), validated like the student, best as ``teacher_best.pt``."""
    link = next((link for link in links if link.mode == "trained"), None)
    if link is None:
        return None
    from ..engine.evaluate import predict
    from ..engine.metrics import evaluate
    from ..engine.trainer import eval_settings

    size, records, settings = config.data.input_size, index.split(config.data.val_split), eval_settings(config)
    share = records[distributed.rank()::distributed.world_size()]

    def validate(model) -> dict | None:
        """Each process predicts its share of the validation split; rank 0 scores them all (``None`` elsewhere)."""
        predictions = distributed.gather_lists(predict(model, share, size, **settings))
        return evaluate(records, predictions, model.class_names) if predictions is not None else None

    return OnlineTeacher(link.model, link.model_config, input_size=size, out_dir=out_dir, eval_every=config.train.eval_every,
                         validate=validate, log=log, ema=(config.train.ema_decay, config.train.ema_ramp) if config.train.ema else None)


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
    entries: list[dict] = []
    for link in links:
        if link.mode == "ema":  # the student's own average: best.pt is (a snapshot of) it
            continue
        model, checkpoint = link.model, configs[link.name].checkpoint
        if link.mode == "trained":  # scored as kept: its best validation epoch
            from ..engine.checkpoint import load_detector

            checkpoint = str(made["out_dir"] / "teacher_best.pt")
            model, _ = load_detector(checkpoint)
        entry = teacher_results(model, config, made["index"], log if len(links) == 1 else _named(log, link.name))
        entry.update(checkpoint=checkpoint)
        if link.mode == "trained":
            entry.update(online=True, started_from=configs[link.name].checkpoint or configs[link.name].weights or "scratch")
        if len(links) > 1:
            entry.update(name=link.name, weight=link.weight)
        entries.append(entry)
    if not entries:
        return {}
    return {"teacher": entries[0]} if len(links) == 1 else {"teachers": entries}


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
