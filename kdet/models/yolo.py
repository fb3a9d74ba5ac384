"""The built-in YOLO-style one-stage detector: backbone -> PAN neck -> one of two heads:

* ``anchor`` (the default): anchor-based head with objectness, in the manner of YOLOv3/YOLOv5
  (the models the source documents distil);
* ``dfl``: anchor-free decoupled head in the manner of YOLOv8/YOLO11, boxes as per-edge
  distributions (Distribution Focal Loss), task-aligned assignment (:mod:`kdet.losses.dfl`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from ..losses.dfl import REG_MAX, DFLLoss, anchor_points, dfl_expectation, ltrb_to_xyxy
from ..losses.yolo import YOLOv5Loss, decode_cell_boxes
from ..structures import Detections, DetectorOutput, FeatureMap, HeadLevel, Targets
from .backbones import Backbone
from .detector import Detector
from .layers import ConvBNAct
from .necks import PAN

HEADS = ("anchor", "dfl")


class YOLOHead(nn.Module):
    """One 1x1 convolution per level giving ``A * (4 + 1 + C)`` channels."""

    def __init__(self, in_channels: list[int], num_anchors: int, num_classes: int, strides: list[int]) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_outputs = 5 + num_classes
        self.convs = nn.ModuleList(nn.Conv2d(c, num_anchors * self.num_outputs, 1) for c in in_channels)
        for conv, stride in zip(self.convs, strides):
            # start from a low objectness (about 8 objects per 640px image) and uniform classes,
            # so the first steps are not spent unlearning a 50% prior on every location
            bias = conv.bias.view(num_anchors, -1)
            with torch.no_grad():
                bias[:, 4] = math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] = math.log(0.6 / max(num_classes - 0.99, 0.01))

    def forward(self, x: Tensor, index: int) -> Tensor:
        out = self.convs[index](x)  # [N, A * (5 + C), H, W]
        n, _, h, w = out.shape
        return out.view(n, self.num_anchors, self.num_outputs, h, w)


class DFLHead(nn.Module):
    """Decoupled anchor-free head, YOLOv8's layout: per level a class branch (two 3x3
    conv-BN-SiLU, then a 1x1 conv to ``C`` logits) and a box branch (the same, to ``4 * R``
    logits: one distribution over ``R`` bins per box edge).

    Branch widths as YOLOv8: ``max(c3, min(C, 100))`` for classes and ``max(16, c3 / 4, 4R)``
    for boxes, ``c3`` the channels of the finest level. Biases start the class logits at a low
    prior (about 5 objects per class in a 640 px image) and the edge distributions uniform.

    Reference: Jocher et al., Ultralytics YOLOv8 (2023); Li et al., "Generalized Focal Loss",
    NeurIPS 2020.
    """

    def __init__(self, in_channels: list[int], num_classes: int, strides: list[int], reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.reg_max = reg_max
        cls_width = max(in_channels[0], min(num_classes, 100))
        box_width = max(16, in_channels[0] // 4, 4 * reg_max)

        def branch(c_in: int, width: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(ConvBNAct(c_in, width, 3), ConvBNAct(width, width, 3), nn.Conv2d(width, c_out, 1))

        self.cls_branches = nn.ModuleList(branch(c, cls_width, num_classes) for c in in_channels)
        self.box_branches = nn.ModuleList(branch(c, box_width, 4 * reg_max) for c in in_channels)
        with torch.no_grad():
            for cls_branch, box_branch, stride in zip(self.cls_branches, self.box_branches, strides):
                cls_branch[-1].bias.fill_(math.log(5 / max(num_classes, 1) / (640 / stride) ** 2))
                box_branch[-1].bias.fill_(1.0)

    def forward(self, x: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [N, c, H, W]`` -> class logits ``[N, 1, C, H, W]``, edge distribution logits
        ``[N, 1, 4, R, H, W]`` and their expectation ``[N, 1, 4, H, W]`` (strides)."""
        n, _, h, w = x.shape
        cls_logits = self.cls_branches[index](x).unsqueeze(1)
        box_dist = self.box_branches[index](x).view(n, 1, 4, self.reg_max, h, w)
        return cls_logits, box_dist, dfl_expectation(box_dist, dim=3)


