"""Detection metrics: COCO AP (through faster-coco-eval when it is installed, ``pip install
kdet[fast]``, else pycocotools; the two give the same numbers) and VOC mAP@0.5 (written here).

Both take the dataset's :class:`~kdet.structures.ImageRecord` list as ground truth and one
:class:`ImagePredictions` per image, boxes ``xyxy`` in pixels of the ORIGINAL image (undo any
resize/letterbox before calling).

Choices worth knowing when comparing numbers with other tools:

* COCO: boxes flagged ``difficult`` are kept as ordinary ground truth (COCO has no such flag; the
  nearest thing, ``iscrowd``, changes matching, which VOC's flag does not ask for). The size
  buckets (``APs/APm/APl``) use the box area ``w * h``, because kdet has no masks; official COCO
  uses the segmentation area, so those three differ a little from the official tools on COCO.
  Metrics with no ground truth in their bucket are ``None`` where pycocotools says ``-1``.
* VOC: intersection-over-union is continuous (``(x2 - x1) * (y2 - y1)``), NOT the old devkit's
  ``+ 1`` pixel convention, and a match needs ``IoU >= iou`` (the devkit used ``>``). A detection
  goes to the highest-IoU ground-truth box of its image and class that is not yet matched (the
  devkit takes the highest-IoU box even when matched, then calls the detection a false positive;
  the two differ only where ground-truth boxes overlap). Difficult boxes are never consumed, do not
  count in ``num_gt``, and a detection that lands on one is neither a true nor a false positive.
  Classes with no (non-difficult) ground truth get ``None`` and are left out of the mean.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.table import Table

from kdet.structures import ImageRecord

VOC_IOU = 0.5
COCO_MAX_DETS = 100
COCO_EVALUATORS = ("faster-coco-eval", "pycocotools")


def default_coco_evaluator() -> str:
    """``faster-coco-eval`` when it is installed (its C++ matching is several times faster on
    large test sets), ``pycocotools`` otherwise."""
    return "faster-coco-eval" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


@dataclass
class ImagePredictions:
    """Predictions for one image, in pixels of the ORIGINAL image.

    ``boxes``: float ``[K, 4]`` xyxy; ``scores``: float ``[K]``; ``labels``: int64 ``[K]`` into the
    dataset's ``class_names``. Arrays are coerced (tensors on the CPU are accepted).
    """

    image_id: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not (len(self.boxes) == len(self.scores) == len(self.labels)):
            raise ValueError(
                f"predictions for image {self.image_id!r}: {len(self.boxes)} boxes, "
                f"{len(self.scores)} scores and {len(self.labels)} labels; expected the same number"
            )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def evaluate(
    records: list[ImageRecord], predictions: list[ImagePredictions], class_names: list[str], *,
    coco_evaluator: str | None = None,
) -> dict:
    """COCO and VOC metrics of ``predictions`` against ``records``; a JSON-able dict.
    ``coco_evaluator`` (one of :data:`COCO_EVALUATORS`) computes the COCO part; by default
    :func:`default_coco_evaluator`.

    Every record is evaluated; a record without an entry in ``predictions`` counts as an image
    where nothing was detected. Predictions for an image id not in ``records`` raise.

    Returns::

        {"coco": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100",
                  "per_class": {name: {"AP", "AP50"}}},
         "voc": {"mAP50_11pt", "mAP50_all",
                 "per_class": {name: {"AP50_11pt", "AP50_all", "num_gt", "num_det"}}},
         "images": int, "num_gt": int, "num_det": int, "coco_evaluator": "<name> <version>"}

    Top-level ``num_gt`` counts every ground-truth box, difficult ones included (they are in COCO
    AP); the VOC ``num_gt`` per class leaves difficult boxes out. ``num_det`` per class counts all
    predictions of that class. A metric is ``None`` when there is no ground truth to measure it
    on (a class without boxes, a COCO size bucket that is empty); the means skip those.
    """
    pairs = _pair(records, predictions, num_classes=len(class_names))
    det_labels = [np.zeros(0, np.int64)] + [p.labels for _, p in pairs if p is not None]
    num_det_per_class = np.bincount(np.concatenate(det_labels), minlength=len(class_names))  # [C]
    voc_per_class = {}
    for class_idx, name in enumerate(class_names):
        recall, precision, num_gt = _voc_curve(pairs, class_idx, VOC_IOU)
        has_gt = num_gt > 0
        voc_per_class[name] = {
            "AP50_11pt": _ap_11pt(recall, precision) if has_gt else None,
            "AP50_all": _ap_all_points(recall, precision) if has_gt else None,
            "num_gt": int(num_gt),
            "num_det": int(num_det_per_class[class_idx]),
        }
    evaluator = coco_evaluator or default_coco_evaluator()
    if evaluator not in COCO_EVALUATORS:
        raise ValueError(f"coco_evaluator must be one of {', '.join(COCO_EVALUATORS)}, got {evaluator!r}")
    return {
        "coco": _coco_metrics(pairs, class_names, evaluator),
        "voc": {
            "mAP50_11pt": _mean_or_none([v["AP50_11pt"] for v in voc_per_class.values()]),
            "mAP50_all": _mean_or_none([v["AP50_all"] for v in voc_per_class.values()]),
            "per_class": voc_per_class,
        },
        "images": len(records),
        "num_gt": int(sum(len(r.labels) for r in records)),
        "num_det": int(sum(len(p.labels) for _, p in pairs if p is not None)),
        "coco_evaluator": f"{evaluator} {importlib.metadata.version(evaluator)}",
    }


def pr_curve(
    records: list[ImageRecord],
    predictions: list[ImagePredictions],
    class_idx: int,
    iou: float = VOC_IOU,
) -> tuple[np.ndarray, np.ndarray]:
    """VOC precision/recall curve of one class: the curve behind ``voc`` AP in :func:`evaluate`.

    Matching follows the module docstring. Returns ``(recall, precision)``, float64 ``[D]``, one
    point per detection of the class in score order (ties keep record order, then prediction
    order), detections on difficult boxes left out. ``recall`` is non-decreasing; ``precision`` is
    the raw value, not the envelope. Both are empty when there is no detection of the class or
    no (non-difficult) ground truth to recall.
    """
    if class_idx < 0:
        raise ValueError(f"class_idx must be >= 0, got {class_idx}")
    recall, precision, _ = _voc_curve(_pair(records, predictions, num_classes=None), class_idx, iou)
    return recall, precision


def format_metrics_table(metrics: dict, class_names: list[str]) -> Table:
    """A rich table of :func:`evaluate`'s result: an overall row, then one row per class.

    Columns: COCO AP@[.5:.95], COCO AP50, VOC AP50 (11-point), VOC AP50 (all points), and the VOC
    ground-truth count (difficult boxes left out; the caption says how many when there are any).
    """
    coco, voc = metrics["coco"], metrics["voc"]
    table = Table(
        title=f"Detection metrics ({metrics['images']} images, {metrics['num_det']} detections)"
    )
    table.add_column("class")
    for header in ("AP", "AP50", "VOC AP50 11pt", "VOC AP50 all", "GT"):
        table.add_column(header, justify="right")
    voc_gt = sum(voc["per_class"][name]["num_gt"] for name in class_names)
    table.add_row(
        "all",
        _fmt(coco["AP"]),
        _fmt(coco["AP50"]),
        _fmt(voc["mAP50_11pt"]),
        _fmt(voc["mAP50_all"]),
        str(voc_gt),
        end_section=True,
    )
    for name in class_names:
        coco_c, voc_c = coco["per_class"][name], voc["per_class"][name]
        table.add_row(
            name,
            _fmt(coco_c["AP"]),
            _fmt(coco_c["AP50"]),
            _fmt(voc_c["AP50_11pt"]),
            _fmt(voc_c["AP50_all"]),
            str(voc_c["num_gt"]),
        )
    num_difficult = metrics["num_gt"] - voc_gt
    if num_difficult > 0:
        table.caption = (
            f"GT excludes {num_difficult} difficult boxes (ignored by VOC AP, counted by COCO AP)"
        )
    return table


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _pair(
    records: list[ImageRecord], predictions: list[ImagePredictions], num_classes: int | None
) -> list[tuple[ImageRecord, ImagePredictions | None]]:
    """Each record with its predictions (``None`` when it has none), in record order."""
    if not records:
        raise ValueError("no records to evaluate: the ground-truth list is empty")
    by_id: dict[str, ImagePredictions] = {}
    for pred in predictions:
        if pred.image_id in by_id:
            raise ValueError(
                f"two ImagePredictions for image {pred.image_id!r}; expected at most one per "
                f"image. Concatenate its boxes, scores and labels into one."
            )
        by_id[pred.image_id] = pred
    record_ids = set()
    for record in records:
        if record.image_id in record_ids:
            raise ValueError(f"image id {record.image_id!r} appears twice in the records")
        record_ids.add(record.image_id)
        _check_labels(record.labels, num_classes, f"ground truth of image {record.image_id!r}")
    unknown = [image_id for image_id in by_id if image_id not in record_ids]
    if unknown:
        raise ValueError(
            f"predictions for {len(unknown)} image(s) not in the records, e.g. {unknown[:3]}; "
            f"predict on the same split that is evaluated"
        )
    for pred in by_id.values():
        _check_labels(pred.labels, num_classes, f"predictions of image {pred.image_id!r}")
    return [(record, by_id.get(record.image_id)) for record in records]


def _check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    if len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        expected = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise ValueError(
            f"{where}: labels range from {low} to {high}; expected {expected} "
            f"(indices into class_names)"
        )


# ---------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Continuous IoU of xyxy boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]`` -> ``[N, M]`` (no +1)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)  # [N]
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)  # [M]
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = area_a[:, None] + area_b[None, :] - inter
    # Two zero-area boxes have union 0; call that no overlap rather than divide by zero.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_image(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray, iou: float
) -> np.ndarray:
    """Greedy matching in one image and class; detections already sorted by score, descending.

    Returns int8 ``[K]``: 1 true positive, 0 false positive, -1 ignored (landed on a difficult box).
    """
    outcome = np.zeros(len(det_boxes), dtype=np.int8)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return outcome
    ious = _box_iou(det_boxes, gt_boxes)  # [K, G]
    matched = np.zeros(len(gt_boxes), dtype=bool)
    for k in range(len(det_boxes)):
        candidates = np.where(matched, -1.0, ious[k])  # matched boxes are out of reach
        best = int(candidates.argmax())
        if candidates[best] < iou:
            continue  # false positive
        if gt_difficult[best]:
            outcome[k] = -1  # never consumed: further detections on it are ignored too
        else:
            outcome[k] = 1
            matched[best] = True
    return outcome


def _voc_curve(
    pairs: list[tuple[ImageRecord, ImagePredictions | None]], class_idx: int, iou: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(recall [D], precision [D], num_gt)`` of one class; shared by evaluate and pr_curve."""
    scores_per_image, outcome_per_image = [], []
    num_gt = 0
    for record, pred in pairs:
        is_class = record.labels == class_idx
        gt_boxes, gt_difficult = record.boxes[is_class], record.difficult[is_class]
        num_gt += int((~gt_difficult).sum())
        if pred is None:
            continue
        keep = pred.labels == class_idx
        # Matching only depends on the score order inside an image, so each image is matched on
        # its own; a stable sort keeps this order equal to the global one below.
        order = np.argsort(-pred.scores[keep], kind="stable")
        scores = pred.scores[keep][order]
        scores_per_image.append(scores)
        outcome_per_image.append(_match_image(pred.boxes[keep][order], gt_boxes, gt_difficult, iou))
    if num_gt == 0 or not scores_per_image:
        return np.zeros(0), np.zeros(0), num_gt
    scores = np.concatenate(scores_per_image)
    outcome = np.concatenate(outcome_per_image)
    outcome = outcome[np.argsort(-scores, kind="stable")]
    outcome = outcome[outcome >= 0]  # drop detections on difficult boxes
    tp = np.cumsum(outcome == 1)
    fp = np.cumsum(outcome == 0)
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, 1)
    return recall.astype(np.float64), precision.astype(np.float64), num_gt


