"""torchvision's FCOS behind kdet's detector interface.

kdet backbone (``c3..c5``) -> torchvision ``FeaturePyramidNetwork`` (``p3..p5``, plus ``p6``/``p7``
from ``LastLevelP6P7`` as in ``fcos_resnet50_fpn``) -> torchvision ``FCOSHead``. Target
assignment, the loss (sigmoid focal + GIoU + centerness BCE) and the decoding are torchvision's
own ``FCOS.compute_loss`` and ``FCOS.postprocess_detections``, called on a ``FCOS`` object that
shares this detector's modules. ``FCOS.forward`` is never called: it resizes images, normalises
them itself, and gives either losses or detections, never features and raw maps together.

Reference: Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019
(arXiv:1904.01355); torchvision ``models/detection/fcos.py``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..config import ModelConfig
from ..structures import Detections, DetectorOutput, FeatureMap, HeadLevel, Targets
from . import MODELS
from .backbones import Backbone
from .detector import Detector

# torchvision's FCOS head normalises with nn.GroupNorm(32, channels)
GROUP_NORM_GROUPS = 32

# torchvision's names for the three loss terms -> kdet's
LOSS_NAMES = {"classification": "cls", "bbox_regression": "box", "bbox_ctrness": "ctr"}


class BackboneWithFPN(nn.Module):
    """kdet backbone followed by the FPN, returning ``{"p3": ..., "p7": ...}``.

    Exists because torchvision's ``FCOS`` constructor wants a backbone that returns the pyramid
    and says its ``out_channels``; :class:`FCOSDetector` runs the two parts itself so that it can
    report the backbone stages too.
    """

    def __init__(self, body: Backbone, fpn: FeaturePyramidNetwork, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return pyramid_names(self.fpn(OrderedDict(self.body(x))))


def pyramid_names(levels: dict[str, Tensor]) -> dict[str, Tensor]:
    """The FPN keeps its input names (``c3..c5``) and appends ``p6``, ``p7``: call them all ``p*``."""
    return {f"p{3 + index}": tensor for index, tensor in enumerate(levels.values())}


class FCOSDetector(Detector):
    """FCOS with a kdet backbone, torchvision's FPN and head, loss and decoding.

    Head maps, one :class:`~kdet.structures.HeadLevel` per pyramid level (``A = 1``):

    * ``cls_logits`` ``[N, 1, C, H, W]``: class logits, one sigmoid per class, no background class;
    * ``box`` ``[N, 1, 4, H, W]``, ``box_format="ltrb"``: torchvision's ``bbox_regression`` (after
      its ReLU), i.e. ``BoxLinearCoder(normalize_by_size=True)`` codes: the distances
      ``(left, top, right, bottom)`` from the location's point to the box edges, divided by the
      anchor size, which equals the level's stride. The point of cell ``(row, col)`` is
      ``(col * stride, row * stride)`` in input pixels: torchvision puts FCOS points at cell
      corners, not at cell centres as the paper does. So
      ``x1 = col * stride - l * stride``, ``y1 = row * stride - t * stride``,
      ``x2 = col * stride + r * stride``, ``y2 = row * stride + b * stride``
      (:func:`decode_ltrb`);
    * ``score`` ``[N, 1, 1, H, W]``, ``score_kind="centerness"``: centerness logits.

    A detection's score is torchvision's ``sqrt(sigmoid(cls) * sigmoid(centerness))``; the score
    threshold applies to that.

    Losses (unweighted, torchvision sums them with equal weights, so ``loss`` is their sum):
    ``cls`` sigmoid focal loss over all locations, ``box`` GIoU loss and ``ctr`` centerness BCE
    over positive locations, each divided by the number of positive locations (at least 1).
    Targets are ``{"boxes": [M, 4] xyxy input pixels, "labels": int64 [M] in 0..C-1}``; images
    without boxes are allowed.
    """

    family = "fcos"

    def __init__(
        self,
        class_names: list[str],
        backbone: Backbone,
        *,
        fpn_channels: int = 64,
        extra_levels: bool = True,
        num_convs: int = 4,
        input_size: int = 320,
        center_sampling_radius: float = 1.5,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__(class_names)
        if fpn_channels % GROUP_NORM_GROUPS or fpn_channels < 2 * GROUP_NORM_GROUPS:
            # with one channel per group, GroupNorm raises on a 1x1 level (P7 of a 128 px
            # image) at batch size 1, e.g. in describe() or when measuring latency
            raise ValueError(
                f"model.fpn_channels is {fpn_channels}; FCOS needs a multiple of {GROUP_NORM_GROUPS} "
                f"and at least {2 * GROUP_NORM_GROUPS} (torchvision's FCOSHead uses GroupNorm with "
                f"{GROUP_NORM_GROUPS} groups). Try "
                f"{max(2 * GROUP_NORM_GROUPS, round(fpn_channels / GROUP_NORM_GROUPS) * GROUP_NORM_GROUPS)}."
            )
        self.backbone = backbone
        self.neck = FeaturePyramidNetwork(
            list(backbone.channels),
            fpn_channels,
            # P6 from P5 (in == out channels), as fcos_resnet50_fpn builds it
            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels) if extra_levels else None,
        )
        self.strides = list(backbone.strides) + ([64, 128] if extra_levels else [])
        # one square anchor per location with side = stride, as fcos_resnet50_fpn: torchvision
        # uses the anchor only for its centre (the point) and its size (scale ranges of 4x..8x
        # the size per level, the centre-sampling radius, and the box code's unit)
        self.anchor_generator = AnchorGenerator(tuple((s,) for s in self.strides), ((1.0,),) * len(self.strides))
        self.head = FCOSHead(fpn_channels, 1, self.num_classes, num_convs=num_convs)
        self.input_size = input_size
        # torchvision's FCOS, used for its compute_loss and postprocess_detections. It holds the
        # same module objects as this detector, and is kept out of the module tree (so the state
        # dict names every parameter once); its own transform is never used, hence mean 0, std 1.
        fcos = FCOS(
            BackboneWithFPN(self.backbone, self.neck, fpn_channels),
            self.num_classes,
            min_size=input_size,
            max_size=input_size,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            anchor_generator=self.anchor_generator,
            head=self.head,
            center_sampling_radius=center_sampling_radius,
            topk_candidates=topk_candidates,
        )
        self.__dict__["_torchvision_fcos"] = fcos

    @property
    def torchvision_fcos(self) -> FCOS:
        """The torchvision ``FCOS`` whose loss and decoding this detector calls."""
        return self.__dict__["_torchvision_fcos"]

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
        """One pass over ``images`` float ``[N, 3, H, W]`` in ``[0, 1]``.

        Returns features ``backbone.c3..c5`` and ``neck.p3..p7`` (``p3..p5`` without extra
        levels), head maps per level (see the class docstring), losses when ``targets`` are
        given, and with ``decode`` one :class:`Detections` per image (boxes in input pixels,
        clipped to the image; at most ``max_det`` after class-wise NMS at ``nms_iou``).
        ``assign_from`` must be ``None``: FCOS assigns by location and scale, not from predictions.
        """
        if assign_from is not None:
            raise ValueError("assign_from is for detectors that assign targets from predictions (yolo with head: dfl); "
                             "FCOS assigns by location and scale")
        stages = self.backbone(self.normalize(images))
        pyramid = pyramid_names(self.neck(OrderedDict(stages)))
        features = {f"backbone.{k}": FeatureMap(v, s) for (k, v), s in zip(stages.items(), self.backbone.strides)}
        features.update({f"neck.{k}": FeatureMap(v, s) for (k, v), s in zip(pyramid.items(), self.strides)})
        features_list = list(pyramid.values())

        head_outputs = self.head(features_list)  # cls_logits [N, HWA, C], bbox_regression [N, HWA, 4], bbox_ctrness [N, HWA, 1]
        num_anchors_per_level = [x.shape[-2] * x.shape[-1] for x in features_list]
        split = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        head = []
        for index, (name, x) in enumerate(pyramid.items()):
            height, width = x.shape[-2:]
            head.append(
                HeadLevel(
                    name=name,
                    stride=self.strides[index],
                    cls_logits=unflatten_level(split["cls_logits"][index], height, width),
                    box=unflatten_level(split["bbox_regression"][index], height, width),
                    score=unflatten_level(split["bbox_ctrness"][index], height, width),
                    score_kind="centerness",
                    box_format="ltrb",
                    anchors=None,
                )
            )
        output = DetectorOutput(features=features, head=head)

        if targets is None and not decode:
            return output
        anchors_per_level = self.anchors_per_level(features_list)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        if targets is not None:
            check_targets(targets, len(images), self.num_classes)
            anchors = [torch.cat(anchors_per_level)] * len(images)  # per image [HWA, 4]
            raw = self.torchvision_fcos.compute_loss(list(targets), head_outputs, anchors, num_anchors_per_level)
            output.losses = {LOSS_NAMES[k]: v for k, v in raw.items()}
            output.loss = sum(output.losses.values())
        if decode:
            fcos = self.torchvision_fcos
            fcos.score_thresh = score_thresh
            fcos.nms_thresh = nms_iou
            fcos.detections_per_img = max_det
            results = fcos.postprocess_detections(split, [anchors_per_level] * len(images), [image_size] * len(images))
            output.detections = [Detections(r["boxes"], r["scores"], r["labels"]) for r in results]
        return output

    def anchors_per_level(self, features_list: list[Tensor]) -> list[Tensor]:
        """torchvision's anchors ``[H*W, 4]`` per level, laid out at the true strides.

        ``AnchorGenerator.forward`` infers each stride as ``image size // grid size``, which is
        wrong whenever the input is not a multiple of the coarsest stride (320 px: P7 has a 3x3
        grid, torchvision would take a stride of 106 instead of 128). Its ``grid_anchors`` is
        given the strides the network really has instead; where the division is exact (inputs
        a multiple of 128, or of 32 without extra levels) the anchors are the same.
        """
        device = features_list[0].device
        grid_sizes = [list(x.shape[-2:]) for x in features_list]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.anchor_generator.set_cell_anchors(features_list[0].dtype, device)
        return self.anchor_generator.grid_anchors(grid_sizes, strides)


def unflatten_level(flat: Tensor, height: int, width: int) -> Tensor:
    """torchvision's per-level head output ``[N, H*W*A, K]`` (rows ordered H, W, A) ->
    kdet's ``[N, A, K, H, W]`` (a view, so gradients reach the head either way)."""
    n, hwa, k = flat.shape
    a = hwa // (height * width)
    return flat.view(n, height, width, a, k).permute(0, 3, 4, 1, 2)


