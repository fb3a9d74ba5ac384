"""Anchor boxes for anchor-based heads: YOLOv5's defaults, or k-means on the training boxes."""
from __future__ import annotations

import numpy as np

# YOLOv5's COCO anchors (w, h in pixels at 640 input), three per level, strides 8/16/32
DEFAULT_ANCHORS: list[list[list[float]]] = [
    [[10, 13], [16, 30], [33, 23]],
    [[30, 61], [62, 45], [59, 119]],
    [[116, 90], [156, 198], [373, 326]],
]


def kmeans_anchors(
    box_sizes: np.ndarray, *, levels: int = 3, per_level: int = 3, seed: int = 0, iterations: int = 100
) -> list[list[list[float]]]:
    """Cluster box sizes ``[M, 2]`` (w, h pixels at the model's input size) into
    ``levels * per_level`` anchors with the 1 - IoU distance of boxes sharing a centre,
    sorted by area, finest level first.

    Raises ``ValueError`` when there are fewer distinct boxes than anchors.
    """
    sizes = np.asarray(box_sizes, dtype=np.float64).reshape(-1, 2)
    sizes = sizes[(sizes > 1).all(1)]
    count = levels * per_level
    if len(np.unique(sizes, axis=0)) < count:
        raise ValueError(
            f"need at least {count} distinct box sizes to fit {count} anchors, found {len(sizes)}; "
            f"set model.anchors: default"
        )
    rng = np.random.default_rng(seed)
    centres = sizes[rng.choice(len(sizes), count, replace=False)]
    for _ in range(iterations):
        nearest = _shape_iou(sizes, centres).argmax(1)
        updated = np.array(
            [np.median(sizes[nearest == k], axis=0) if (nearest == k).any() else centres[k] for k in range(count)]
        )
        if np.allclose(updated, centres):
            break
        centres = updated
    centres = centres[np.argsort(centres.prod(1))]
    return [np.round(centres[i * per_level : (i + 1) * per_level], 1).tolist() for i in range(levels)]


def _shape_iou(sizes: np.ndarray, centres: np.ndarray) -> np.ndarray:
    inter = np.minimum(sizes[:, None], centres[None]).prod(2)
    return inter / (sizes.prod(1)[:, None] + centres.prod(1)[None] - inter)


def best_possible_recall(box_sizes: np.ndarray, anchors: list[list[list[float]]], threshold: float = 4.0) -> float:
    """Fraction of boxes that at least one anchor can be assigned to (shape ratio < threshold)."""
    sizes = np.asarray(box_sizes, dtype=np.float64).reshape(-1, 1, 2)
    flat = np.asarray(anchors, dtype=np.float64).reshape(1, -1, 2)
    ratio = sizes / flat
    worst = np.maximum(ratio, 1 / ratio).max(2)
    return float((worst.min(1) < threshold).mean()) if len(sizes) else 1.0
