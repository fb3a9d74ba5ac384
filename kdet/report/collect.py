"""Which models a report shows, the test data they run on, and what is measured of them.

The rows are :func:`kdet.distill.compare.comparison_rows`: one per teacher (from the
``teacher`` entry of distillation runs' ``results.json``), per baseline group and per distilled
group, seeds grouped. A plain training run that is no distilled group's baseline and whose
``best.pt`` holds a teacher's weights (the same values, or the same values stored in fp16 as
``bundled:bccd_teacher`` stores them) is that teacher's own training run: it joins the teacher's
row, which gains its training curves, instead of standing as a baseline.

Each model is run on the test split (predictions) and timed on the CPU (latency) once; both are
kept in a run directory of the model (its own, or for a teacher the first distillation run that
used it), as JSON objects of entries keyed by what the result depends on:

* ``bench.json``: PyTorch and ONNX Runtime latency (:mod:`kdet.engine.bench`), keyed by the
  weights' fingerprint, threads, batch and input size; an entry of fewer timed runs than asked
  for is measured again.
* ``report_predictions.json``: detections on the test split, keyed by the weights' fingerprint,
  the data (path, split, input size, a digest of the split's ground truth) and the evaluation
  settings.
"""
from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..distill.compare import Run, model_name, run_teachers
from ..engine.metrics import ImagePredictions
from ..models import Detector
from ..structures import ImageRecord

Log = Callable[[str], None]

BENCH_CACHE = "bench.json"
PREDICTIONS_CACHE = "report_predictions.json"
BENCH_FORMAT = "kdet-bench-cache/1"
PREDICTIONS_FORMAT = "kdet-report-predictions/1"
MAX_PREDICTION_ENTRIES = 4  # oldest entries are dropped beyond this: each holds a whole split's detections


@dataclass
class ReportModel:
    """One row of the report: a teacher, a baseline group or a distilled group.

    ``checkpoint`` is what is run for predictions and latency (the lowest seed's ``best.pt`` for
    a group), ``None`` when it cannot be found; ``teacher_config`` is set instead for a teacher
    given as ``teacher.model`` + ``teacher.weights``. ``home`` is the run directory that keeps
    this model's caches; ``runs`` the run directories whose training curves are drawn, lowest
    seed first (none for a teacher known only from distillation runs).
    """

    label: str
    role: str
    row: dict
    checkpoint: str | None
    home: Path
    runs: list[Run]
    architecture: str
    source: str
    teacher_config: dict | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TestData:
    """The split every model is run on. ``key`` is what predictions depend on besides the weights."""

    records: list[ImageRecord]
    class_names: list[str]
    split: str
    input_size: int
    eval: dict
    description: str
    key: dict
    notes: list[str]


@dataclass
class Latency:
    """Batch-1 CPU latency in milliseconds (median of ``runs``); ``source`` says where it comes from:
    ``measured``, ``bench.json`` (a cached measurement) or ``results.json`` (the training run's own,
    PyTorch only, NMS included)."""

    pytorch_ms: float | None
    onnxruntime_ms: float | None
    source: str
    threads: int | None = None
    runs: int | None = None


# ---------------------------------------------------------------------------------------------
# which models
# ---------------------------------------------------------------------------------------------
def report_models(runs: list[Run], rows: list[dict], log: Log = print) -> list[ReportModel]:
    """One :class:`ReportModel` per comparison row, teachers first, labelled ``teacher``,
    ``baseline``, ``distilled`` (numbered when a role has several rows)."""
    by_path = {str(run.path): run for run in runs}
    teacher_users: dict[str, Run] = {}
    entries: dict[str, dict] = {}
    for run in runs:
        for entry in run_teachers(run.results) if run.distilled else []:
            teacher_users.setdefault(str(entry.get("checkpoint")), run)
            entries.setdefault(str(entry.get("checkpoint")), entry)
    models: list[ReportModel] = []
    for row in rows:
        if row["role"] == "teacher":
            user, entry = teacher_users[row["name"]], entries[row["name"]]
            checkpoint, teacher_config, note = _teacher_source(user, entry)
            model = ReportModel("", "teacher", row, checkpoint, user.path, [], row["name"],
                                f"teacher of {user.path}, scored by that run on its {entry.get('split', 'test')} split",
                                teacher_config=teacher_config)
            if note:
                model.notes.append(note)
        else:
            members = sorted((by_path[p] for p in row["runs"]), key=lambda r: r.seed)
            seeds = ", ".join(str(r.seed) for r in members)
            source = f"{', '.join(str(r.path) for r in members)} (seed{'s' if len(members) > 1 else ''} {seeds})"
            model = ReportModel("", row["role"], row, str(members[0].path / "best.pt"), members[0].path, members, row["name"], source)
        models.append(model)
    _join_teacher_runs(models, runs, log)
    counts: dict[str, int] = {}
    for model in models:
        counts[model.role] = counts.get(model.role, 0) + 1
    seen: dict[str, int] = {}
    for model in models:
        seen[model.role] = seen.get(model.role, 0) + 1
        model.label = model.role if counts[model.role] == 1 else f"{model.role} {seen[model.role]}"
    return models


