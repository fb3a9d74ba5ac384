"""The one interface every kdet detector has, whatever its family.

A detector's ``forward`` returns a :class:`~kdet.structures.DetectorOutput` holding, from ONE
pass: named intermediate features with their strides, the raw per-level head maps, the
detector's own losses when targets are given, and decoded detections when asked for. That is
what the distiller reads; no hook or second pass is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..structures import DetectorOutput, HeadLevel, Targets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LevelSpec:
    """What one head level looks like at a given input size (for pairing teacher and student)."""

    name: str
    stride: int
    grid: tuple[int, int]
    channels: int  # channels of the feature map feeding this level
    num_anchors: int
    num_classes: int
    score_kind: str | None
    anchors: tuple[tuple[float, float], ...] | None
    box_format: str = ""  # HeadLevel.box_format: "yolov5" | "ltrb" | "ltrb_center"
    box_bins: int | None = None  # bins of each box edge's distribution (DFL heads), else None


@dataclass(frozen=True)
class ModelSpec:
    family: str
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    features: dict[str, tuple[int, int, tuple[int, int]]]  # name -> (channels, stride, (H, W))
    levels: tuple[LevelSpec, ...]
    assigns: bool = False  # whether the detector exposes its target assignment (:meth:`Detector.assign`)
    two_stage: bool = False  # head maps are a region proposal network's (no per-location classes): Detector.two_stage


class Detector(nn.Module):
    """Base class. Subclasses implement :meth:`forward` and set ``family``.

    Images come in as float ``[N, 3, H, W]`` in ``[0, 1]``; normalisation is done here so a
    checkpoint carries it.
    """

    family: str = ""
    two_stage: bool = False  # its classes and boxes are per proposal; its head maps are the RPN's (no class channel)

    def __init__(self, class_names: list[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Use another input normalisation than ImageNet's (a backbone trained with its own)."""
        self.pixel_mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        self.pixel_std.copy_(torch.tensor(std).view(1, 3, 1, 1))

    def normalize(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        return (images - self.pixel_mean) / self.pixel_std

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
        """``assign_from``: head levels of another model whose predictions the target
        assignment reads instead of this model's (detectors whose assignment reads predictions:
        the YOLO DFL head); ``None``, the default, assigns from the model's own predictions."""
        raise NotImplementedError

    @property
    def assigns(self) -> bool:
        """Whether :meth:`assign` is available: the detector's loss exposes its assignment."""
        return callable(getattr(getattr(self, "loss_fn", None), "assign", None))

    def assign(self, head: list, targets: Targets) -> list[Tensor]:
        """The detector's own assignment of ``targets`` to the locations of ``head``: per level
        int64 ``[N, A, H, W]``, the index (within its image's targets) of the object a location
        is a positive for, -1 for background. Raises ``NotImplementedError`` when the detector's
        loss does not expose it (:attr:`assigns`)."""
        if not self.assigns:
            raise NotImplementedError(f"the {self.family} detector does not expose its target assignment")
        return self.loss_fn.assign(head, targets)

    @torch.no_grad()
    def describe(self, input_size: tuple[int, int]) -> ModelSpec:
        """Shapes of every feature and head level at ``input_size`` (H, W), from a probe pass."""
        was_training = self.training
        self.eval()
        try:
            probe = torch.zeros(1, 3, *input_size, device=next(self.parameters()).device)
            out = self(probe)
        finally:
            self.train(was_training)
        features = {
            name: (fm.channels, fm.stride, tuple(fm.tensor.shape[-2:])) for name, fm in out.features.items()
        }
        head_inputs = [name for name in out.features if name.startswith("neck.")]
        levels = []
        for index, level in enumerate(out.head):
            source = out.features[head_inputs[index]] if index < len(head_inputs) else None
            levels.append(
                LevelSpec(
                    name=level.name,
                    stride=level.stride,
                    grid=level.grid_size,
                    channels=source.channels if source is not None else 0,
                    num_anchors=level.num_anchors,
                    num_classes=level.num_classes,
                    score_kind=level.score_kind,
                    anchors=None if level.anchors is None else tuple(map(tuple, level.anchors.tolist())),
                    box_format=level.box_format,
                    box_bins=None if level.box_dist is None else int(level.box_dist.shape[3]),
                )
            )
        return ModelSpec(self.family, tuple(input_size), tuple(self.class_names), features, tuple(levels), self.assigns,
                         self.two_stage)
