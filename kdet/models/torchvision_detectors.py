"""torchvision's RetinaNet and Faster R-CNN behind kdet's detector interface, on any kdet backbone.

As for FCOS (:mod:`kdet.models.fcos`), kdet runs the backbone, torchvision's FPN and the heads
itself, so one pass gives the named features and the raw per-level head maps, and calls
torchvision's own loss and decoding on a torchvision model object that shares the modules.

Both heads code boxes as torchvision's ``BoxCoder`` deltas ``(dx, dy, dw, dh)`` against anchor
boxes centred on the cell's corner point ``(col * stride, row * stride)``: ``HeadLevel.box_format``
``"deltas"``, with ``HeadLevel.anchors`` the ``[A, 2]`` anchor sizes of the level
(:func:`decode_deltas`).

* RetinaNet (``family: retinanet``): FPN ``p3..p7`` (``p6``/``p7`` from ``p5``), 9 anchors per
  location (3 sizes x 3 aspect ratios, sizes ``4 x stride x 2^(k/3)``), class logits for every
  anchor (sigmoid focal loss), no objectness. A one-stage detector: a teacher or a student.
* Faster R-CNN (``family: faster_rcnn``): FPN ``p3..p6`` (``p6`` a max-pool of ``p5``), a region
  proposal network (3 aspect ratios, size ``4 x stride`` per level) and RoI heads on ``p3..p5``.
  A two-stage detector: its class scores and boxes belong to proposals, not to locations, so its
  head maps are the RPN's: ``score`` the objectness logits (``score_kind="objectness"``),
  ``box`` the proposal deltas, and ``cls_logits`` with no class channel (``[N, A, 0, H, W]``).
  As a teacher it feeds feature terms and, through its RPN objectness, the terms that weight
  locations by the teacher's scores (``score_l2``); ``kdet check`` refuses the response terms.

References: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (RetinaNet); Ren et
al., "Faster R-CNN", NeurIPS 2015; Lin et al., "Feature Pyramid Networks", CVPR 2017;
torchvision ``models/detection/retinanet.py``, ``faster_rcnn.py``, ``rpn.py``, ``roi_heads.py``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..config import ModelConfig
from ..structures import Detections, DetectorOutput, FeatureMap, HeadLevel, Targets
from . import MODELS, backbone_from
from .backbones import Backbone
from .detector import Detector
from .fcos import BackboneWithFPN, check_targets, pyramid_names, unflatten_level

# torchvision's BoxCoder clamps dw, dh at log(1000 / 16) before exp()
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def level_anchor_sizes(generator: AnchorGenerator, index: int) -> Tensor:
    """``[A, 2]`` (w, h) in pixels of the anchors of level ``index``, in torchvision's order."""
    cell = generator.generate_anchors(generator.sizes[index], generator.aspect_ratios[index])  # [A, 4] around 0
    return cell[:, 2:] - cell[:, :2]


def anchors_at_strides(generator: AnchorGenerator, features_list: list[Tensor], strides: list[int]) -> list[Tensor]:
    """torchvision's anchors ``[H*W*A, 4]`` per level, laid out at the network's true strides
    (``AnchorGenerator.forward`` infers them as image size // grid size, wrong when the input is
    not a multiple of the coarsest stride; see :meth:`kdet.models.fcos.FCOSDetector.anchors_per_level`)."""
    device = features_list[0].device
    grid_sizes = [list(x.shape[-2:]) for x in features_list]
    stride_tensors = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in strides]
    generator.set_cell_anchors(features_list[0].dtype, device)
    return generator.grid_anchors(grid_sizes, stride_tensors)


