"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) and
returned as PNG bytes. Each model keeps one colour in every figure: teachers dark, baselines
grey, distilled students in colour."""
from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import ImageDraw

from ..data.common import open_upright
from ..engine.metrics import ImagePredictions
from ..engine.trainer import read_history
from ..engine.predict import PALETTE as CLASS_COLORS
from ..structures import ImageRecord
from .collect import ReportModel

DPI = 100
TEACHER_COLORS = ["#1a1a1a", "#5a3d2b", "#3d3d6b"]
BASELINE_COLORS = ["#8c8c8c", "#b5a27a", "#7a9fb5"]
DISTILLED_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22"]
TERM_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def model_colors(models: list[ReportModel]) -> dict[str, str]:
    palettes = {"teacher": TEACHER_COLORS, "baseline": BASELINE_COLORS, "distilled": DISTILLED_COLORS}
    used: dict[str, int] = {}
    colors = {}
    for model in models:
        palette = palettes.get(model.role, DISTILLED_COLORS)
        index = used.get(model.role, 0)
        colors[model.label] = palette[index % len(palette)]
        used[model.role] = index + 1
    return colors


def png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _grid(count: int, columns: int, width: float, height: float) -> tuple[Figure, list]:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(width * columns, height * rows))
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(count)]
    return figure, axes


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def val_ap_curves(models: list[ReportModel], colors: dict[str, str]) -> bytes | None:
    """Validation AP@[.5:.95] per epoch of every run, seeds of a model in its colour."""
    figure = Figure(figsize=(8, 4.2))
    ax = figure.add_subplot(1, 1, 1)
    drawn = 0
    for model in models:
        for index, run in enumerate(model.runs):
            points = [(r["epoch"], r["val"]["AP"]) for r in read_history(run.path) if r.get("val") and r["val"].get("AP") is not None]
            if not points:
                continue
            epochs, ap = zip(*points)
            label = model.label if index == 0 else None
            ax.plot(epochs, ap, color=colors[model.label], marker="o" if len(points) < 30 else None, markersize=3,
                    linewidth=1.6 if index == 0 else 1.0, alpha=1.0 if index == 0 else 0.55, label=label)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AP@[.5:.95]")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return png(figure)


def loss_curves(models: list[ReportModel]) -> bytes | None:
    """Every loss term per epoch of each model's first run (log scale: the terms differ by orders)."""
    histories = [(m, read_history(m.runs[0].path)) for m in models if m.runs]
    histories = [(m, h) for m, h in histories if h]
    if not histories:
        return None
    figure, axes = _grid(len(histories), 3, 4.6, 3.3)
    term_colors: dict[str, str] = {"total": "black"}
    for ax, (model, history) in zip(axes, histories):
        keys = [k for k in history[0] if k.startswith("loss") and "factor" not in k and isinstance(history[0][k], (int, float))]
        epochs = [r["epoch"] for r in history]
        for key in keys:
            values = [r.get(key) for r in history]
            if not all(v is not None and v > 0 for v in values):
                continue
            name = key.removeprefix("loss_") if key != "loss" else "total"
            # a distillation run names the detector's own terms det_box, det_obj ...: same colour as box, obj ...
            term = name.removeprefix("det_")
            color = term_colors.setdefault(term, TERM_COLORS[(len(term_colors) - 1) % len(TERM_COLORS)])
            ax.plot(epochs, values, label=name, linewidth=2.0 if name == "total" else 1.2, color=color)
        ax.set_yscale("log")
        seed = f"seed {model.runs[0].seed}" + (f" of {len(model.runs)}" if len(model.runs) > 1 else "")
        ax.set_title(f"{model.label} ({seed})", fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
        ax.tick_params(labelsize=8)
    figure.tight_layout()
    return png(figure)


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------
def ap_vs_latency(points: list[tuple[str, float, float, float | None]], colors: dict[str, str], x_label: str) -> bytes:
    """One point per model: ``(label, latency ms, AP mean, AP sd over seeds or None)``."""
    figure = Figure(figsize=(7, 4.5))
    ax = figure.add_subplot(1, 1, 1)
    # a legend, not labels beside the points: a distilled student and its baseline often sit
    # within a marker's width of each other, where labels would overlap or swap
    for label, latency, ap, sd in points:
        ax.errorbar([latency], [ap], yerr=[sd] if sd else None, fmt="o", color=colors[label], markersize=8, capsize=4,
                    label=label)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel("test AP@[.5:.95]")
    ax.set_xlim(left=0, right=max(p[1] for p in points) * 1.25)
    ax.margins(y=0.15)
    ax.grid(alpha=0.3)
    return png(figure)


def per_class_ap(models: list[ReportModel], class_names: list[str], colors: dict[str, str]) -> bytes:
    """Grouped bars: per class, each model's AP@[.5:.95] (mean over seeds, sd as an error bar)."""
    figure = Figure(figsize=(max(6.0, 1.1 * len(class_names) * max(1, len(models)) * 0.45 + 2), 4.2))
    ax = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(class_names))
    for index, model in enumerate(models):
        stats = [model.row["per_class_AP"].get(name) for name in class_names]
        means = [s["mean"] if s and s["mean"] is not None else np.nan for s in stats]  # undefined: no bar
        sds = [s["sd"] if s and s.get("sd") else 0.0 for s in stats]
        ax.bar(x + (index - (len(models) - 1) / 2) * width, means, width, yerr=sds if any(sds) else None, capsize=3,
               color=colors[model.label], label=model.label)
    ax.set_xticks(x, class_names)
    ax.set_ylabel("test AP@[.5:.95]")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=9, ncols=min(4, len(models)), loc="upper right")
    return png(figure)