def _teacher_source(run: Run, entry: dict) -> tuple[str | None, dict | None, str | None]:
    """``(checkpoint, teacher config, note)`` of the teacher of a distillation run that
    ``entry`` (its ``results.json`` record) describes."""
    teacher = run.config.get("teacher") or {}
    if isinstance(teacher, list):
        names = [t.get("name") or f"teacher{i}" for i, t in enumerate(teacher)]
        teacher = teacher[names.index(entry["name"])] if entry.get("name") in names else teacher[0]
    checkpoint = entry.get("checkpoint") or teacher.get("checkpoint")
    if checkpoint:
        if str(checkpoint).startswith("bundled:") or Path(checkpoint).expanduser().is_file():
            return str(checkpoint), None, None
        return None, None, (f"teacher checkpoint {checkpoint} (from {run.path / 'config.yaml'}) not found from here: "
                            "no latency measured, no predictions; run kdet report from where kdet distill ran")
    if teacher.get("model") and teacher.get("weights"):
        return None, teacher, None
    return None, None, f"{run.path / 'config.yaml'} names no teacher checkpoint"


def _join_teacher_runs(models: list[ReportModel], runs: list[Run], log: Log) -> None:
    """Fold a teacher's own training run into the teacher's row (see the module docstring)."""
    baseline_keys = {run.student_key() for run in runs if run.distilled}
    teachers = [m for m in models if m.role == "teacher" and m.checkpoint]
    for model in [m for m in models if m.role == "baseline" and m.runs[0].student_key() not in baseline_keys]:
        for teacher in teachers:
            match = next(((run, how) for run in model.runs if (how := same_weights(run.path / "best.pt", teacher.checkpoint))), None)
            if match is not None and not teacher.runs:
                run, how = match
                teacher.runs = model.runs
                teacher.source += f"; trained in {run.path} ({how})"
                models.remove(model)
                log(f"{run.path} trained the teacher {teacher.row['name']}: shown as the teacher, with its training curves")
                break


def same_weights(a: str | Path, b: str | Path) -> str | None:
    """``"same weights"`` when two kdet checkpoints hold the same weights, ``"same weights, one
    copy stored in fp16"`` when they differ only by that rounding, ``None`` otherwise."""
    from ..engine.checkpoint import load_checkpoint

    try:
        first, second = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    except (FileNotFoundError, ValueError):
        return None
    if first.keys() != second.keys():
        return None
    exact = True
    for name, x in first.items():
        y = second[name]
        if x.shape != y.shape:
            return None
        if x.is_floating_point() and y.is_floating_point():
            if torch.equal(x.float(), y.float()):
                continue
            if not torch.equal(x.half(), y.half()):  # fp32 rounded to fp16 is the fp16 copy, exactly
                return None
            exact = False
        elif not torch.equal(x, y):
            return None
    return "same weights" if exact else "same weights, one copy stored in fp16"


def load_model(model: ReportModel, data: TestData) -> Detector | None:
    """The model in eval mode on the CPU, or ``None`` (with a note) when it cannot be loaded.
    A teacher's architecture is read from its checkpoint here."""
    from ..config import TeacherConfig
    from ..distill.distiller import load_teacher
    from ..engine.checkpoint import load_detector

    try:
        if model.checkpoint:
            detector, payload = load_detector(model.checkpoint)
            if model.role == "teacher":
                model.architecture = model_name(payload["model_config"])
            return detector
        if model.teacher_config:
            detector, _ = load_teacher(TeacherConfig.model_validate(model.teacher_config), data.class_names, data.input_size)
            model.architecture = model_name(model.teacher_config["model"])
            return detector
    except (FileNotFoundError, ValueError) as error:
        model.notes.append(f"cannot load {model.checkpoint or 'the teacher'}: {error}")
    return None


