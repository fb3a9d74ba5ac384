"""The loss of the anchor-free DFL head (YOLOv8/YOLO11 style): task-aligned assignment, BCE
class loss against the normalised alignment metric, CIoU box loss and Distribution Focal Loss.

Box convention (shared with the head and its decoding): every location of a level of stride
``s`` has one anchor point, its cell centre ``((col + 0.5) * s, (row + 0.5) * s)`` in input
pixels, as Ultralytics places them. The head predicts, per box edge, a distribution over
``R`` bins ``0, 1, ..., R - 1``; its expectation is the distance from the anchor point to that
edge (left, top, right, bottom) in units of ``s``. So a box reaches at most ``R - 1`` strides
from its anchor point on every side.

References:
  Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for
  Dense Object Detection", NeurIPS 2020 (arXiv:2006.04388): the edge distributions and the
  Distribution Focal Loss.
  Feng et al., "TOOD: Task-aligned One-stage Object Detection", ICCV 2021 (arXiv:2108.07755):
  the alignment metric, the top-k assignment and the normalised soft class target.
  Zheng et al., "Distance-IoU Loss", AAAI 2020 (arXiv:1911.08287): the CIoU box loss.
  Jocher et al., Ultralytics YOLOv8 (2023): the head layout and hyperparameters (R = 16,
  top-k 10, alpha 0.5, beta 6.0, loss weights box 7.5, cls 0.5, dfl 1.5).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, complete_box_iou_loss

from ..structures import HeadLevel, Targets

REG_MAX = 16  # bins per box edge, YOLOv8's reg_max

# smallest distance (in strides) from the anchor point to an edge that the CIoU sees: a box of
# zero width or height gives its aspect term (atan(w / h)) a NaN gradient
MIN_EDGE = 1e-4


# ---------------------------------------------------------------------------------------------
# Geometry shared by the head, its decoding and the loss
# ---------------------------------------------------------------------------------------------
def dfl_expectation(box_dist: Tensor, dim: int) -> Tensor:
    """Expected bin index of the softmax over ``dim`` (the ``R`` bins): edge distances in strides,
    in ``[0, R - 1]``. ``box_dist`` keeps every other dimension."""
    bins = torch.arange(box_dist.shape[dim], device=box_dist.device, dtype=box_dist.dtype)
    shape = [1] * box_dist.dim()
    shape[dim] = -1
    return (box_dist.softmax(dim) * bins.view(shape)).sum(dim)


def anchor_points(height: int, width: int, stride: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``[H * W, 2]`` (x, y) cell centres in input pixels, row by row."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij"
    )
    return (torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * stride


def ltrb_to_xyxy(ltrb: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """Distances ``[..., 4]`` in strides from ``points [..., 2]`` (pixels) -> boxes ``[..., 4]``
    xyxy pixels; ``strides`` broadcasts against ``[..., 1]``."""
    return torch.cat([points - ltrb[..., :2] * strides, points + ltrb[..., 2:] * strides], -1)


def xyxy_to_ltrb(boxes: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """Inverse of :func:`ltrb_to_xyxy`."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1) / strides


@dataclass
class FlatPredictions:
    """Every location of every level in one row, levels in pyramid order, rows row by row:
    ``points [K, 2]`` anchor points, the cell centres (pixels, whatever point the level's boxes
    are measured from), ``strides [K, 1]``, ``boxes [N, K, 4]`` xyxy pixels,
    ``scores [N, K, C]`` in ``[0, 1]``; for the model's own DFL head also ``cls_logits [N, K, C]``,
    ``ltrb [N, K, 4]`` (strides) and ``box_dist [N, K, 4, R]``."""

    points: Tensor
    strides: Tensor
    boxes: Tensor
    scores: Tensor
    cls_logits: Tensor | None = None
    ltrb: Tensor | None = None
    box_dist: Tensor | None = None