def _ap_11pt(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007: mean over recall thresholds 0, 0.1 .. 1 of the best precision at recall >= t."""
    total = 0.0
    for t in np.arange(11) / 10:  # exact tenths: 0.1 * 3 would miss a recall of exactly 0.3
        reached = recall >= t
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / 11


def _ap_all_points(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+: area under the precision envelope (non-increasing from the right)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    change = np.flatnonzero(mrec[1:] != mrec[:-1])  # recall steps
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------
def _coco_metrics(
    pairs: list[tuple[ImageRecord, ImagePredictions | None]], class_names: list[str], evaluator: str
) -> dict:
    images = [
        {"id": i + 1, "file_name": str(record.path), "width": record.width, "height": record.height}
        for i, (record, _) in enumerate(pairs)
    ]
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(class_names)]
    gt_anns, dt_anns = [], []
    for i, (record, pred) in enumerate(pairs):
        # Difficult boxes are ordinary ground truth here (see the module docstring).
        for box, label in zip(record.boxes.tolist(), record.labels.tolist()):
            gt_anns.append(_coco_ann(len(gt_anns) + 1, i + 1, label, box))
        if pred is not None:
            for box, label, score in zip(
                pred.boxes.tolist(), pred.labels.tolist(), pred.scores.tolist()
            ):
                dt_anns.append(_coco_ann(len(dt_anns) + 1, i + 1, label, box, score=score))

    if evaluator == "faster-coco-eval":
        from faster_coco_eval import COCO as coco_class
        from faster_coco_eval import COCOeval_faster

        def make_eval(gt, dt):
            return COCOeval_faster(gt, dt, iouType="bbox", print_function=_silent)
    else:
        coco_class, make_eval = COCO, lambda gt, dt: COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = _coco_from_dict(coco_class, images, categories, gt_anns)
        # Built directly rather than with coco_gt.loadRes, which fails on an empty result list;
        # this is what loadRes builds for boxes (area = w * h, iscrowd = 0).
        coco_dt = _coco_from_dict(coco_class, images, categories, dt_anns)
        coco_eval = make_eval(coco_gt, coco_dt)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    # summarize() order: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    stats = coco_eval.stats
    max_det_idx = coco_eval.params.maxDets.index(COCO_MAX_DETS)
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M], -1 where no ground truth
    per_class = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, max_det_idx]  # [T, R], area "all"
        per_class[name] = {"AP": _mean_valid(p), "AP50": _mean_valid(p[0])}
    return {
        "AP": _stat(stats[0]),
        "AP50": _stat(stats[1]),
        "AP75": _stat(stats[2]),
        "APs": _stat(stats[3]),
        "APm": _stat(stats[4]),
        "APl": _stat(stats[5]),
        "AR100": _stat(stats[8]),
        "per_class": per_class,
    }


def _silent(*args, **kwargs) -> None:
    pass


def _coco_from_dict(coco_class, images: list[dict], categories: list[dict], annotations: list[dict]):
    coco = coco_class()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def _coco_ann(
    ann_id: int, image_id: int, label: int, box: list[float], score: float | None = None
) -> dict:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [x1, y1, w, h],
        "area": w * h,
        "iscrowd": 0,
    }
    if score is not None:
        ann["score"] = score
    return ann


def _stat(value: float) -> float | None:
    return None if value < 0 else float(value)  # pycocotools says -1 for "no ground truth"


def _mean_valid(p: np.ndarray) -> float | None:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
