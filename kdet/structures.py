"""The few types shared across kdet.

Conventions used everywhere inside the library:

* boxes are ``xyxy`` in absolute pixels of the image they refer to;
* class ids index one ``class_names`` list owned by the dataset (and copied into every model);
* images enter a detector as float tensors in ``[0, 1]``, shape ``[N, 3, H, W]``, all of one size;
  normalisation (mean/std) happens inside the model, so a checkpoint carries its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


# ---------------------------------------------------------------------------------------------
# Data records: what every reader (VOC, COCO, YOLO) produces.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input data, and what kdet did about it.

    ``kind`` is a short stable identifier (``zero_size_box``, ``unknown_class`` ...), ``message``
    a sentence for people, ``action`` what kdet did (``"box dropped"``, ``"image skipped"`` ...).
    ``line`` is a 1-based line in ``file`` (YOLO label files) or a position such as the index of a
    JSON annotation, when one exists.
    """

    file: str
    kind: str
    message: str
    action: str = ""
    line: int | None = None

    def to_dict(self) -> dict:
        out = {"file": self.file, "kind": self.kind, "message": self.message, "action": self.action}
        if self.line is not None:
            out["line"] = self.line
        return out


@dataclass
class ImageRecord:
    """One annotated image in the internal form.

    ``boxes``: float32 ``[M, 4]`` xyxy in absolute pixels of the original image, already clipped.
    ``labels``: int64 ``[M]`` into the dataset's ``class_names``.
    ``difficult``: bool ``[M]`` (VOC's flag; excluded from VOC mAP, kept for training).
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(
                f"{self.path}: {len(self.boxes)} boxes, {len(self.labels)} labels and "
                f"{len(self.difficult)} difficult flags; expected the same number of each"
            )


@dataclass
class DatasetIndex:
    """A whole dataset read into the internal form.

    ``splits`` maps split names (``train``, ``val``, ``test`` ...) to records; ``split_source``
    says where the split came from (``"dataset"`` when the dataset defines it, ``"seeded"`` when
    kdet made it). ``problems`` holds everything the reader found wrong, nothing left out.
    ``lost_splits`` maps each split the dataset names but that has no usable image (an
    unreadable annotation file, every image skipped...) to why; such a split is not in
    ``splits``. ``withheld`` maps a split whose labels a run uses only in part
    (``data.labelled_fraction``) to the records it leaves out; that split in ``splits`` holds
    the ones it keeps.
    """

    root: Path
    format: str
    class_names: list[str]
    splits: dict[str, list[ImageRecord]]
    problems: list[Problem] = field(default_factory=list)
    split_source: str = "dataset"
    lost_splits: dict[str, str] = field(default_factory=dict)
    withheld: dict[str, list[ImageRecord]] = field(default_factory=dict)

    def missing_split_message(self, name: str) -> str:
        """Why ``name`` is not a split of this dataset, and what it has instead."""
        if name in self.lost_splits:
            return (f"dataset {self.root}: split {name!r} is lost: {self.lost_splits[name]}. Fix that (`kdet data check "
                    f"{self.root}` lists every problem), or use another split; it has {sorted(self.splits)}")
        return f"dataset {self.root} has no split {name!r}; it has {sorted(self.splits)}"

    def split(self, name: str) -> list[ImageRecord]:
        if name not in self.splits:
            raise KeyError(f"{self.missing_split_message(name)}. Set data.*_split in the config to one of those.")
        return self.splits[name]

    def all_records(self) -> list[ImageRecord]:
        seen: dict[str, ImageRecord] = {}
        for records in self.splits.values():
            for record in records:
                seen.setdefault(record.image_id, record)
        return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Model outputs: what every detector returns from one forward pass.
# ---------------------------------------------------------------------------------------------
@dataclass
class FeatureMap:
    """A named intermediate feature map: ``tensor`` is ``[N, C, H, W]`` at ``stride`` pixels."""

    tensor: Tensor
    stride: int

    @property
    def channels(self) -> int:
        return int(self.tensor.shape[1])


@dataclass
class HeadLevel:
    """Raw head maps of one pyramid level, before any decoding.

    ``cls_logits``: ``[N, A, C, H, W]``; ``box``: ``[N, A, 4, H, W]`` in the head's own
    parameterisation (``box_format``); ``score``: ``[N, A, 1, H, W]`` logits of the head's
    objectness (YOLO anchor head) or quality/centerness (FCOS) branch, ``None`` when the head
    has none (YOLO DFL head). ``A`` is the number of anchors per location (1 for anchor-free
    heads). ``box_dist``: ``[N, A, 4, R, H, W]`` logits of each box edge's distribution over
    ``R`` bins, for heads that predict one (DFL), else ``None``; ``box`` is then its expectation.

    ``box_format``, for a location at row ``row``, column ``col`` of a level of stride ``s``:

    * ``"yolov5"``: YOLOv5's centre/size code relative to the cell and the anchor
      (:func:`kdet.losses.yolo.decode_cell_boxes`);
    * ``"ltrb"``: distances (left, top, right, bottom) from the cell's corner point
      ``(col * s, row * s)`` to the box edges, in units of ``s`` (torchvision's FCOS);
    * ``"ltrb_center"``: the same distances from the cell's centre point
      ``((col + 0.5) * s, (row + 0.5) * s)`` (YOLOv8-style DFL head, as Ultralytics places its
      anchor points);
    * ``"deltas"``: torchvision ``BoxCoder`` deltas ``(dx, dy, dw, dh)`` against the anchor boxes
      of sizes ``anchors`` centred on the cell's corner point ``(col * s, row * s)`` (RetinaNet,
      the region proposal network of Faster R-CNN; :func:`kdet.models.torchvision_detectors.decode_deltas`).

    A two-stage detector's levels are its region proposal network's: ``cls_logits`` has no class
    channel (``C = 0``), ``score`` is the class-agnostic objectness.
    """

    name: str
    stride: int
    cls_logits: Tensor
    box: Tensor
    score: Tensor | None = None
    score_kind: str | None = None  # "objectness" | "centerness"
    box_format: str = ""  # "yolov5" | "ltrb" | "ltrb_center" | "deltas"
    anchors: Tensor | None = None  # [A, 2] anchor (w, h) in pixels, anchor-based heads only
    box_dist: Tensor | None = None  # [N, A, 4, R, H, W] edge distribution logits, DFL heads only

    @property
    def num_anchors(self) -> int:
        return int(self.cls_logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.cls_logits.shape[2])

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.cls_logits.shape[-2]), int(self.cls_logits.shape[-1])


@dataclass
class Detections:
    """Decoded detections of one image: ``boxes`` ``[K, 4]`` xyxy pixels of the model input,
    ``scores`` ``[K]``, ``labels`` ``[K]`` int64."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "Detections":
        return Detections(
            torch.zeros((0, 4), device=device),
            torch.zeros((0,), device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
        )


@dataclass
class DetectorOutput:
    """Everything one forward pass of a kdet detector gives.

    ``features``: named feature maps (``backbone.c3`` ... , ``neck.p3`` ...), each with its stride.
    ``head``: raw head maps per level, in pyramid order (finest first).
    ``losses``: the detector's own unweighted loss terms when targets were given, else ``None``;
    ``loss`` is their weighted sum (what the detector trains on).
    ``detections``: one :class:`Detections` per image when decoding was asked for, else ``None``.
    """

    features: dict[str, FeatureMap]
    head: list[HeadLevel]
    losses: dict[str, Tensor] | None = None
    loss: Tensor | None = None
    detections: list[Detections] | None = None


Targets = list[dict[str, Tensor]]
"""Per image: ``{"boxes": float [M, 4] xyxy pixels of the model input, "labels": int64 [M]}``."""