def flatten_levels(head: list[HeadLevel]) -> FlatPredictions:
    """Head levels with one anchor per location and ``ltrb_center`` or ``ltrb`` boxes (FCOS's,
    from the cell corner) -> :class:`FlatPredictions`. Scores are the class probabilities, times
    the level's objectness, or ``sqrt(class x centerness)`` as FCOS scores its detections."""
    points, strides, boxes, scores, logits, ltrbs, dists = [], [], [], [], [], [], []
    for level in head:
        if level.num_anchors != 1 or level.box_format not in ("ltrb_center", "ltrb"):
            raise ValueError(
                f"level {level.name}: task-aligned assignment reads heads with one anchor per location and ltrb boxes, "
                f"got {level.num_anchors} anchor(s) and box format {level.box_format!r}"
            )
        n, _, _, h, w = level.cls_logits.shape
        centre = anchor_points(h, w, level.stride, device=level.box.device, dtype=level.box.dtype)
        point = centre if level.box_format == "ltrb_center" else centre - 0.5 * level.stride
        ltrb = level.box[:, 0].flatten(2).transpose(1, 2)  # [N, HW, 4]
        logit = level.cls_logits[:, 0].flatten(2).transpose(1, 2)  # [N, HW, C]
        score = logit.sigmoid()
        if level.score is not None:
            other = level.score[:, 0].flatten(2).transpose(1, 2).sigmoid()  # [N, HW, 1]
            score = (score * other).sqrt() if level.score_kind == "centerness" else score * other
        points.append(centre)
        strides.append(torch.full((h * w, 1), float(level.stride), device=centre.device, dtype=centre.dtype))
        boxes.append(ltrb_to_xyxy(ltrb, point, level.stride))
        scores.append(score)
        logits.append(logit)
        ltrbs.append(ltrb)
        if level.box_dist is not None:
            dists.append(level.box_dist[:, 0].permute(0, 3, 4, 1, 2).reshape(n, h * w, 4, -1))  # [N, HW, 4, R]
    own = all(level.box_format == "ltrb_center" and level.box_dist is not None for level in head)
    return FlatPredictions(
        points=torch.cat(points),
        strides=torch.cat(strides),
        boxes=torch.cat(boxes, 1),
        scores=torch.cat(scores, 1),
        cls_logits=torch.cat(logits, 1) if own else None,
        ltrb=torch.cat(ltrbs, 1) if own else None,
        box_dist=torch.cat(dists, 1) if own else None,
    )


# ---------------------------------------------------------------------------------------------
# Task-aligned assignment
# ---------------------------------------------------------------------------------------------
@dataclass
class TaskAlignedAssignment:
    """One image: ``gt_index [K]`` int64, the ground-truth box each location is a positive for
    (-1: background); ``target_scores [K, C]``, zero except at a positive's class, which holds
    its normalised alignment metric; ``metric [K]`` the raw alignment metric of each positive
    with its box (0 for background)."""

    gt_index: Tensor
    target_scores: Tensor
    metric: Tensor

    @property
    def foreground(self) -> Tensor:
        return self.gt_index >= 0


