"""``kdet compare`` on runs whose test split lacks a class: its AP is undefined, shown with the
reason and left out of the means, as COCO leaves it out."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console

from kdet.cli import main
from kdet.distill.compare import collect_runs, comparison_rows, format_stat, markdown_table, render_comparison
from kdet.engine.metrics import ImagePredictions, evaluate
from kdet.structures import ImageRecord

from conftest import tiny_config_dict

CLASSES = ["bar", "square", "stray"]


def _test_split_without_stray() -> tuple[list[ImageRecord], list[ImagePredictions]]:
    """Two test images with bars and squares, none with a 'stray' box; detections of each."""
    records = [
        ImageRecord("a", Path("a.jpg"), 64, 64, np.array([[4, 4, 20, 12], [30, 30, 50, 50]], np.float32), np.array([0, 1])),
        ImageRecord("b", Path("b.jpg"), 64, 64, np.array([[10, 10, 30, 30]], np.float32), np.array([1])),
    ]
    predictions = [
        ImagePredictions("a", [[4, 4, 20, 12], [30, 30, 50, 50], [0, 0, 9, 9]], [0.9, 0.8, 0.7], [0, 1, 2]),  # a stray detection
        ImagePredictions("b", [[11, 11, 30, 30]], [0.6], [1]),
    ]
    return records, predictions


def _run(root: Path, name: str, seed: int, metrics: dict) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = tiny_config_dict(root / "data")
    config["seed"] = seed
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"split": "test", "metrics": metrics, "train_time_s": 10.0, "epochs": 2,
               "profile": {"params": 1000, "flops": 2e6, "latency_ms_median": 3.0}}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_class_without_boxes_in_the_test_split_is_undefined_not_a_crash(tmp_path, capsys):
    records, predictions = _test_split_without_stray()
    metrics = evaluate(records, predictions, CLASSES)
    assert metrics["coco"]["per_class"]["stray"]["AP"] is None  # nothing to measure it on
    runs = [_run(tmp_path, f"base{seed}", seed, metrics) for seed in (0, 1)]

    rows = comparison_rows(collect_runs(runs))

    stray = rows[0]["per_class_AP"]["stray"]
    assert stray["mean"] is None and stray["undefined"] == "no box of stray in the test split"
    assert format_stat(stray) == "undefined (no box of stray in the test split)"
    defined = [metrics["coco"]["per_class"][name]["AP"] for name in ("bar", "square")]
    assert rows[0]["per_class_AP"]["bar"]["mean"] == defined[0]
    assert rows[0]["AP"]["mean"] == metrics["coco"]["AP"]  # COCO's mean already leaves 'stray' out
    assert abs(metrics["coco"]["AP"] - np.mean(defined)) < 1e-6
    markdown_table(rows)
    render_comparison(rows, Console(file=io.StringIO(), width=200))
    assert main(["compare", *map(str, runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["per_class_AP"]["stray"]["mean"] is None


def test_runs_with_no_box_at_all_in_the_split_compare_without_a_crash(tmp_path):
    records = [ImageRecord("a", Path("a.jpg"), 64, 64)]
    metrics = evaluate(records, [ImagePredictions("a", [[1, 1, 5, 5]], [0.5], [0])], CLASSES)
    assert metrics["coco"]["AP"] is None
    runs = [_run(tmp_path, "base0", 0, metrics), _run(tmp_path, "base1", 1, metrics)]
    rows = comparison_rows(collect_runs(runs))
    assert rows[0]["AP"]["mean"] is None and "undefined" in markdown_table(rows)


def test_method_name_of_auto_weights_and_the_teachers_assignment():
    from kdet.distill.compare import method_name

    config = {"distill": {"assign": "teacher", "terms": [{"loss": "ld", "weight": "auto"},
                                                         {"loss": "soft_bce", "weight": 0.5, "args": {"beta": 2.0}}]}}
    assert method_name(config) == "ld x auto + soft_bce [beta=2.0] x0.5, assign: teacher"