def decode_ltrb(level: HeadLevel) -> tuple[Tensor, Tensor]:
    """Decode one FCOS level to boxes ``[N, H*W, 4]`` xyxy input pixels and class scores
    ``[N, H*W, C]`` = ``sqrt(sigmoid(cls) * sigmoid(centerness))``, as torchvision does."""
    n, a, _, h, w = level.box.shape
    device, dtype = level.box.device, level.box.dtype
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    points = torch.stack([xs, ys, xs, ys], 0).to(dtype) * level.stride  # [4, H, W]
    sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=device, dtype=dtype).view(4, 1, 1)
    boxes = points + sign * level.box * level.stride  # [N, A, 4, H, W]
    scores = torch.sqrt(level.cls_logits.sigmoid() * level.score.sigmoid())  # [N, A, C, H, W]
    flat = lambda t: t.permute(0, 3, 4, 1, 2).reshape(n, h * w * a, t.shape[2])  # noqa: E731
    return flat(boxes), flat(scores)


def check_targets(targets: Targets, num_images: int, num_classes: int) -> None:
    """Raise on targets torchvision's loss would silently misuse or fail on obscurely."""
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images; expected one dict per image")
    for index, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"target {index}: expected boxes as a tensor of shape [M, 4], got {shape}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            what = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"target {index}: expected labels as int64 of shape [{len(boxes)}], got {what}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"target {index}: labels must lie in 0..{num_classes - 1} (one per class name), "
                f"got values {labels.min().item()}..{labels.max().item()}"
            )
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(1)
        if degenerate.any():
            raise ValueError(
                f"target {index}: every box needs a positive width and height, found "
                f"{boxes[degenerate][0].tolist()} (xyxy); drop such boxes before the model"
            )


@MODELS.register("fcos")
def build_fcos(config: ModelConfig, class_names: list[str], input_size: int, *, num_convs: int = 4) -> FCOSDetector:
    """FCOS from ``config``: ``backbone``/``size``/``width``/``pretrained_backbone`` pick the
    backbone, ``fpn_channels`` and ``extra_levels`` shape the FPN; the head has ``num_convs``
    convolutions per branch (torchvision's 4 unless asked otherwise)."""
    if config.head != "anchor":
        raise ValueError(f"model.head: {config.head} is a head of the yolo family; FCOS has its own head "
                         f"(leave model.head out)")
    from . import backbone_from

    backbone = backbone_from(config, input_size)
    return FCOSDetector(
        class_names,
        backbone,
        fpn_channels=config.fpn_channels,
        extra_levels=config.extra_levels,
        num_convs=num_convs,
        input_size=input_size,
    )