def decode_deltas(level: HeadLevel) -> Tensor:
    """A ``"deltas"`` level's boxes as ``[N, A, 4, H, W]`` xyxy input pixels: torchvision's
    ``BoxCoder(weights=(1, 1, 1, 1)).decode`` against anchors of sizes ``level.anchors`` centred
    on each cell's corner point (``dw``, ``dh`` clamped at log(1000/16) as torchvision does)."""
    n, a, _, h, w = level.box.shape
    device, dtype = level.box.device, level.box.dtype
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype), indexing="ij")
    sizes = level.anchors.to(device=device, dtype=dtype).view(1, a, 2, 1, 1)
    anchor_w, anchor_h = sizes[:, :, 0:1], sizes[:, :, 1:2]
    dx, dy, dw, dh = level.box.split(1, dim=2)
    cx = dx * anchor_w + xs * level.stride
    cy = dy * anchor_h + ys * level.stride
    half_w = torch.exp(dw.clamp(max=BBOX_XFORM_CLIP)) * anchor_w / 2
    half_h = torch.exp(dh.clamp(max=BBOX_XFORM_CLIP)) * anchor_h / 2
    return torch.cat([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 2)


def deltas_to_ltrb(level: HeadLevel) -> Tensor:
    """``[N, A, 4, H, W]``: the decoded boxes as distances from each cell's corner point to the
    box edges, in strides (:func:`kdet.distill.pairing.ltrb_in_strides`)."""
    boxes = decode_deltas(level)
    h, w = level.grid_size
    ys, xs = torch.meshgrid(torch.arange(h, device=boxes.device, dtype=boxes.dtype),
                            torch.arange(w, device=boxes.device, dtype=boxes.dtype), indexing="ij")
    points = torch.stack([xs, ys, xs, ys]) * level.stride  # [4, H, W]
    sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device, dtype=boxes.dtype).view(4, 1, 1)
    return sign * (boxes - points) / level.stride


def retinanet_boxes_and_scores(level: HeadLevel) -> tuple[Tensor, Tensor]:
    """A RetinaNet level -> boxes ``[N, H*W*A, 4]`` xyxy input pixels and class probabilities
    ``[N, H*W*A, C]``, rows ordered as torchvision's (height, width, anchor)."""
    n, a, c, h, w = level.cls_logits.shape
    boxes = decode_deltas(level).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4)
    scores = level.cls_logits.sigmoid().permute(0, 3, 4, 1, 2).reshape(n, h * w * a, c)
    return boxes, scores


class RetinaNetDetector(Detector):
    """RetinaNet with a kdet backbone and torchvision's FPN, head, loss and decoding.

    Head maps per level (``A = 9``): ``cls_logits`` ``[N, A, C, H, W]`` (one sigmoid per class),
    ``box`` ``[N, A, 4, H, W]`` deltas (``box_format="deltas"``, ``anchors`` ``[A, 2]``), no score.
    Losses ``cls`` (sigmoid focal) and ``box`` (L1 on the deltas), each over the foreground
    anchors, summed. A detection's score is the class probability.
    """

    family = "retinanet"

    def __init__(self, class_names: list[str], backbone: Backbone, *, fpn_channels: int = 64, input_size: int = 320,
                 topk_candidates: int = 1000) -> None:
        super().__init__(class_names)
        self.backbone = backbone
        self.neck = FeaturePyramidNetwork(list(backbone.channels), fpn_channels,
                                          extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        self.strides = list(backbone.strides) + [64, 128]
        sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in self.strides)
        self.anchor_generator = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(self.strides))
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.head = RetinaNetHead(fpn_channels, num_anchors, self.num_classes)
        self.input_size = input_size
        retinanet = RetinaNet(BackboneWithFPN(self.backbone, self.neck, fpn_channels), self.num_classes, min_size=input_size,
                              max_size=input_size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                              anchor_generator=self.anchor_generator, head=self.head, topk_candidates=topk_candidates)
        self.__dict__["_torchvision_retinanet"] = retinanet  # shares the modules; kept out of the module tree

    @property
    def torchvision_retinanet(self) -> RetinaNet:
        return self.__dict__["_torchvision_retinanet"]

    def forward(self, images: Tensor, targets: Targets | None = None, *, decode: bool = False, score_thresh: float = 0.001,
                nms_iou: float = 0.6, max_det: int = 300, assign_from: list[HeadLevel] | None = None) -> DetectorOutput:
        """Features ``backbone.c3..c5`` and ``neck.p3..p7``, head maps per level (see the class
        docstring), losses with ``targets``, detections with ``decode`` (torchvision's
        ``postprocess_detections``: per level the ``topk_candidates`` best above ``score_thresh``,
        class-wise NMS at ``nms_iou``, at most ``max_det``)."""
        if assign_from is not None:
            raise ValueError("assign_from is for detectors that assign targets from predictions (yolo with head: dfl); "
                             "RetinaNet assigns by anchor IoU")
        stages = self.backbone(self.normalize(images))
        pyramid = pyramid_names(self.neck(OrderedDict(stages)))
        features = {f"backbone.{k}": FeatureMap(v, s) for (k, v), s in zip(stages.items(), self.backbone.strides)}
        features.update({f"neck.{k}": FeatureMap(v, s) for (k, v), s in zip(pyramid.items(), self.strides)})
        features_list = list(pyramid.values())
        head_outputs = self.head(features_list)  # cls_logits [N, HWA, C], bbox_regression [N, HWA, 4]
        per_level = [x.shape[-2] * x.shape[-1] * self.head.classification_head.num_anchors for x in features_list]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        head = []
        for index, (name, x) in enumerate(pyramid.items()):
            height, width = x.shape[-2:]
            head.append(HeadLevel(
                name=name, stride=self.strides[index],
                cls_logits=unflatten_level(split["cls_logits"][index], height, width),
                box=unflatten_level(split["bbox_regression"][index], height, width),
                box_format="deltas", anchors=level_anchor_sizes(self.anchor_generator, index).to(x.device),
            ))
        output = DetectorOutput(features=features, head=head)
        if targets is None and not decode:
            return output
        anchors_per_level = anchors_at_strides(self.anchor_generator, features_list, self.strides)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        retinanet = self.torchvision_retinanet
        if targets is not None:
            check_targets(targets, len(images), self.num_classes)
            anchors = [torch.cat(anchors_per_level)] * len(images)
            raw = retinanet.compute_loss(list(targets), head_outputs, anchors)
            output.losses = {"cls": raw["classification"], "box": raw["bbox_regression"]}
            output.loss = sum(output.losses.values())
        if decode:
            retinanet.score_thresh, retinanet.nms_thresh, retinanet.detections_per_img = score_thresh, nms_iou, max_det
            results = retinanet.postprocess_detections(split, [anchors_per_level] * len(images), [image_size] * len(images))
            output.detections = [Detections(r["boxes"], r["scores"], r["labels"]) for r in results]
        return output


