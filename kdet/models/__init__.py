"""Detectors: the built-in YOLO family and torchvision's FCOS, RetinaNet and Faster R-CNN, behind one interface."""
from __future__ import annotations

from typing import Callable

from ..config import ModelConfig
from ..losses.dfl import DFLLoss
from ..losses.yolo import YOLOv5Loss
from ..registry import Registry
from .anchors import DEFAULT_ANCHORS
from .backbones import BACKBONES, Backbone, build_backbone
from .detector import Detector, LevelSpec, ModelSpec
from .yolo import YOLODetector

MODELS: Registry[Callable[..., Detector]] = Registry("model family")


@MODELS.register("yolo")
def build_yolo(config: ModelConfig, class_names: list[str], input_size: int) -> YOLODetector:
    """The built-in YOLO: ``model.head`` anchor (anchors and the ``*_weight`` keys apply) or dfl
    (anchor-free; anchors are ignored, the loss weights are YOLOv8's, see :class:`DFLLoss`)."""
    backbone = backbone_from(config, input_size)
    if config.head == "dfl":
        return YOLODetector(class_names, backbone, None, neck_size=config.size, input_size=input_size, head="dfl")
    if config.anchors == "auto":
        raise ValueError("model.anchors is 'auto': resolve it from the training data before building (kdet.engine does)")
    anchors = DEFAULT_ANCHORS if config.anchors == "default" else config.anchors
    loss = YOLOv5Loss(
        len(class_names), box_weight=config.box_weight, obj_weight=config.obj_weight, cls_weight=config.cls_weight
    )
    return YOLODetector(class_names, backbone, anchors, neck_size=config.size, input_size=input_size, loss=loss)


def backbone_from(config: ModelConfig, input_size: int) -> Backbone:
    """The backbone ``config`` names, with its local weights (``pretrained_backbone``) if set."""
    return build_backbone(config.backbone, size=config.size, width=config.width, pretrained=config.pretrained_backbone,
                          allow_partial=config.partial_weights, input_size=input_size, args=config.backbone_args)


def build_model(config: ModelConfig, class_names: list[str], input_size: int) -> Detector:
    """Build an untrained detector (backbone weights from ``config.pretrained_backbone`` if set)."""
    if config.backbone not in BACKBONES and not config.backbone.startswith("timm:"):
        BACKBONES.get(config.backbone)  # raises with the valid names
    model = MODELS.get(config.family)(config, class_names, input_size)
    if config.channels:  # a pruned model: its channel plan
        from .prune import apply_channel_plan

        apply_channel_plan(model, config.channels)
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "image_mean"):  # a timm network normalises its input its own way
        model.set_normalization(backbone.image_mean, backbone.image_std)
    return model


# families defined in their own modules register themselves on import
from . import fcos, torchvision_detectors, ultralytics  # noqa: E402,F401

__all__ = ["MODELS", "Detector", "LevelSpec", "ModelSpec", "YOLODetector", "build_model"]