# ---------------------------------------------------------------------------------------------
# the test data
# ---------------------------------------------------------------------------------------------
def load_test_data(models: list[ReportModel]) -> TestData:
    """The test split (the validation split when the data has none, as training does) of the
    first student run's data; every model is run on it. Other runs with other data are noted."""
    from ..config import Config, DistillConfig, config_to_dict, validate_config
    from ..data import read_dataset, resolve_data_path
    from ..engine.trainer import eval_settings, test_split

    with_runs = [m for m in models if m.runs]
    reference = next((m for m in with_runs if m.role != "teacher"), with_runs[0]).runs[0]
    config = validate_config(reference.config, source=str(reference.path / "config.yaml"),
                             schema=DistillConfig if reference.distilled else Config)
    data = config_to_dict(config)["data"]
    index = read_dataset(resolve_data_path(config.data.path), config.data.format, seed=config.data.split_seed,
                         fractions=config.data.split_fractions, verify_images=False)
    split = test_split(config, index)
    records = index.split(split)
    settings = eval_settings(config)
    truth = hashlib.sha256()
    for record in records:
        truth.update(record.image_id.encode())
        truth.update(record.boxes.astype(np.float32).tobytes())
        truth.update(record.labels.astype(np.int64).tobytes())
    input_size = config.data.input_size
    key = {"data": config.data.path, "format": index.format, "split": split, "input_size": input_size,
           "classes": list(index.class_names), "ground_truth": truth.hexdigest(),
           "eval": {k: settings[k] for k in ("score_thresh", "nms_iou", "max_det")}}
    notes = []
    compared = ("path", "format", "test_split", "val_split", "split_seed", "split_fractions", "input_size")
    for model in with_runs:
        for run in model.runs:
            theirs = run.config.get("data", {})
            differing = [k for k in compared if theirs.get(k) != data.get(k)]
            if differing:
                notes.append(f"{run.path} was trained with other data settings ({', '.join(f'data.{k}' for k in differing)}); "
                             f"it is run on {data['path']} here like every model")
    description = f"{data['path']} ({index.format}), {split} split, {len(records)} images at {input_size} px"
    return TestData(records, list(index.class_names), split, input_size, settings, description, key, notes)


# ---------------------------------------------------------------------------------------------
# predictions on the test split, cached
# ---------------------------------------------------------------------------------------------
def cached_predictions(model: ReportModel, detector: Detector, fingerprint: str, data: TestData, log: Log) -> list[ImagePredictions]:
    """The detections of ``detector`` on ``data``, labels indexing ``data.class_names`` (classes
    the dataset lacks are dropped), from ``report_predictions.json`` in ``model.home`` or run now
    and stored there."""
    from ..engine.evaluate import predict

    path = model.home / PREDICTIONS_CACHE
    key = _digest({"weights": fingerprint, **data.key})
    cache = _read_cache(path, PREDICTIONS_FORMAT)
    entry = cache["entries"].get(key)
    if entry is not None:
        log(f"{model.label}: predictions on the {data.split} split from {path}")
        return [ImagePredictions(image_id, np.asarray(p["boxes"], np.float64).reshape(-1, 4), p["scores"], p["labels"])
                for image_id, p in entry["images"].items()]
    log(f"{model.label}: predicting on the {data.split} split ({len(data.records)} images)")
    started = time.perf_counter()
    predictions = predict(detector, data.records, data.input_size, batch_size=data.eval["batch_size"],
                          score_thresh=data.eval["score_thresh"], nms_iou=data.eval["nms_iou"], max_det=data.eval["max_det"])
    lookup = np.array([data.class_names.index(n) if n in data.class_names else -1 for n in detector.class_names], np.int64)
    out = []
    for p in predictions:
        labels = lookup[p.labels] if len(p.labels) else p.labels
        keep = labels >= 0
        out.append(ImagePredictions(p.image_id, p.boxes[keep].round(2), p.scores[keep].round(5), labels[keep]))
    cache["entries"][key] = {
        "weights": fingerprint, **data.key, "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 2),
        "images": {p.image_id: {"boxes": p.boxes.tolist(), "scores": p.scores.tolist(), "labels": p.labels.tolist()} for p in out},
    }
    while len(cache["entries"]) > MAX_PREDICTION_ENTRIES:
        cache["entries"].pop(next(iter(cache["entries"])))
    _write_cache(path, cache, log)
    return out


