"""The built-in YOLO-style one-stage detector: backbone -> PAN neck -> anchor-based head with
objectness, in the manner of YOLOv3/YOLOv5 (the models the source documents distil)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from ..losses.yolo import YOLOv5Loss, decode_cell_boxes
from ..structures import Detections, DetectorOutput, FeatureMap, HeadLevel, Targets
from .backbones import Backbone
from .detector import Detector
from .necks import PAN


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


class YOLODetector(Detector):
    """YOLOv5-style detector.

    ``anchors`` is ``[L][A][2]`` (w, h) in input pixels for strides 8/16/32.
    Head maps: ``box`` in YOLOv5's parameterisation (see :func:`kdet.losses.yolo.decode_cell_boxes`),
    ``score`` the objectness logit.
    """

    family = "yolo"

    def __init__(
        self,
        class_names: list[str],
        backbone: Backbone,
        anchors: list[list[list[float]]],
        *,
        neck_size: str = "s",
        input_size: int = 320,
        loss: YOLOv5Loss | None = None,
    ) -> None:
        super().__init__(class_names)
        self.backbone = backbone
        self.neck = PAN(backbone.channels, neck_size)
        self.strides = list(self.neck.strides)
        if len(anchors) != len(self.strides) or len({len(a) for a in anchors}) != 1:
            raise ValueError(
                f"model.anchors needs {len(self.strides)} levels with the same number of anchors each, got {anchors}"
            )
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # [L, A, 2]
        self.head = YOLOHead(self.neck.channels, len(anchors[0]), self.num_classes, self.strides)
        self.input_size = input_size
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
    ) -> DetectorOutput:
        stages = self.backbone(self.normalize(images))
        pyramid = self.neck(stages)
        features = {f"backbone.{k}": FeatureMap(v, s) for (k, v), s in zip(stages.items(), self.backbone.strides)}
        features.update({f"neck.{k}": FeatureMap(v, s) for (k, v), s in zip(pyramid.items(), self.strides)})
        head = []
        for index, (name, x) in enumerate(pyramid.items()):
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
    ``[N, A*H*W, C]`` (objectness x class probability)."""
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