def pr_curves(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float | None]]], class_names: list[str],
              colors: dict[str, str]) -> bytes:
    """Precision (its envelope, as VOC AP integrates it) against recall at IoU 0.5, one panel per
    class, one line per model. ``curves[label][class] = (recall, precision, AP50)``."""
    figure, axes = _grid(len(class_names), 3, 4.2, 3.6)
    for ax, name in zip(axes, class_names):
        for label, per_class in curves.items():
            recall, precision, ap = per_class[name]
            if len(recall) == 0:
                continue
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            ax.plot(np.concatenate([[0.0], recall]), np.concatenate([[envelope[0]], envelope]), color=colors[label],
                    linewidth=1.5, label=f"{label} ({ap:.3f})" if ap is not None else label)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=9)
        ax.set_ylabel("precision", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower left", title="VOC AP50", title_fontsize=7)
        elif all(per_class[name][2] is None for per_class in curves.values()):
            ax.text(0.5, 0.5, "no box of this class in the split:\nAP undefined", ha="center", va="center", fontsize=8)
        ax.tick_params(labelsize=8)
    figure.tight_layout()
    return png(figure)


# ---------------------------------------------------------------------------------------------
# sample detections
# ---------------------------------------------------------------------------------------------
def draw_boxes(record: ImageRecord, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The record's image (RGB uint8 ``[H, W, 3]``) with ``boxes`` (xyxy original pixels) drawn in their class colours."""
    image = open_upright(record.path)  # the pixels the record's boxes refer to
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(image.size) / 160))
    for box, label in zip(boxes.tolist(), labels.tolist()):
        draw.rectangle(box, outline=CLASS_COLORS[label % len(CLASS_COLORS)], width=line)
    return np.asarray(image)


def sample_grid(records: list[ImageRecord], predictions: dict[str, dict[str, ImagePredictions]], class_names: list[str],
                score_thresh: float) -> bytes:
    """One row per image: ground truth, then each model's detections with score >= ``score_thresh``."""
    columns = ["ground truth", *predictions]
    first = records[0]
    tile_width = 3.2
    tile_height = tile_width * first.height / first.width
    figure = Figure(figsize=(tile_width * len(columns), tile_height * len(records) + 0.8))
    for row, record in enumerate(records):
        for column, name in enumerate(columns):
            ax = figure.add_subplot(len(records), len(columns), row * len(columns) + column + 1)
            if column == 0:
                boxes, labels = record.boxes, record.labels
                text = f"{len(labels)} boxes"
            else:
                found = predictions[name].get(record.image_id)
                keep = found.scores >= score_thresh if found is not None else np.zeros(0, bool)
                boxes = found.boxes[keep] if found is not None else np.zeros((0, 4))
                labels = found.labels[keep] if found is not None else np.zeros(0, np.int64)
                text = f"{len(labels)} detections"
            ax.imshow(draw_boxes(record, boxes, labels))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(text, fontsize=8)
            if row == 0:
                ax.set_title(name, fontsize=11)
            if column == 0:
                ax.set_ylabel(record.path.stem, fontsize=8)
    handles = [Patch(facecolor="none", edgecolor=CLASS_COLORS[i % len(CLASS_COLORS)], linewidth=2, label=name)
               for i, name in enumerate(class_names)]
    figure.legend(handles=handles, loc="lower center", ncols=min(len(handles), 8), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.6 / (tile_height * len(records) + 0.8), 1, 1))
    return png(figure)