# ---------------------------------------------------------------------------------------------
# latency, cached
# ---------------------------------------------------------------------------------------------
def cached_latency(model: ReportModel, detector: Detector, fingerprint: str, input_size: int, *, threads: int, runs: int,
                   warmup: int, log: Log) -> Latency:
    """Batch-1 latency of ``detector`` in PyTorch and in ONNX Runtime (exported to a temporary
    file), both timing the network and its box decoding without NMS (:mod:`kdet.engine.bench`),
    from ``bench.json`` in ``model.home`` when it holds at least ``runs`` timed runs for these
    weights, threads and input size; measured and stored there otherwise."""
    from ..engine.bench import bench_onnx, bench_torch
    from ..engine.export import export_onnx

    batch = 1
    path = model.home / BENCH_CACHE
    key = f"{fingerprint}|threads={threads}|batch={batch}|input={input_size}"
    cache = _read_cache(path, BENCH_FORMAT)
    entry = cache["entries"].get(key)
    if entry is not None and entry["runs"] >= runs:
        log(f"{model.label}: latency from {path} (median of {entry['runs']} runs, {threads} thread(s))")
        return Latency(entry["pytorch"]["latency_ms_median"], (entry.get("onnxruntime") or {}).get("latency_ms_median"),
                       BENCH_CACHE, threads, entry["runs"])
    log(f"{model.label}: measuring latency (batch {batch}, {threads} thread(s), {runs} runs after {warmup} warm-up)")
    torch_result, flops = bench_torch(detector, input_size, batch=batch, threads=threads, runs=runs, warmup=warmup)
    onnx_result = None
    try:
        with tempfile.TemporaryDirectory(prefix="kdet-report-") as folder:
            onnx_path = Path(folder) / "model.onnx"
            export_onnx(detector, input_size, onnx_path, batch=batch, source=model.checkpoint or "")
            onnx_result = bench_onnx(onnx_path, batch=batch, threads=threads, runs=runs, warmup=warmup, flops=flops)
    except ValueError as error:  # a family the exporter does not support
        model.notes.append(f"no ONNX Runtime latency: {error}")
    cache["entries"][key] = {
        "weights": fingerprint, "threads": threads, "batch": batch, "input_size": input_size, "runs": runs, "warmup": warmup,
        "pytorch": asdict(torch_result), "onnxruntime": asdict(onnx_result) if onnx_result else None,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(), "processor": platform.processor(),
        "torch": torch.__version__,
    }
    _write_cache(path, cache, log)
    return Latency(torch_result.latency_ms_median, onnx_result.latency_ms_median if onnx_result else None, "measured", threads, runs)


def results_latency(model: ReportModel) -> Latency:
    """The latency the run measured when it finished (``results.json``: PyTorch, batch 1, NMS
    included), for ``--no-latency``."""
    stat = model.row.get("latency_ms")
    return Latency(stat["mean"] if stat else None, None, "results.json")


# ---------------------------------------------------------------------------------------------
# cache files
# ---------------------------------------------------------------------------------------------
def _digest(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path, format: str) -> dict:
    """The cache at ``path``, or an empty one when it is missing, damaged or of another format."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"format": format, "entries": {}}
    if not isinstance(cache, dict) or cache.get("format") != format or not isinstance(cache.get("entries"), dict):
        return {"format": format, "entries": {}}
    return cache


def _write_cache(path: Path, cache: dict, log: Log) -> None:
    """Write atomically; a run directory that cannot be written only costs the cache."""
    from ..engine.checkpoint import atomic_file

    try:
        with atomic_file(path) as handle:
            handle.write(json.dumps(cache).encode())
    except OSError as error:
        log(f"cannot write {path} ({error}); the next report measures again")
