"""Distilling on unlabelled images: batches that mix labelled and unlabelled images, the
detection loss on the labelled ones only, and the teacher's pseudo-labels.

A batch's ``labelled`` flags say which images have labels (:class:`~kdet.engine.step.Batch`).
The student's own detection loss must not read the others: with no boxes it would learn that
they hold only background. So a model runs twice on a mixed batch (:func:`split_forward`): on
the labelled images with their targets, which gives its loss, and on the unlabelled ones
without targets (or, with pseudo-labels, with the teacher's boxes as targets); the two outputs
are joined back in batch order for the distillation terms, which read every image.

Pseudo-labels (:func:`pseudo_labels`): the teacher's detections on an unlabelled image with a
score of at least ``score`` become hard targets. Neighbouring cells of a feature map often all
fire for one object; the feature-map NMS of Mehta & Ozay keeps, in every 3x3 neighbourhood of a
level, only the most confident cell (over all anchors) of each class (:func:`feature_map_nms`),
so one object gives one target per level; a class-wise NMS then merges the levels and teachers.

Reference: Mehta & Ozay, "Object detection at 200 Frames Per Second", ECCV Workshops 2018
(arXiv:1805.06361): distillation on unlabelled images and feature-map NMS.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from ..engine.step import Batch
from ..models import Detector
from ..structures import DetectorOutput, FeatureMap, HeadLevel, Targets
from .pairing import ltrb_in_strides


def extend(batch: Batch, images: Tensor, targets: Targets, indices: list[int]) -> Batch:
    """``batch`` with unlabelled ``images`` appended (``labelled`` false for them)."""
    device = batch.images.device
    return replace(batch, images=torch.cat([batch.images, images.to(device, non_blocking=True)]),
                   targets=list(batch.targets) + [{k: v.to(device) for k, v in t.items()} for t in targets],
                   indices=list(batch.indices) + list(indices),
                   labelled=torch.cat([batch.labelled, torch.zeros(len(images), dtype=torch.bool, device=device)]))


def labelled_part(batch: Batch) -> Batch:
    """The labelled images of ``batch``."""
    keep = batch.labelled.nonzero().flatten()
    return replace(batch, images=batch.images.index_select(0, keep), targets=[batch.targets[i] for i in keep.tolist()],
                   indices=[batch.indices[i] for i in keep.tolist()], labelled=batch.labelled[keep])


def rows(out: DetectorOutput, index: Tensor) -> DetectorOutput:
    """The images ``index`` of ``out`` (features and head maps), in that order."""
    def level(lv: HeadLevel) -> HeadLevel:
        return replace(lv, **{name: getattr(lv, name).index_select(0, index) for name in ("cls_logits", "box", "score", "box_dist")
                              if getattr(lv, name) is not None})

    return DetectorOutput({k: FeatureMap(f.tensor.index_select(0, index), f.stride) for k, f in out.features.items()},
                          [level(lv) for lv in out.head])


def joined(first: DetectorOutput, second: DetectorOutput) -> DetectorOutput:
    """The images of ``first`` then those of ``second``, as one output."""
    def level(a: HeadLevel, b: HeadLevel) -> HeadLevel:
        return replace(a, **{name: torch.cat([getattr(a, name), getattr(b, name)]) for name in ("cls_logits", "box", "score", "box_dist")
                             if getattr(a, name) is not None})

    return DetectorOutput({k: FeatureMap(torch.cat([f.tensor, second.features[k].tensor]), f.stride) for k, f in first.features.items()},
                          [level(a, b) for a, b in zip(first.head, second.head)])


def in_batch_order(labelled: Tensor, first: DetectorOutput, second: DetectorOutput) -> DetectorOutput:
    """Outputs on a batch's labelled images (``first``) and unlabelled ones (``second``) joined
    back into the batch's order."""
    both = joined(first, second)
    order = torch.cat([labelled.nonzero().flatten(), (~labelled).nonzero().flatten()])
    if torch.equal(order, torch.arange(len(order), device=order.device)):
        return both
    return rows(both, torch.argsort(order))


def split_forward(model: Detector, batch: Batch, *, unlabelled_targets: bool = False,
                  assign_from: list[HeadLevel] | None = None) -> tuple[DetectorOutput, DetectorOutput, DetectorOutput | None]:
    """``model`` on a mixed batch: ``(every image's output in batch order, the labelled images'
    output with their loss, the unlabelled images' output with a loss when unlabelled_targets)``.
    The unlabelled images get their targets (pseudo-labels) only with ``unlabelled_targets``."""
    flags = batch.labelled
    mine = flags.nonzero().flatten()
    theirs = (~flags).nonzero().flatten()

    def pick(index: Tensor, levels: list[HeadLevel] | None) -> list[HeadLevel] | None:
        return None if levels is None else rows(DetectorOutput({}, levels), index).head

    labelled_out = model(batch.images.index_select(0, mine), [batch.targets[i] for i in mine.tolist()], assign_from=pick(mine, assign_from))
    targets = [batch.targets[i] for i in theirs.tolist()] if unlabelled_targets else None
    unlabelled_out = model(batch.images.index_select(0, theirs), targets, assign_from=pick(theirs, assign_from) if targets else None)
    return in_batch_order(flags, labelled_out, unlabelled_out), labelled_out, unlabelled_out if targets is not None else None


