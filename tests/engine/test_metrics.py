"""COCO and VOC metrics on tiny hand-made cases whose answers can be worked out on paper."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from kdet.engine.metrics import ImagePredictions, evaluate, format_metrics_table, pr_curve
from kdet.structures import ImageRecord


def record(image_id, boxes=(), labels=(), difficult=None, size=(200, 200)) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        path=Path(f"{image_id}.jpg"),
        width=size[0],
        height=size[1],
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        labels=np.array(labels, np.int64),
        difficult=None if difficult is None else np.array(difficult, bool),
    )


def preds(image_id, boxes=(), scores=(), labels=()) -> ImagePredictions:
    return ImagePredictions(
        image_id, np.array(boxes, float), np.array(scores, float), np.array(labels, np.int64)
    )


def test_perfect_predictions_give_ap_one():
    records = [
        # sizes: 20x20 small, 50x50 medium, 150x150 large; one difficult box
        record("a", [[0, 0, 20, 20], [30, 30, 80, 80]], [0, 1]),
        record("b", [[10, 10, 160, 160], [100, 0, 150, 50]], [1, 0], difficult=[False, True]),
        record("c"),  # no ground truth, no predictions
    ]
    predictions = [
        preds("a", records[0].boxes, [0.9, 0.8], records[0].labels),
        preds("b", records[1].boxes, [0.7, 0.6], records[1].labels),
    ]
    metrics = evaluate(records, predictions, ["cat", "dog"])
    coco, voc = metrics["coco"], metrics["voc"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert coco[key] == pytest.approx(1.0), key
    assert voc["mAP50_11pt"] == pytest.approx(1.0)
    assert voc["mAP50_all"] == pytest.approx(1.0)
    for name in ("cat", "dog"):
        assert coco["per_class"][name] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    # the difficult cat box counts for COCO but not for VOC
    assert voc["per_class"]["cat"]["num_gt"] == 1
    assert voc["per_class"]["cat"]["num_det"] == 2
    assert (metrics["images"], metrics["num_gt"], metrics["num_det"]) == (3, 4, 4)
    json.dumps(metrics)  # JSON-able: no numpy scalars, no NaN


def hand_case():
    """One class, two images, 3 GT boxes plus 1 difficult, 5 detections.

    image A: g1 (normal), g2 (difficult, far from g1); image B: g3, g4 (normal).
    detections, by score:
      d1 0.9 on g1            -> TP
      d2 0.8 on g1 again      -> FP (duplicate: g1 already matched, g2 out of reach)
      d3 0.7 on g2 difficult  -> ignored
      d4 0.6 on g3            -> TP
      d5 0.5 on background B  -> FP
    g4 is never found.
    """
    g1, g2, g3, g4 = [0, 0, 40, 40], [100, 100, 140, 140], [0, 0, 50, 50], [100, 0, 150, 50]
    records = [
        record("A", [g1, g2], [0, 0], difficult=[False, True]),
        record("B", [g3, g4], [0, 0]),
    ]
    predictions = [
        # d2 is listed first to show that matching follows the score, not the list order
        preds(
            "A", [[2, 0, 40, 40], [0, 0, 40, 40], [100, 100, 139, 140]], [0.8, 0.9, 0.7], [0, 0, 0]
        ),
        preds("B", [[0, 0, 50, 48], [60, 120, 100, 160]], [0.6, 0.5], [0, 0]),
    ]
    return records, predictions


def test_voc_hand_computed():
    # After dropping d3: TP, FP, TP, FP with num_gt = 3
    #   recall    = 1/3, 1/3, 2/3, 2/3
    #   precision = 1,   1/2, 2/3, 1/2
    # 11-point: t = 0, .1, .2, .3 -> best precision at recall >= t is 1     (4 thresholds)
    #           t = .4, .5, .6    -> points with recall 2/3: max(2/3, 1/2)  (3 thresholds)
    #           t = .7 .. 1       -> no point reaches it: 0                  (4 thresholds)
    #   AP = (4 * 1 + 3 * 2/3) / 11 = 6/11
    # all points: envelope (from the right) is 1 up to recall 1/3, 2/3 up to 2/3, then 0
    #   AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    records, predictions = hand_case()
    voc = evaluate(records, predictions, ["thing"])["voc"]
    thing = voc["per_class"]["thing"]
    assert thing["AP50_11pt"] == pytest.approx(6 / 11)
    assert thing["AP50_all"] == pytest.approx(5 / 9)
    assert (thing["num_gt"], thing["num_det"]) == (3, 5)
    assert voc["mAP50_11pt"] == pytest.approx(6 / 11)
    assert voc["mAP50_all"] == pytest.approx(5 / 9)


def test_pr_curve_is_the_voc_curve():
    records, predictions = hand_case()
    recall, precision = pr_curve(records, predictions, class_idx=0)
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2])
    assert np.all(np.diff(recall) >= 0)


def test_no_predictions_give_zero():
    records, _ = hand_case()
    metrics = evaluate(records, [], ["thing"])
    assert metrics["coco"]["AP"] == 0.0
    assert metrics["coco"]["AP50"] == 0.0
    assert metrics["coco"]["per_class"]["thing"] == {"AP": 0.0, "AP50": 0.0}
    assert metrics["voc"]["mAP50_11pt"] == 0.0
    assert metrics["voc"]["mAP50_all"] == 0.0
    assert metrics["num_det"] == 0
    recall, precision = pr_curve(records, [], 0)
    assert recall.shape == precision.shape == (0,)


def test_false_positives_on_an_image_without_ground_truth_lower_precision():
    records = [record("gt", [[10, 10, 60, 60]], [0]), record("empty")]
    hit = preds("gt", [[10, 10, 60, 60]], [0.5], [0])
    alone = evaluate(records, [hit], ["thing"])
    assert alone["voc"]["mAP50_all"] == pytest.approx(1.0)
    # A higher-scored false positive comes first: precision 0 then 1/2 at recall 1.
    with_fp = evaluate(records, [hit, preds("empty", [[0, 0, 30, 30]], [0.9], [0])], ["thing"])
    assert with_fp["voc"]["mAP50_all"] == pytest.approx(0.5)
    assert with_fp["voc"]["mAP50_11pt"] == pytest.approx(0.5)
    assert with_fp["coco"]["AP50"] == pytest.approx(0.5)


def test_class_without_ground_truth_is_none_and_left_out_of_the_mean():
    records = [record("a", [[10, 10, 60, 60]], [0])]
    predictions = [preds("a", [[10, 10, 60, 60], [100, 100, 150, 150]], [0.9, 0.8], [0, 1])]
    metrics = evaluate(records, predictions, ["present", "absent"])
    absent = metrics["voc"]["per_class"]["absent"]
    assert absent["AP50_11pt"] is None and absent["AP50_all"] is None
    assert (absent["num_gt"], absent["num_det"]) == (0, 1)
    assert metrics["coco"]["per_class"]["absent"] == {"AP": None, "AP50": None}
    assert metrics["voc"]["mAP50_all"] == pytest.approx(1.0)
    assert metrics["coco"]["AP"] == pytest.approx(1.0)


def test_coco_iou_between_thresholds():
    # GT 100x100 (large); the prediction covers 62x100 of it: IoU 0.62, a match at
    # thresholds 0.5, 0.55, 0.6 and at none of the seven above, so AP = 3/10.
    records = [record("a", [[0, 0, 100, 100]], [0])]
    predictions = [preds("a", [[0, 0, 62, 100]], [0.9], [0])]
    coco = evaluate(records, predictions, ["box", "other"])["coco"]
    assert coco["per_class"]["box"]["AP50"] == pytest.approx(1.0)
    assert coco["AP75"] == pytest.approx(0.0)
    assert coco["AP"] == pytest.approx(0.3)
    assert coco["APl"] == pytest.approx(0.3)
    assert coco["APs"] is None and coco["APm"] is None  # no ground truth of those sizes


def test_bad_inputs_raise_with_the_image_named():
    records = [record("a", [[0, 0, 10, 10]], [0])]
    with pytest.raises(ValueError, match="not in the records"):
        evaluate(records, [preds("zzz", [[0, 0, 10, 10]], [0.5], [0])], ["x"])
    with pytest.raises(ValueError, match="'a'.*labels range"):
        evaluate(records, [preds("a", [[0, 0, 10, 10]], [0.5], [3])], ["x"])


def test_format_metrics_table_lists_every_class():
    records, predictions = hand_case()
    metrics = evaluate(records, predictions, ["thing"])
    console = Console(file=io.StringIO(), width=120)
    console.print(format_metrics_table(metrics, ["thing"]))
    text = console.file.getvalue()
    assert "thing" in text and "0.556" in text and "1 difficult" in text


def _noisy_predictions(records, num_classes: int, seed: int = 0) -> list[ImagePredictions]:
    """Detections of every kind COCO matching meets: ground-truth boxes moved by up to a fifth of
    their size (matches at some IoU thresholds, not others), duplicates, wrong classes, boxes on
    the background, more than 100 on some images, none on one."""
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(records[1:]):  # the first image gets no prediction
        wh = np.maximum(r.boxes[:, 2:] - r.boxes[:, :2], 1)
        jitter = rng.uniform(-0.2, 0.2, (2, len(r.boxes), 4)) * np.tile(wh, 2)
        moved = np.concatenate([r.boxes + jitter[0], r.boxes + jitter[1]])
        labels = np.concatenate([r.labels, np.where(rng.random(len(r.labels)) < 0.3, rng.integers(0, num_classes, len(r.labels)), r.labels)])
        count = 120 if i % 5 == 0 else 10
        corner = rng.uniform(0, [r.width, r.height], (count, 2))
        size = rng.uniform(4, 0.5 * min(r.width, r.height), (count, 2))
        background = np.concatenate([corner, corner + size], 1)
        boxes = np.concatenate([moved, background]).clip(0, [r.width, r.height] * 2)
        labels = np.concatenate([labels, rng.integers(0, num_classes, count)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(moved)), rng.uniform(0.0, 0.7, count)])
        out.append(preds(r.image_id, boxes, scores, labels))
    return out


def test_faster_coco_eval_gives_the_numbers_of_pycocotools():
    pytest.importorskip("faster_coco_eval")
    from kdet.data import read_dataset, resolve_data_path

    index = read_dataset(resolve_data_path("bundled:bccd"))
    records = index.split("test")
    predictions = _noisy_predictions(records, len(index.class_names))
    assert len(records) > 30 and sum(len(p.labels) for p in predictions) > 1000
    slow = evaluate(records, predictions, index.class_names, coco_evaluator="pycocotools")
    fast = evaluate(records, predictions, index.class_names, coco_evaluator="faster-coco-eval")
    assert slow["coco_evaluator"].startswith("pycocotools") and fast["coco_evaluator"].startswith("faster-coco-eval")
    assert 0.05 < slow["coco"]["AP"] < 0.95  # neither trivial case
    assert _flat(fast["coco"]) == pytest.approx(_flat(slow["coco"]), abs=1e-12)  # float summation order aside
    # and on the hand-made cases: an image without predictions, a class without ground truth
    for case in (hand_case(), ([record("a", [[10, 10, 60, 60]], [0])], [preds("a", [[100, 100, 150, 150]], [0.8], [1])])):
        names = ["thing", "other"]
        assert _flat(evaluate(*case, names, coco_evaluator="faster-coco-eval")["coco"]) == \
            pytest.approx(_flat(evaluate(*case, names, coco_evaluator="pycocotools")["coco"]), abs=1e-12)


def _flat(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_evaluator_is_named_and_checked():
    records, predictions = hand_case()
    with pytest.raises(ValueError, match="coco_evaluator must be one of"):
        evaluate(records, predictions, ["thing"], coco_evaluator="detectron2")
    assert evaluate(records, predictions, ["thing"])["coco_evaluator"].split()[0] in ("faster-coco-eval", "pycocotools")