class YOLODetector(Detector):
    """YOLO-style detector with an anchor-based (``head="anchor"``) or a DFL (``head="dfl"``) head.

    ``anchor`` head: ``anchors`` is ``[L][A][2]`` (w, h) in input pixels for strides 8/16/32.
    Head maps: ``box`` in YOLOv5's parameterisation (see :func:`kdet.losses.yolo.decode_cell_boxes`),
    ``score`` the objectness logit; loss :class:`~kdet.losses.yolo.YOLOv5Loss`.

    ``dfl`` head (:class:`DFLHead`; ``anchors`` is ignored): one location per cell
    (``A = 1``), ``cls_logits [N, 1, C, H, W]``, ``box_dist [N, 1, 4, R, H, W]`` the logits of
    each edge's distribution over ``R = 16`` bins, ``box [N, 1, 4, H, W]`` their expectation:
    distances (left, top, right, bottom) from the cell centre ``((col + 0.5) * s, (row + 0.5) * s)``
    to the box edges, in strides (``box_format="ltrb_center"``), ``score`` ``None``; a
    detection's score is the class probability. Loss :class:`~kdet.losses.dfl.DFLLoss`, whose
    task-aligned assignment can read another model's predictions (``assign_from``).
    """

    family = "yolo"

    def __init__(
        self,
        class_names: list[str],
        backbone: Backbone,
        anchors: list[list[list[float]]] | None,
        *,
        neck_size: str = "s",
        input_size: int = 320,
        loss: YOLOv5Loss | DFLLoss | None = None,
        head: str = "anchor",
        reg_max: int = REG_MAX,
    ) -> None:
        super().__init__(class_names)
        if head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head_kind = head
        self.backbone = backbone
        self.neck = PAN(backbone.channels, neck_size)
        self.strides = list(self.neck.strides)
        self.input_size = input_size
        if head == "dfl":
            self.head = DFLHead(self.neck.channels, self.num_classes, self.strides, reg_max)
            self.loss_fn = loss or DFLLoss(self.num_classes, reg_max=reg_max)
            return
        if anchors is None or len(anchors) != len(self.strides) or len({len(a) for a in anchors}) != 1:
            raise ValueError(
                f"model.anchors needs {len(self.strides)} levels with the same number of anchors each, got {anchors}"
            )
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # [L, A, 2]
        self.head = YOLOHead(self.neck.channels, len(anchors[0]), self.num_classes, self.strides)
        self.loss_fn = loss or YOLOv5Loss(self.num_classes)

    def forward(
        self,
        images: Tensor,
        targets: Targets | None = None,
        *,
        decode: bool = False,
        score_thresh: float = 0.001,
        nms_iou: float = 0.6,
        max_det: int = 300,
        assign_from: list[HeadLevel] | None = None,
    ) -> DetectorOutput:
        """One pass over ``images`` float ``[N, 3, H, W]`` in ``[0, 1]``: features
        ``backbone.c3..c5`` and ``neck.p3..p5``, head maps per level (see the class docstring),
        losses when ``targets`` are given, detections with ``decode``.

        ``assign_from`` (``dfl`` head only): head levels of another model, at this model's
        strides and grids and with its classes, whose class scores and decoded boxes the
        task-aligned assignment reads instead of this model's own (default ``None``: its own).
        """
        if assign_from is not None and self.head_kind != "dfl":
            raise ValueError("assign_from needs model.head: dfl; the anchor head assigns targets by anchor shape, "
                             "not from predictions")
        stages = self.backbone(self.normalize(images))
        pyramid = self.neck(stages)
        features = {f"backbone.{k}": FeatureMap(v, s) for (k, v), s in zip(stages.items(), self.backbone.strides)}
        features.update({f"neck.{k}": FeatureMap(v, s) for (k, v), s in zip(pyramid.items(), self.strides)})
        head = []
        for index, (name, x) in enumerate(pyramid.items()):
            if self.head_kind == "dfl":
                cls_logits, box_dist, ltrb = self.head(x, index)
                head.append(
                    HeadLevel(
                        name=name,
                        stride=self.strides[index],
                        cls_logits=cls_logits,
                        box=ltrb,
                        box_format="ltrb_center",
                        box_dist=box_dist,
                    )
                )
                continue
            raw = self.head(x, index)  # [N, A, 5 + C, H, W]
            head.append(
                HeadLevel(
                    name=name,
                    stride=self.strides[index],
                    cls_logits=raw[:, :, 5:],
                    box=raw[:, :, :4],
                    score=raw[:, :, 4:5],
                    score_kind="objectness",
                    box_format="yolov5",
                    anchors=self.anchors[index],
                )
            )
        output = DetectorOutput(features=features, head=head)
        if targets is not None:
            if assign_from is not None:
                losses = self.loss_fn(head, targets, assign_from=assign_from)
            else:
                losses = self.loss_fn(head, targets)
            weights = self.loss_fn.weights(len(head), max(images.shape[-2:]))
            output.losses = losses
            output.loss = sum(losses[k] * weights[k] for k in losses)
        if decode:
            output.detections = decode_yolo(
                head, tuple(images.shape[-2:]), score_thresh=score_thresh, nms_iou=nms_iou, max_det=max_det
            )
        return output