class FasterRCNNDetector(Detector):
    """Faster R-CNN with a kdet backbone, torchvision's FPN, region proposal network, RoI heads,
    losses and decoding. A two-stage detector (:attr:`two_stage`): its head maps are the RPN's
    (see the module docstring).

    Losses: ``rpn_obj`` (objectness BCE) and ``rpn_box`` (smooth L1) on sampled anchors,
    ``cls`` (cross-entropy over the classes and background) and ``box`` (smooth L1) on sampled
    proposals; ``loss`` is their sum, as torchvision trains it. torchvision's class 0 is the
    background: kdet's class ``k`` is its ``k + 1``, mapped at the edges.
    """

    family = "faster_rcnn"
    two_stage = True

    def __init__(self, class_names: list[str], backbone: Backbone, *, fpn_channels: int = 64, input_size: int = 320,
                 representation: int = 1024) -> None:
        super().__init__(class_names)
        self.backbone = backbone
        self.neck = FeaturePyramidNetwork(list(backbone.channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.strides = list(backbone.strides) + [64]
        self.anchor_generator = AnchorGenerator(tuple((4 * s,) for s in self.strides), (ASPECT_RATIOS,) * len(self.strides))
        rpn_head = RPNHead(fpn_channels, self.anchor_generator.num_anchors_per_location()[0])
        self.rpn = RegionProposalNetwork(
            self.anchor_generator, rpn_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
            positive_fraction=0.5, pre_nms_top_n={"training": 2000, "testing": 1000},
            post_nms_top_n={"training": 2000, "testing": 1000}, nms_thresh=0.7)
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(["p3", "p4", "p5"], output_size=7, sampling_ratio=2),
            TwoMLPHead(fpn_channels * 7 * 7, representation), FastRCNNPredictor(representation, self.num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25, bbox_reg_weights=None,
            score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
        self.input_size = input_size

    def forward(self, images: Tensor, targets: Targets | None = None, *, decode: bool = False, score_thresh: float = 0.001,
                nms_iou: float = 0.6, max_det: int = 300, assign_from: list[HeadLevel] | None = None) -> DetectorOutput:
        """Features ``backbone.c3..c5`` and ``neck.p3..p6``, the RPN's maps per level, losses with
        ``targets`` (the RPN's and the RoI heads', on sampled anchors and proposals), detections
        with ``decode`` (torchvision's ``postprocess_detections`` of the proposals)."""
        if assign_from is not None:
            raise ValueError("assign_from is for detectors that assign targets from predictions (yolo with head: dfl); "
                             "Faster R-CNN assigns by IoU")
        stages = self.backbone(self.normalize(images))
        pyramid = pyramid_names(self.neck(OrderedDict(stages)))
        features = {f"backbone.{k}": FeatureMap(v, s) for (k, v), s in zip(stages.items(), self.backbone.strides)}
        features.update({f"neck.{k}": FeatureMap(v, s) for (k, v), s in zip(pyramid.items(), self.strides)})
        features_list = list(pyramid.values())
        objectness, deltas = self.rpn.head(features_list)  # per level [N, A, H, W], [N, A * 4, H, W]
        head = []
        for index, (name, obj) in enumerate(zip(pyramid, objectness)):
            n, a, h, w = obj.shape
            head.append(HeadLevel(
                name=name, stride=self.strides[index], cls_logits=obj.new_zeros(n, a, 0, h, w),
                box=deltas[index].view(n, a, 4, h, w), score=obj.view(n, a, 1, h, w), score_kind="objectness",
                box_format="deltas", anchors=level_anchor_sizes(self.anchor_generator, index).to(obj.device),
            ))
        output = DetectorOutput(features=features, head=head)
        if targets is None and not decode:
            return output
        image_sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * len(images)
        anchors_per_level = anchors_at_strides(self.anchor_generator, features_list, self.strides)
        anchors = [torch.cat(anchors_per_level)] * len(images)
        per_level = [o[0].numel() for o in objectness]
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.rpn.box_coder.decode(flat_deltas.detach(), anchors).view(len(images), -1, 4)
        boxes, _ = self.rpn.filter_proposals(proposals, flat_objectness, image_sizes, per_level)
        if targets is not None:
            check_targets(targets, len(images), self.num_classes)
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]  # torchvision: 0 is background
            labels, matched = self.rpn.assign_targets_to_anchors(anchors, shifted)
            rpn_obj, rpn_box = self.rpn.compute_loss(flat_objectness, flat_deltas, labels,
                                                     self.rpn.box_coder.encode(matched, anchors))
            sampled, _, roi_labels, roi_targets = self.roi_heads.select_training_samples(boxes, shifted)
            class_logits, box_regression = self.box_predictions(pyramid, sampled, image_sizes)
            cls, box = fastrcnn_loss(class_logits, box_regression, roi_labels, roi_targets)
            output.losses = {"rpn_obj": rpn_obj, "rpn_box": rpn_box, "cls": cls, "box": box}
            output.loss = sum(output.losses.values())
        if decode:
            class_logits, box_regression = self.box_predictions(pyramid, boxes, image_sizes)
            roi = self.roi_heads
            roi.score_thresh, roi.nms_thresh, roi.detections_per_img = score_thresh, nms_iou, max_det
            kept_boxes, scores, labels = roi.postprocess_detections(class_logits, box_regression, boxes, image_sizes)
            output.detections = [Detections(b, s, l - 1) for b, s, l in zip(kept_boxes, scores, labels)]
        return output

    def box_predictions(self, pyramid: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
                        ) -> tuple[Tensor, Tensor]:
        """Class logits ``[R, C + 1]`` and box deltas ``[R, 4 (C + 1)]`` of the proposals."""
        pooled = self.roi_heads.box_roi_pool(pyramid, proposals, image_sizes)
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))


def _check_head(config: ModelConfig, family: str) -> None:
    if config.head != "anchor":
        raise ValueError(f"model.head: {config.head} is a head of the yolo family; {family} has its own head (leave model.head out)")


@MODELS.register("retinanet")
def build_retinanet(config: ModelConfig, class_names: list[str], input_size: int) -> RetinaNetDetector:
    """RetinaNet from ``config``: the backbone keys pick the backbone, ``fpn_channels`` the width
    of the FPN and head."""
    _check_head(config, "retinanet")
    return RetinaNetDetector(class_names, backbone_from(config, input_size), fpn_channels=config.fpn_channels,
                             input_size=input_size)


@MODELS.register("faster_rcnn")
def build_faster_rcnn(config: ModelConfig, class_names: list[str], input_size: int) -> FasterRCNNDetector:
    """Faster R-CNN from ``config``: the backbone keys pick the backbone, ``fpn_channels`` the
    width of the FPN and RPN; the box head is torchvision's two 1024-wide layers."""
    _check_head(config, "faster_rcnn")
    return FasterRCNNDetector(class_names, backbone_from(config, input_size), fpn_channels=config.fpn_channels,
                              input_size=input_size)