def feature_map_nms(score: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """``bool [N, A, H, W]``: the cells that are the most confident of their class in their 3x3
    neighbourhood, over every anchor (ties kept). ``score`` ``[N, A, H, W]`` is each cell's best
    class score, ``label`` ``[N, A, H, W]`` that class."""
    n, a, h, w = score.shape
    per_class = score.new_zeros(n, a, num_classes, h, w).scatter_(2, label[:, :, None], score[:, :, None]).amax(1)  # [N, K, H, W]
    neighbourhood = F.max_pool2d(per_class, 3, stride=1, padding=1)
    return score >= neighbourhood.gather(1, label)


def detection_scores(level: HeadLevel, classes: list[int] | None) -> Tensor:
    """``[N, A, K, H, W]``: the score of every class ``classes`` (of the level's) at every cell,
    as the model's decoding scores its detections: class probability x objectness (YOLO), the
    square root of class probability x centerness (FCOS), the class probability (DFL)."""
    probs = level.cls_logits.sigmoid()
    if classes is not None:
        probs = probs[:, :, classes]
    if level.score is None:
        return probs
    if level.score_kind == "objectness":
        return probs * level.score.sigmoid()
    return (probs * level.score.sigmoid()).clamp_min(0).sqrt()


def pseudo_labels(head: list[HeadLevel], teacher_classes: list[int], student_classes: list[int], *, score: float,
                  input_size: tuple[int, int]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One teacher's detections on each image of ``head`` with a score of at least ``score``
    after the feature-map NMS: per image ``(boxes [M, 4] xyxy input pixels, scores [M], labels
    [M] in the student's classes)``. ``teacher_classes`` / ``student_classes``: the classes they
    share, in each model's list."""
    height, width = input_size
    out: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(head[0].cls_logits.shape[0])] if head else []
    lookup = torch.as_tensor(student_classes, device=head[0].cls_logits.device) if head else None
    for level in head:
        scores = detection_scores(level, teacher_classes)  # [N, A, K, H, W]
        best, label = scores.max(2)
        keep = feature_map_nms(best, label, scores.shape[2]) & (best >= score)
        ltrb = ltrb_in_strides(level)  # [N, A, 4, H, W], from each cell's corner, in strides
        rows_, cols = torch.meshgrid(torch.arange(ltrb.shape[-2], device=ltrb.device), torch.arange(ltrb.shape[-1], device=ltrb.device),
                                     indexing="ij")
        boxes = torch.stack([cols - ltrb[:, :, 0], rows_ - ltrb[:, :, 1], cols + ltrb[:, :, 2], rows_ + ltrb[:, :, 3]], 2) * level.stride
        for i in range(len(out)):
            mask = keep[i]
            found = boxes[i].permute(0, 2, 3, 1)[mask]  # [M, 4]
            out[i].append((found, best[i][mask], lookup[label[i][mask]]))
    result = []
    for parts in out:
        boxes = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, 4)
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height), boxes[:, 2].clamp(0, width),
                             boxes[:, 3].clamp(0, height)], 1)
        scores, labels = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        big = ((boxes[:, 2] - boxes[:, 0]) >= 2) & ((boxes[:, 3] - boxes[:, 1]) >= 2)
        result.append((boxes[big], scores[big], labels[big]))
    return result


def merge_pseudo_labels(per_teacher: list[list[tuple[Tensor, Tensor, Tensor]]], nms_iou: float, max_boxes: int = 300) -> Targets:
    """Every teacher's pseudo-labels of each image merged by a class-wise NMS at ``nms_iou``
    (the ``max_boxes`` best kept): targets ``{"boxes", "labels"}`` per image."""
    targets = []
    for parts in zip(*per_teacher):
        boxes, scores, labels = (torch.cat(items) for items in zip(*parts))
        kept = batched_nms(boxes.float(), scores.float(), labels, nms_iou)[:max_boxes]
        targets.append({"boxes": boxes[kept].float().detach(), "labels": labels[kept].long()})
    return targets


__all__ = ["extend", "feature_map_nms", "in_batch_order", "labelled_part", "merge_pseudo_labels", "pseudo_labels", "rows", "split_forward"]