def level_boxes_and_scores(level: HeadLevel) -> tuple[Tensor, Tensor]:
    """Decode one level to boxes ``[N, A*H*W, 4]`` xyxy input pixels and class scores
    ``[N, A*H*W, C]``: objectness x class probability for the anchor head, the class
    probability for the DFL head."""
    if level.box_format == "ltrb_center":
        return dfl_boxes_and_scores(level)
    n, a, _, h, w = level.box.shape
    device = level.box.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    grid = torch.stack([xs, ys], -1).to(level.box.dtype)  # [H, W, 2]
    raw = level.box.permute(0, 1, 3, 4, 2)  # [N, A, H, W, 4]
    cell = decode_cell_boxes(raw, level.anchors.to(device).view(1, a, 1, 1, 2))  # size in pixels
    xy = (cell[..., :2] + grid) * level.stride
    wh = cell[..., 2:]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1).reshape(n, a * h * w, 4)
    scores = level.score.sigmoid() * level.cls_logits.sigmoid()  # [N, A, C, H, W]
    return boxes, scores.permute(0, 1, 3, 4, 2).reshape(n, a * h * w, scores.shape[2])


def dfl_boxes_and_scores(level: HeadLevel) -> tuple[Tensor, Tensor]:
    """A DFL level (``box_format="ltrb_center"``, ``A = 1``) -> boxes ``[N, H*W, 4]`` xyxy input
    pixels and class probabilities ``[N, H*W, C]``, locations row by row."""
    h, w = level.grid_size
    points = anchor_points(h, w, level.stride, device=level.box.device, dtype=level.box.dtype)  # [HW, 2]
    ltrb = level.box[:, 0].flatten(2).transpose(1, 2)  # [N, HW, 4]
    scores = level.cls_logits[:, 0].sigmoid().flatten(2).transpose(1, 2)  # [N, HW, C]
    return ltrb_to_xyxy(ltrb, points, level.stride), scores


def decode_yolo(
    head: list[HeadLevel], image_size: tuple[int, int], *, score_thresh: float, nms_iou: float, max_det: int
) -> list[Detections]:
    """Boxes of every level clipped to the ``(H, W)`` input, every class above ``score_thresh``
    (a box may carry several classes), class-wise NMS, at most ``max_det`` per image."""
    decoded = [level_boxes_and_scores(level) for level in head]
    boxes = clip_boxes_to_image(torch.cat([b for b, _ in decoded], 1), image_size)  # [N, K, 4]
    scores = torch.cat([s for _, s in decoded], 1)  # [N, K, C]
    return [select_detections(boxes[i], scores[i], score_thresh, nms_iou, max_det) for i in range(len(boxes))]


def select_detections(boxes: Tensor, scores: Tensor, score_thresh: float, nms_iou: float, max_det: int, pre_nms: int = 2000) -> Detections:
    """From ``boxes [K, 4]`` and class scores ``[K, C]``: threshold, keep the ``pre_nms`` best
    (box, class) pairs, class-wise NMS, keep ``max_det``."""
    box_index, label = (scores > score_thresh).nonzero(as_tuple=True)
    kept_scores = scores[box_index, label]
    if len(kept_scores) > pre_nms:
        kept_scores, order = kept_scores.topk(pre_nms)
        box_index, label = box_index[order], label[order]
    kept_boxes = boxes[box_index].float()
    keep = batched_nms(kept_boxes, kept_scores.float(), label, nms_iou)[:max_det]
    return Detections(kept_boxes[keep], kept_scores[keep].float(), label[keep])