@torch.no_grad()
def task_aligned_assign(
    scores: Tensor,
    boxes: Tensor,
    points: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> TaskAlignedAssignment:
    """Task-aligned assignment (TOOD) of one image's ground truth to its locations.

    Inputs: predicted class scores ``[K, C]`` in ``[0, 1]`` and boxes ``[K, 4]`` xyxy pixels of
    the model being trained, or of another model (a teacher, for assignment distillation);
    ``points [K, 2]`` the locations' anchor points (pixels); ``gt_boxes [M, 4]`` xyxy pixels and
    ``gt_labels [M]`` int64 (``M`` may be 0).

    1. Alignment metric of location ``k`` with box ``m``: ``t = s^alpha * u^beta``, ``s`` the
       predicted score of the box's class at ``k``, ``u`` the IoU of the predicted box at ``k``
       with the box (plain IoU, as in the paper; Ultralytics uses CIoU clamped at 0 here).
    2. Candidates of box ``m``: the ``topk`` locations of highest ``t`` among those whose anchor
       point lies strictly inside the box (fewer when fewer lie inside).
    3. A location that is a candidate of several boxes goes to the one its predicted box overlaps
       most (highest IoU), among those boxes.
    4. Soft class target of a positive of box ``m``: ``t / max(t) * max(u)``, maxima over the
       positives of ``m`` (TOOD's normalisation: the best-aligned location of each object gets
       the best IoU reached on it, instead of 1).

    Nothing here carries a gradient.
    """
    num_locations, num_classes = scores.shape
    device = scores.device
    result = TaskAlignedAssignment(  # background everywhere until filled in
        torch.full((num_locations,), -1, dtype=torch.long, device=device),
        torch.zeros((num_locations, num_classes), device=device, dtype=torch.float32),
        torch.zeros((num_locations,), device=device, dtype=torch.float32),
    )
    if len(gt_boxes) == 0 or num_locations == 0:
        return result
    scores, boxes, points, gt_boxes = scores.float(), boxes.float(), points.float(), gt_boxes.float()
    inside = ((points[None] > gt_boxes[:, None, :2]) & (points[None] < gt_boxes[:, None, 2:])).all(-1)  # [M, K]
    iou = box_iou(gt_boxes, boxes).clamp(min=0)  # [M, K]
    class_score = scores[:, gt_labels].T  # [M, K]
    metric = class_score.pow(alpha) * iou.pow(beta) * inside
    # rank the points outside a box below every point inside it, so they only fill the top-k
    # when fewer than topk points lie inside, and are dropped right after
    ranked = torch.where(inside, metric, torch.full_like(metric, -1.0))
    top = ranked.topk(min(topk, num_locations), dim=1).indices  # [M, k]
    candidate = torch.zeros_like(inside).scatter_(1, top, True) & inside  # [M, K]
    foreground = candidate.any(0)  # [K]
    if not foreground.any():
        return result
    owner = torch.where(candidate, iou, torch.full_like(iou, -1.0)).argmax(0)  # [K]
    positive = torch.zeros_like(candidate)
    positive[owner, torch.arange(num_locations, device=device)] = foreground
    best_metric = (metric * positive).amax(1)  # [M]
    best_iou = (iou * positive).amax(1)  # [M]
    locations = foreground.nonzero(as_tuple=True)[0]
    box = owner[locations]
    own_metric = metric[box, locations]
    target = own_metric / (best_metric[box] + eps) * best_iou[box]
    result.gt_index[locations] = box
    result.target_scores[locations, gt_labels[box]] = target
    result.metric[locations] = own_metric
    return result


# ---------------------------------------------------------------------------------------------
# Distribution Focal Loss
# ---------------------------------------------------------------------------------------------
def distribution_focal_loss(box_dist: Tensor, target: Tensor) -> Tensor:
    """DFL (GFL, eq. 6): ``box_dist [..., R]`` logits over the bins, ``target [...]`` a distance
    in ``[0, R - 1)``, bins; returns ``[...]``
    ``-((y_{i+1} - y) * log S_i + (y - y_i) * log S_{i+1})`` with ``y_i <= y < y_{i+1}`` the two
    bins around ``y``: the cross-entropy that puts the distribution's mass on the two nearest
    bins, in the proportions whose expectation is ``y``."""
    bins = box_dist.shape[-1]
    target = target.clamp(0, bins - 1 - 0.01)
    left = target.floor().long()
    right = left + 1
    log_prob = box_dist.float().log_softmax(-1)
    left_weight = right.to(target.dtype) - target
    right_weight = target - left.to(target.dtype)
    left_log_prob = log_prob.gather(-1, left[..., None])[..., 0]
    right_log_prob = log_prob.gather(-1, right[..., None])[..., 0]
    return -(left_log_prob * left_weight + right_log_prob * right_weight)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
class DFLLoss:
    """Unweighted loss terms ``box`` (CIoU), ``cls`` (BCE) and ``dfl``, and their weights.

    Per batch, with ``T`` the sum of all soft class targets (at least 1), as YOLOv8 normalises:

    * ``cls``: BCE of every location's class logits against the soft targets of
      :func:`task_aligned_assign` (0 for background), summed, ``/ T``;
    * ``box``: ``1 - CIoU`` of each positive's predicted box with its ground-truth box, weighted
      by the positive's soft target, summed, ``/ T``;
    * ``dfl``: :func:`distribution_focal_loss` of each positive's four edges (mean over edges)
      against the ground-truth distances (in strides, limited to ``R - 1.01``), weighted and
      normalised as ``box``.

    Weights (:meth:`weights`): YOLOv8's ``box 7.5, cls 0.5, dfl 1.5``, whatever the number of
    levels or input size. Unlike Ultralytics the sum is not multiplied by the batch size (kdet's
    losses are per batch, as :class:`~kdet.losses.yolo.YOLOv5Loss`).

    ``assign_from`` (head levels of another model at the same strides and grids, with the same
    classes): the assignment reads its class scores and decoded boxes instead of the trained
    model's, as PP-YOLOE+ distillation and LAD (Nguyen et al., "Improving Object Detection by
    Label Assignment Distillation", WACV 2022) do with a teacher; the losses stay the student's.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        reg_max: int = REG_MAX,
        box_weight: float = 7.5,
        cls_weight: float = 0.5,
        dfl_weight: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
    ) -> None:
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.base_weights = {"box": box_weight, "cls": cls_weight, "dfl": dfl_weight}
        self.topk, self.alpha, self.beta = topk, alpha, beta

    def weights(self, num_levels: int, input_size: int) -> dict[str, float]:
        return dict(self.base_weights)

    def assign_flat(
        self, head: list[HeadLevel], targets: Targets, assign_from: list[HeadLevel] | None = None
    ) -> list[TaskAlignedAssignment]:
        """One :class:`TaskAlignedAssignment` per image, over the flattened locations of ``head``
        (predictions of ``assign_from`` when given)."""
        source = head if assign_from is None else assign_from
        if assign_from is not None:
            check_assign_from(head, assign_from)
        with torch.no_grad():
            flat = flatten_levels([_detached(level) for level in source])
        if len(targets) != len(flat.boxes):
            raise ValueError(f"got {len(targets)} targets for {len(flat.boxes)} images; expected one dict per image")
        device = flat.boxes.device
        return [
            task_aligned_assign(
                flat.scores[i], flat.boxes[i], flat.points,
                target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4),
                target["labels"].to(device=device, dtype=torch.long).reshape(-1),
                topk=self.topk, alpha=self.alpha, beta=self.beta,
            )
            for i, target in enumerate(targets)
        ]

    def assign(self, head: list[HeadLevel], targets: Targets, assign_from: list[HeadLevel] | None = None) -> list[Tensor]:
        """Per level int64 ``[N, 1, H, W]``: the index (into its image's targets) of the object
        each location is a positive for, -1 for background."""
        gt_index = torch.stack([a.gt_index for a in self.assign_flat(head, targets, assign_from)])  # [N, K]
        sizes = [level.grid_size[0] * level.grid_size[1] for level in head]
        return [
            part.view(len(gt_index), 1, *level.grid_size) for part, level in zip(gt_index.split(sizes, 1), head)
        ]

    def __call__(
        self, head: list[HeadLevel], targets: Targets, assign_from: list[HeadLevel] | None = None
    ) -> dict[str, Tensor]:
        flat = flatten_levels(head)
        if flat.box_dist is None:
            raise ValueError("DFLLoss needs the levels of a DFL head (box_format ltrb_center with box_dist)")
        assignments = self.assign_flat(head, targets, assign_from)
        target_scores = torch.stack([a.target_scores for a in assignments])  # [N, K, C]
        gt_index = torch.stack([a.gt_index for a in assignments])  # [N, K]
        logits = flat.cls_logits.float()
        normaliser = target_scores.sum().clamp_min(1.0)
        losses = {"cls": F.binary_cross_entropy_with_logits(logits, target_scores, reduction="sum") / normaliser}
        foreground = gt_index >= 0
        if not foreground.any():
            zero = (flat.ltrb.sum() + flat.box_dist.sum()) * 0  # keeps the graph
            losses.update(box=zero, dfl=zero)
            return losses
        image, location = foreground.nonzero(as_tuple=True)
        target_boxes = torch.cat(
            [target["boxes"].to(device=logits.device, dtype=torch.float32).reshape(-1, 4) for target in targets]
        )
        first = torch.tensor([0] + [len(t["boxes"]) for t in targets][:-1], device=logits.device).cumsum(0)
        target_boxes = target_boxes[first[image] + gt_index[image, location]]  # [P, 4]
        weight = target_scores[image, location].sum(-1)  # [P]
        points, strides = flat.points[location].float(), flat.strides[location].float()
        predicted = ltrb_to_xyxy(flat.ltrb[image, location].float().clamp_min(MIN_EDGE), points, strides)
        ciou = complete_box_iou_loss(predicted, target_boxes, reduction="none")
        losses["box"] = (ciou * weight).sum() / normaliser
        target_ltrb = xyxy_to_ltrb(target_boxes, points, strides)
        dfl = distribution_focal_loss(flat.box_dist[image, location], target_ltrb).mean(-1)
        losses["dfl"] = (dfl * weight).sum() / normaliser
        return losses


def _detached(level: HeadLevel) -> HeadLevel:
    return replace(
        level,
        cls_logits=level.cls_logits.detach(),
        box=level.box.detach(),
        score=None if level.score is None else level.score.detach(),
        box_dist=None if level.box_dist is None else level.box_dist.detach(),
    )


def check_assign_from(head: list[HeadLevel], assign_from: list[HeadLevel]) -> None:
    """Raise unless ``assign_from`` has a level for every level of ``head``, of the same stride
    and grid, with the same number of classes."""
    own = [(level.stride, level.grid_size, level.num_classes) for level in head]
    other = [(level.stride, level.grid_size, level.num_classes) for level in assign_from]
    if own != other:
        raise ValueError(
            f"assign_from must have the levels of the trained head (stride, grid, classes) {own}, got {other}; "
            f"pair the models' levels by stride and map the classes first"
        )
