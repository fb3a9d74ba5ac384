"""``kdet report RUN_DIR... --out DIR``: the comparison of ``kdet compare`` as an HTML page and a
Markdown twin, with what a table cannot show (see :mod:`kdet.report`)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..distill.compare import collect_runs, comparison_rows, format_delta, format_gap, format_stat
from ..engine.metrics import ImagePredictions, evaluate, pr_curve
from . import plots
from .collect import (
    Latency,
    ReportModel,
    TestData,
    cached_latency,
    cached_predictions,
    load_model,
    load_test_data,
    report_models,
    results_latency,
)
from .page import Bullets, Figure, Heading, Page, Table, write_page

Log = Callable[[str], None]
MAX_SAMPLE_MODELS = 5  # columns of model detections in the sample grid, ground truth aside


def build_report(
    run_dirs: list[str | Path],
    out: str | Path,
    *,
    latency: bool = True,
    runs: int = 10,
    warmup: int = 2,
    threads: int = 1,
    samples: int = 4,
    score_thresh: float = 0.25,
    log: Log = print,
) -> Path:
    """Write ``out/index.html`` and ``out/report.md`` (figures as PNG files beside it) comparing
    the teachers, baselines and distilled students of ``run_dirs``; returns the HTML path.

    Every model is run once on the test split and, with ``latency``, timed at batch 1 with
    ``threads`` threads (median of ``runs`` after ``warmup``) in PyTorch and ONNX Runtime; both
    are cached in the run directories (:mod:`kdet.report.collect`). Without ``latency`` the
    PyTorch latency each run recorded in ``results.json`` is shown. ``samples`` test images are
    drawn with each model's detections of score ``>= score_thresh``.
    """
    for name, value, low in (("runs", runs, 1), ("threads", threads, 1), ("warmup", warmup, 0), ("samples", samples, 0)):
        if value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")
    if not 0 <= score_thresh <= 1:
        raise ValueError(f"--score-thresh must be in [0, 1], got {score_thresh}")
    from ..engine.export import weights_fingerprint

    run_list = collect_runs([Path(p) for p in run_dirs])
    models = report_models(run_list, comparison_rows(run_list), log)
    data = load_test_data(models)
    predictions: dict[str, list[ImagePredictions]] = {}
    latencies: dict[str, Latency] = {}
    for model in models:
        detector = load_model(model, data)
        if detector is None:
            latencies[model.label] = results_latency(model)
            continue
        fingerprint = weights_fingerprint(detector)
        predictions[model.label] = cached_predictions(model, detector, fingerprint, data, log)
        if latency:
            latencies[model.label] = cached_latency(model, detector, fingerprint, data.input_size, threads=threads, runs=runs,
                                                    warmup=warmup, log=log)
        else:
            latencies[model.label] = results_latency(model)
        del detector

    page = _page(models, data, predictions, latencies, latency=latency, runs=runs, warmup=warmup, threads=threads,
                 samples=samples, score_thresh=score_thresh)
    html_path, md_path = write_page(page, Path(out))
    log(f"report: {html_path} (self-contained), {md_path} (figures beside it)")
    return html_path


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------
def _page(models: list[ReportModel], data: TestData, predictions: dict[str, list[ImagePredictions]], latencies: dict[str, Latency],
          *, latency: bool, runs: int, warmup: int, threads: int, samples: int, score_thresh: float) -> Page:
    colors = plots.model_colors(models)
    roles = ", ".join(m.label for m in models)
    page = Page("kdet report", f"{roles} on {data.description}. Made {time.strftime('%Y-%m-%d %H:%M')} with kdet {__version__}.")
    blocks = page.blocks

    blocks.append(Heading("Models"))
    blocks.append(Table(["", "role", "model", "method", "seeds", "from"],
                        [[m.label, m.role, m.architecture, _method(m), ",".join(map(str, m.row["seeds"])) or "-", m.source] for m in models]))

    blocks.append(Heading("Results"))
    blocks.append(Table(RESULT_COLUMNS, [_result_cells(m, latencies[m.label]) for m in models],
                        caption="Test split; mean ± sd (sample) over seeds where a row has several."))
    blocks.append(Bullets(_notes(models, data, latencies, latency=latency, runs=runs, warmup=warmup, threads=threads)))

    points = _latency_points(models, latencies)
    if points:
        x_label, values = points
        blocks.append(Heading("Accuracy against latency"))
        blocks.append(Figure("ap_vs_latency.png", plots.ap_vs_latency(values, colors, x_label),
                             f"Test AP@[.5:.95] against {x_label}; error bars: sd over seeds.", width=700))

    blocks.append(Heading("Per class"))
    blocks.append(Table(["class", *(m.label for m in models)],
                        [[name, *(format_stat(m.row["per_class_AP"].get(name)) for m in models)] for name in data.class_names],
                        caption="Test AP@[.5:.95] per class; mean ± sd over seeds. A class with no box in the split has no AP "
                                "(undefined) and, as in COCO, is left out of the mean AP."))
    blocks.append(Figure("per_class_ap.png", plots.per_class_ap(models, data.class_names, colors),
                         "Test AP@[.5:.95] per class; error bars: sd over seeds."))

    if predictions:
        curves = _pr_curves(predictions, data)
        blocks.append(Heading("Precision and recall"))
        blocks.append(Figure("pr_curves.png", plots.pr_curves(curves, data.class_names, colors),
                             f"Precision (envelope) against recall at IoU 0.5 on the {data.split} split (VOC matching, "
                             f"kdet.engine.metrics.pr_curve), one run per model (the lowest seed); VOC AP50 (all points) in the legend."))
        if samples:
            shown = _sample_models(models, predictions)
            records = _sample_records(data, samples)
            by_image = {label: {p.image_id: p for p in predictions[label]} for label in shown}
            blocks.append(Heading("Sample detections"))
            blocks.append(Figure("samples.png", plots.sample_grid(records, by_image, data.class_names, score_thresh),
                                 f"{len(records)} {data.split} images: ground truth, then each model's detections with score "
                                 f">= {score_thresh:g} (lowest seed), boxes coloured by class."))

    val_curves, losses = plots.val_ap_curves(models, colors), plots.loss_curves(models)
    if val_curves or losses:
        blocks.append(Heading("Training"))
    if val_curves:
        blocks.append(Figure("val_ap.png", val_curves, "Validation AP@[.5:.95] per epoch (metrics.jsonl); every seed, "
                             "the lowest one drawn thicker.", width=800))
    if losses:
        blocks.append(Figure("losses.png", losses, "Loss terms per epoch (metrics.jsonl, mean over the epoch's steps) of "
                             "each model's lowest seed, each term before its weight; total = the weighted sum that was minimised."))
    return page


RESULT_COLUMNS = ["", "AP@[.5:.95]", "AP50", "AP75", "VOC mAP@0.5 11-pt", "VOC mAP@0.5 all-pt", "params", "GFLOPs",
                  "PyTorch CPU ms", "ONNX Runtime CPU ms", "ΔAP vs baseline", "gap closed"]


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _method(model: ReportModel) -> str:
    if model.role == "teacher":
        return model.row["name"]
    if model.role == "distilled" and model.row.get("teacher"):
        return f"{model.row['method']} (teacher {model.row['teacher']})"
    return model.row["method"]


def _result_cells(model: ReportModel, latency: Latency) -> list[str]:
    row = model.row
    return [
        model.label,
        format_stat(row["AP"]),
        format_stat(row["AP50"]),
        format_stat(row.get("AP75")),
        format_stat(row["VOC_mAP50_11pt"]),
        format_stat(row["VOC_mAP50"]),
        f"{row['params'] / 1e6:.2f}M",
        f"{row['flops'] / 1e9:.2f}",
        _ms(latency.pytorch_ms),
        _ms(latency.onnxruntime_ms),
        format_delta(row),
        format_gap(row),
    ]


def _notes(models: list[ReportModel], data: TestData, latencies: dict[str, Latency], *, latency: bool, runs: int, warmup: int,
           threads: int) -> list[str]:
    notes = [
        f"Accuracy, parameters and FLOPs are those each run wrote into results.json when it finished ({data.split} split); "
        "a teacher's are those the distillation run measured on its own test split. FLOPs: forward pass of one image at the "
        "training input size, a multiply-add counted as 2.",
        "Gap closed: (distilled - baseline) / (teacher - baseline) in AP@[.5:.95], over the seeds the distilled and the "
        "baseline runs share; ΔAP vs baseline is paired by seed.",
    ]
    sources = {latencies[m.label].source for m in models}
    if latency:
        cpu = platform.processor() or platform.machine()
        notes.append(f"Latency: batch 1, {threads} thread(s), median of {runs} runs after {warmup} warm-up, on this machine "
                     f"({cpu}, {os.cpu_count()} CPUs); the network and its box decoding without NMS, in PyTorch and in ONNX Runtime "
                     "(CPU provider, the model exported to ONNX), as kdet bench times them; one checkpoint per row (the lowest "
                     "seed: seeds share the architecture)"
                     + ("; some rows come from an earlier measurement cached in bench.json" if "bench.json" in sources else "") + ".")
    else:
        notes.append("Latency (--no-latency): the PyTorch latency each run measured when it finished (results.json: batch 1, "
                     "NMS included, the run's threads); ONNX Runtime not measured.")
    if "results.json" in sources and latency:
        notes.append("Rows whose model could not be loaded show the PyTorch latency from results.json.")
    for model in models:
        notes += [f"{model.label}: {note}" for note in model.notes]
    notes += data.notes
    return notes


def _latency_points(models: list[ReportModel], latencies: dict[str, Latency]) -> tuple[str, list] | None:
    """The scatter's points: ONNX Runtime latency when every model has it, else PyTorch's."""
    use_onnx = all(latencies[m.label].onnxruntime_ms is not None for m in models)
    points = []
    for model in models:
        value = latencies[model.label].onnxruntime_ms if use_onnx else latencies[model.label].pytorch_ms
        if value is not None and model.row["AP"]["mean"] is not None:
            points.append((model.label, value, model.row["AP"]["mean"], model.row["AP"].get("sd")))
    if not points:
        return None
    if use_onnx:
        return "ONNX Runtime CPU latency, batch 1 (ms)", points
    source = "results.json" if any(latencies[m.label].source == "results.json" for m in models) else "measured"
    return f"PyTorch CPU latency, batch 1 (ms, {source})", points


def _pr_curves(predictions: dict[str, list[ImagePredictions]], data: TestData) -> dict:
    curves = {}
    for label, found in predictions.items():
        voc = evaluate(data.records, found, data.class_names)["voc"]["per_class"]
        curves[label] = {name: (*pr_curve(data.records, found, index), voc[name]["AP50_all"])
                         for index, name in enumerate(data.class_names)}
    return curves


def _sample_models(models: list[ReportModel], predictions: dict) -> list[str]:
    """Teachers and baselines first, then the distilled students with the best AP, at most
    :data:`MAX_SAMPLE_MODELS` columns."""
    ran = [m for m in models if m.label in predictions]
    fixed = [m for m in ran if m.role != "distilled"]
    distilled = sorted((m for m in ran if m.role == "distilled"), key=lambda m: -(m.row["AP"]["mean"] or 0.0))
    chosen = fixed[: MAX_SAMPLE_MODELS - min(len(distilled), 2)] + distilled
    chosen = chosen[:MAX_SAMPLE_MODELS]
    return [m.label for m in models if m in chosen]


def _sample_records(data: TestData, count: int) -> list:
    """``count`` test images spread evenly over the split (the same ones every time)."""
    index = np.unique(np.linspace(0, len(data.records) - 1, min(count, len(data.records))).round().astype(int))
    return [data.records[i] for i in index]
