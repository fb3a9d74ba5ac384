"""YOLOv5's detection loss: CIoU box loss, objectness BCE against the IoU, class BCE.

Reference: Jocher et al., Ultralytics YOLOv5 (2020), ``utils/loss.py``; target assignment by
anchor shape ratio with the two neighbouring cells nearest the box centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, complete_box_iou_loss

from ..structures import HeadLevel, Targets

# smallest predicted width/height the box loss sees, in grid units: large enough that y2 - y1
# stays positive in float32 for centres up to 1.5 cells from the corner
MIN_BOX_SIZE = 1e-4

# the cell itself, then the neighbour to the left, above, right, below
_NEIGHBOUR_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5


@dataclass
class LevelAssignment:
    """Positive locations of one level: image, anchor, row, column; the box target ``[n, 4]``
    (centre relative to the cell, size, in grid units), the anchors ``[n, 2]`` in grid units,
    and the class ``[n]``."""

    image: Tensor
    anchor: Tensor
    row: Tensor
    col: Tensor
    box: Tensor
    anchor_wh: Tensor
    label: Tensor
    target: Tensor  # [n] row of the matched target in the flattened targets


def targets_to_tensor(targets: Targets, device: torch.device) -> Tensor:
    """Per-image dicts -> ``[T, 6]``: image index, class, cx, cy, w, h (pixels)."""
    rows = []
    for index, target in enumerate(targets):
        boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = target["labels"].to(device=device, dtype=torch.float32).reshape(-1, 1)
        image = torch.full_like(labels, float(index))
        rows.append(torch.cat([image, labels, box_convert(boxes, "xyxy", "cxcywh")], 1))
    return torch.cat(rows) if rows else torch.zeros((0, 6), device=device)


def assign_targets(level: HeadLevel, targets: Tensor, anchor_threshold: float) -> LevelAssignment:
    """Match targets ``[T, 6]`` to the anchors of ``level`` whose shape is within
    ``anchor_threshold`` (ratio of widths and of heights), at the centre cell and its two
    nearest neighbours."""
    height, width = level.grid_size
    anchors = level.anchors.to(targets.device) / level.stride  # [A, 2] grid units
    scaled = targets.clone()
    scaled[:, 2:] /= level.stride
    ratio = scaled[None, :, 4:6] / anchors[:, None]  # [A, T, 2]
    keep = torch.maximum(ratio, 1 / ratio).amax(2) < anchor_threshold  # [A, T]
    anchor_index, target_index = keep.nonzero(as_tuple=True)
    matched = scaled[target_index]  # [n, 6]
    target_index = target_index[None].expand(5, -1)
    centre = matched[:, 2:4]
    centre_from_far_edge = torch.tensor([width, height], device=targets.device) - centre
    near_low = (centre % 1 < 0.5) & (centre > 1)  # [n, 2]: left (x), above (y)
    near_high = (centre_from_far_edge % 1 < 0.5) & (centre_from_far_edge > 1)  # right, below
    use = torch.stack(
        [torch.ones_like(near_low[:, 0]), near_low[:, 0], near_low[:, 1], near_high[:, 0], near_high[:, 1]]
    )  # [5, n]
    offsets = _NEIGHBOUR_OFFSETS.to(targets.device)[:, None].expand(5, len(matched), 2)[use]
    matched = matched[None].expand(5, -1, -1)[use]
    anchor_index = anchor_index[None].expand(5, -1)[use]
    target_index = target_index[use]
    cell = (matched[:, 2:4] - offsets).long()
    col = cell[:, 0].clamp(0, width - 1)
    row = cell[:, 1].clamp(0, height - 1)
    box = torch.cat([matched[:, 2:4] - torch.stack([col, row], 1), matched[:, 4:6]], 1)
    return LevelAssignment(
        image=matched[:, 0].long(),
        anchor=anchor_index,
        row=row,
        col=col,
        box=box,
        anchor_wh=anchors[anchor_index],
        label=matched[:, 1].long(),
        target=target_index,
    )


def decode_cell_boxes(raw: Tensor, anchor_wh: Tensor) -> Tensor:
    """YOLOv5 parameterisation: raw ``[..., 4]`` -> ``cx, cy`` relative to the cell and ``w, h``
    in the units of ``anchor_wh`` (broadcast against ``[..., 2]``). Centre in ``(-0.5, 1.5)``,
    size in ``(0, 4)`` anchors. Shared by the loss and the decoder."""
    xy = raw[..., :2].sigmoid() * 2 - 0.5
    wh = (raw[..., 2:].sigmoid() * 2) ** 2 * anchor_wh
    return torch.cat([xy, wh], -1)


class YOLOv5Loss:
    """Unweighted loss terms ``box``, ``obj`` and ``cls``, and the weights YOLOv5 applies.

    Weights follow YOLOv5's scaling with the number of classes, levels and input size:
    ``box * 3/L``, ``obj * (size/640)^2 * 3/L``, ``cls * C/80 * 3/L``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        box_weight: float = 0.05,
        obj_weight: float = 1.0,
        cls_weight: float = 0.5,
        anchor_threshold: float = 4.0,
        level_balance: tuple[float, ...] = (4.0, 1.0, 0.4),
        label_smoothing: float = 0.0,
    ) -> None:
        self.num_classes = num_classes
        self.base_weights = {"box": box_weight, "obj": obj_weight, "cls": cls_weight}
        self.anchor_threshold = anchor_threshold
        self.level_balance = level_balance
        self.label_smoothing = label_smoothing

    def weights(self, num_levels: int, input_size: int) -> dict[str, float]:
        per_level = 3.0 / num_levels
        return {
            "box": self.base_weights["box"] * per_level,
            "obj": self.base_weights["obj"] * (input_size / 640) ** 2 * per_level,
            "cls": self.base_weights["cls"] * self.num_classes / 80 * per_level,
        }

    def assign(self, head: list[HeadLevel], targets: Targets) -> list[Tensor]:
        """Per level int64 ``[N, A, H, W]``: which object of its image each location is a positive
        for (the index into that image's targets), -1 for background. Where several objects land on
        one location, the last one matched is kept."""
        device = head[0].cls_logits.device
        flat_targets = targets_to_tensor(targets, device)
        counts = torch.tensor([len(t["labels"]) for t in targets], device=device)
        first_row = torch.cumsum(counts, 0) - counts  # row of each image's first target in flat_targets
        maps = []
        for level in head:
            n, a = level.cls_logits.shape[:2]
            owner = torch.full((n, a, *level.grid_size), -1, dtype=torch.long, device=device)
            match = assign_targets(level, flat_targets, self.anchor_threshold)
            if len(match.image):
                owner[match.image, match.anchor, match.row, match.col] = match.target - first_row[match.image]
            maps.append(owner)
        return maps

    def __call__(self, head: list[HeadLevel], targets: Targets) -> dict[str, Tensor]:
        device = head[0].cls_logits.device
        flat_targets = targets_to_tensor(targets, device)
        zero = head[0].cls_logits.sum() * 0  # keeps the graph when there are no positives
        losses = {"box": zero, "obj": zero, "cls": zero}
        positive_value, negative_value = 1.0 - 0.5 * self.label_smoothing, 0.5 * self.label_smoothing
        for index, level in enumerate(head):
            objectness = level.score[:, :, 0]  # [N, A, H, W] logits
            target_obj = torch.zeros_like(objectness, memory_format=torch.contiguous_format)  # viewed flat below
            match = assign_targets(level, flat_targets, self.anchor_threshold)
            if len(match.image):
                raw_box = level.box[match.image, match.anchor, :, match.row, match.col]  # [n, 4]
                predicted = decode_cell_boxes(raw_box, match.anchor_wh)
                # a saturated size logit gives a width or height of exactly 0, and the CIoU's
                # aspect term (atan(w / h)) a NaN gradient (YOLOv5 adds an epsilon there for the same reason)
                predicted = torch.cat([predicted[:, :2], predicted[:, 2:].clamp_min(MIN_BOX_SIZE)], 1)
                ciou_loss = complete_box_iou_loss(
                    box_convert(predicted, "cxcywh", "xyxy"), box_convert(match.box, "cxcywh", "xyxy"), reduction="none"
                )
                losses["box"] = losses["box"] + ciou_loss.mean()
                # objectness target is the IoU of the prediction it supervises; where several
                # targets land on one location, the best one counts
                iou = (1 - ciou_loss).detach().clamp(min=0).to(target_obj.dtype)
                flat_index = ((match.image * level.num_anchors + match.anchor) * level.grid_size[0] + match.row) * level.grid_size[1] + match.col
                target_obj.view(-1).scatter_reduce_(0, flat_index, iou, reduce="amax")
                logits = level.cls_logits[match.image, match.anchor, :, match.row, match.col]  # [n, C]
                target_cls = torch.full_like(logits, negative_value)
                target_cls[torch.arange(len(logits), device=device), match.label] = positive_value
                losses["cls"] = losses["cls"] + F.binary_cross_entropy_with_logits(logits, target_cls)
            balance = self.level_balance[index] if index < len(self.level_balance) else 1.0
            losses["obj"] = losses["obj"] + F.binary_cross_entropy_with_logits(objectness, target_obj) * balance
        return losses
