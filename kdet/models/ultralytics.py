"""Ultralytics YOLO detect models (v8, 11, 26) behind kdet's detector interface:
``model.family: ultralytics`` with ``model.config: yolo11n.yaml`` (built from its yaml, never
downloaded) or ``model.weights: best.pt`` (an Ultralytics checkpoint).

One pass runs the network's layers, so kdet reads:

* features: the backbone's last layer of stride 8, 16 and 32 (``backbone.c3..c5``) and the
  inputs of the Detect head (``neck.p3..p5``);
* head maps per level (``A = 1``): the Detect head's class logits, and its box branch as kdet's
  DFL head gives it: ``box_dist`` the logits of each edge's distribution over ``reg_max`` bins
  and ``box`` their expectation (v8, 11), or the box distances themselves (YOLO26's DFL-free
  head, ``reg_max = 1``), distances from the cell centre in strides (``box_format="ltrb_center"``,
  as Ultralytics places its anchor points). For end-to-end heads (YOLO26) these are the
  one-to-many branch's maps, the branch that trains the features; the detections come from the
  one-to-one branch, as in Ultralytics;
* losses: Ultralytics' own (``v8DetectionLoss``, or ``E2ELoss`` for end-to-end heads), with its
  gains (box 7.5, cls 0.5, dfl 1.5), computed on the same maps;
* detections: the branch Ultralytics' own inference uses (the Detect head's ``end2end``
  setting: the one-to-one branch's top-k, or the one-to-many branch and Ultralytics' NMS,
  ``non_max_suppression``), its boxes decoded here as xyxy whatever that setting.

Input normalisation is the model's own: images in ``[0, 1]``, no mean/std.

Ultralytics is AGPL-3.0 and an optional dependency (``pip install kdet[ultralytics]``); it is
imported only when this family is used.
"""
from __future__ import annotations

import copy
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from .. import __version__
from ..config import ModelConfig
from ..losses.dfl import dfl_expectation
from ..structures import Detections, DetectorOutput, FeatureMap, HeadLevel, Targets
from . import MODELS
from .detector import Detector

INSTALL_HINT = ("pip install 'kdet[ultralytics]' (or pip install ultralytics; Ultralytics is AGPL-3.0, see the README "
                "section on the Ultralytics family)")
STRIDES = (8, 16, 32)


def import_ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never look anything up online
    try:
        import ultralytics
        from ultralytics.utils import patches
    except ImportError:
        raise ValueError(f"model.family: ultralytics needs the ultralytics package, which is not installed; {INSTALL_HINT}") from None
    # Ultralytics replaces PIL.Image.open on import (to try a HEIF plugin on files PIL cannot
    # identify); kdet's readers report such files as unreadable, so PIL's own open is put back
    from PIL import Image

    Image.open = getattr(patches, "_image_open", Image.open)
    return ultralytics


# ---------------------------------------------------------------------------------------------
# Ultralytics checkpoints
# ---------------------------------------------------------------------------------------------
def is_ultralytics_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and isinstance(payload.get("ema") or payload.get("model"), nn.Module) and (
        "train_args" in payload or "version" in payload)


def read_ultralytics_checkpoint(path: str | Path) -> dict:
    """An Ultralytics checkpoint file (``best.pt`` of ``yolo train``), read with its classes."""
    import_ultralytics()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {path} not found; give a local Ultralytics checkpoint (nothing is downloaded)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise ValueError(f"{path}: cannot be read as an Ultralytics checkpoint ({error})") from None
    if not is_ultralytics_checkpoint(payload):
        raise ValueError(f"{path}: not an Ultralytics checkpoint (a dict with the model under 'ema' or 'model')")
    return payload


def network_of(payload: dict) -> nn.Module:
    network = (payload.get("ema") or payload.get("model")).float()
    if type(network).__name__ != "DetectionModel":
        raise ValueError(f"the Ultralytics checkpoint holds a {type(network).__name__}; kdet reads detect models "
                         f"(DetectionModel: YOLOv8, YOLO11, YOLO26 detect)")
    return network


def kdet_payload(payload: dict, path: str | Path) -> dict:
    """An Ultralytics checkpoint as kdet's detector payload (:mod:`kdet.engine.checkpoint`): the
    architecture (its yaml), its classes, the input size it was trained at, its weights."""
    from ..engine.checkpoint import FORMAT

    network = network_of(payload)
    names = getattr(network, "names", None) or {}
    classes = [str(names[i]) if i in names else str(i) for i in range(int(network.yaml["nc"]))]
    imgsz = (payload.get("train_args") or {}).get("imgsz", 640)
    imgsz = int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)
    config = ModelConfig(family="ultralytics", config=dict(network.yaml), channels=payload.get("kdet_channels"))
    return {
        "format": FORMAT,
        "kdet_version": __version__,
        "source": f"Ultralytics checkpoint {path}",
        "model_config": config.model_dump(mode="json"),
        "class_names": classes,
        "input_size": imgsz,
        "state_dict": {f"net.{k}": v for k, v in network.state_dict().items()},
    }


def resolve_config(config: ModelConfig) -> ModelConfig:
    """``model.weights`` naming an Ultralytics checkpoint and no ``model.config``: the
    checkpoint's architecture (its yaml) becomes ``model.config``, so a run records it."""
    if config.family != "ultralytics" or config.config is not None or not config.weights:
        return config
    return config.model_copy(update={"config": dict(network_of(read_ultralytics_checkpoint(config.weights)).yaml)})


def save_ultralytics_checkpoint(model: "UltralyticsDetector", path: str | Path, input_size: int,
                                channels: dict | None = None) -> Path:
    """Write ``model`` as an Ultralytics checkpoint that ``YOLO(path)`` loads for ``predict``,
    ``val`` and ``export``: its network with kdet's class names and input size. A pruned model's
    channel plan (``channels``, its ``model.channels``) goes with it, so kdet rebuilds it too."""
    ultralytics = import_ultralytics()
    from ..engine.checkpoint import atomic_file

    network = copy.deepcopy(model.net).float().eval()
    network.names = dict(enumerate(model.class_names))
    network.args = {"imgsz": int(input_size), "task": "detect"}
    train_args = {"task": "detect", "mode": "train", "imgsz": int(input_size), "model": str(path)}
    payload = {"date": datetime.now().astimezone().isoformat(), "version": ultralytics.__version__,
               "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
               "epoch": -1, "best_fitness": None, "model": None, "ema": network, "updates": 0, "optimizer": None,
               "train_args": train_args, "train_metrics": {}, "train_results": {}}
    if channels:
        payload["kdet_channels"] = channels
    path = Path(path)
    with atomic_file(path) as handle:
        torch.save(payload, handle)
    return path


def write_ultralytics_copy(run_dir: str | Path, log=print) -> Path | None:
    """After a run of this family: ``ultralytics.pt`` beside ``best.pt``, the same detector as an
    Ultralytics checkpoint. Nothing for other families."""
    best = Path(run_dir) / "best.pt"
    if not best.is_file():
        return None
    from ..engine.checkpoint import load_detector

    model, payload = load_detector(best, log=lambda _: None)
    if model.family != "ultralytics":
        return None
    out = save_ultralytics_checkpoint(model, best.parent / "ultralytics.pt", payload["input_size"],
                                      payload["model_config"].get("channels"))
    log(f"also saved as an Ultralytics checkpoint: {out} (YOLO('{out}').predict(...) / .val(...))")
    return out


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------
class UltralyticsDetector(Detector):
    """An Ultralytics ``DetectionModel`` (``net``) as a kdet detector; see the module docstring."""

    family = "ultralytics"

    def __init__(self, class_names: list[str], network: nn.Module, *, input_size: int = 640) -> None:
        super().__init__(class_names)
        self.set_normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # Ultralytics models take [0, 1] as it is
        self.net = network
        self.input_size = input_size
        detect = network.model[-1]
        if type(detect).__name__ != "Detect":
            raise ValueError(f"model.config: the network ends in {type(detect).__name__}; kdet reads detect models (Detect head)")
        self.strides = [int(s) for s in detect.stride.tolist()]
        if self.strides != list(STRIDES):
            raise ValueError(f"model.config: the Detect head has strides {self.strides}; kdet pairs pyramids of strides "
                             f"8/16/32 (P3-P5 detect models)")
        self.end2end = getattr(detect, "one2one_cv2", None) is not None
        self.reg_max = int(detect.reg_max)
        self.backbone_layers = self._backbone_layers(network, input_size)
        self.keep = set(network.save) | set(detect.f) | set(self.backbone_layers)
        self._criterion = None
        self._criterion_device = None

    @staticmethod
    def _backbone_layers(network: nn.Module, input_size: int) -> list[int]:
        """Indices of the backbone section's last layer of stride 8, 16 and 32 (probed)."""
        count = len(network.yaml["backbone"])
        strides: dict[int, int] = {}
        with torch.no_grad():
            was_training = network.training
            network.eval()
            y, x = [], torch.zeros(1, 3, 64, 64)
            for m in network.model[:count]:
                if m.f != -1:
                    x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
                x = m(x)
                y.append(x)
                if isinstance(x, Tensor) and x.dim() == 4:
                    strides[64 // x.shape[-1]] = m.i
            network.train(was_training)
        return [strides[s] for s in STRIDES if s in strides]

    def _layers(self, x: Tensor) -> list[Tensor | None]:
        y: list[Tensor | None] = []
        for m in self.net.model[:-1]:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.keep else None)
        return y

    def _branch(self, feats: list[Tensor], box_head: nn.ModuleList, cls_head: nn.ModuleList) -> list[tuple[Tensor, Tensor]]:
        return [(box_head[i](x), cls_head[i](x)) for i, x in enumerate(feats)]

    def _levels(self, maps: list[tuple[Tensor, Tensor]]) -> list[HeadLevel]:
        levels = []
        for index, (box_raw, cls) in enumerate(maps):
            n, _, h, w = cls.shape
            if self.reg_max > 1:
                box_dist = box_raw.view(n, 1, 4, self.reg_max, h, w)
                box = dfl_expectation(box_dist, dim=3)
            else:
                box_dist, box = None, box_raw.view(n, 1, 4, h, w)
            levels.append(HeadLevel(name=f"p{3 + index}", stride=self.strides[index], cls_logits=cls.unsqueeze(1), box=box,
                                    box_format="ltrb_center", box_dist=box_dist))
        return levels

    @staticmethod
    def _preds(maps: list[tuple[Tensor, Tensor]], feats: list[Tensor]) -> dict[str, Any]:
        """The Detect head's training output (what its loss and ``_inference`` read) from the maps."""
        n = feats[0].shape[0]
        return {"boxes": torch.cat([b.reshape(n, b.shape[1], -1) for b, _ in maps], -1),
                "scores": torch.cat([c.reshape(n, c.shape[1], -1) for _, c in maps], -1), "feats": feats}

    def forward(self, images: Tensor, targets: Targets | None = None, *, decode: bool = False, score_thresh: float = 0.001,
                nms_iou: float = 0.6, max_det: int = 300, assign_from: list[HeadLevel] | None = None) -> DetectorOutput:
        """Features, head maps (one-to-many branch), Ultralytics' losses with ``targets`` and its
        detections with ``decode``; see the module docstring."""
        y = self._layers(self.normalize(images))
        detect = self.net.model[-1]
        feats = [y[j] for j in detect.f]
        features = {f"backbone.c{3 + i}": FeatureMap(y[j], s) for i, (j, s) in enumerate(zip(self.backbone_layers, STRIDES))}
        features.update({f"neck.p{3 + i}": FeatureMap(x, s) for i, (x, s) in enumerate(zip(feats, self.strides))})
        many = self._branch(feats, detect.cv2, detect.cv3)
        output = DetectorOutput(features=features, head=self._levels(many))
        if targets is None and not decode:
            return output
        preds = self._preds(many, feats)
        one = None
        if self.end2end:
            detached = [x.detach() for x in feats] if self.training else feats  # as Ultralytics: one-to-one stays off the features
            one = self._preds(self._branch(detached, detect.one2one_cv2, detect.one2one_cv3), detached)
        if targets is not None:
            output.losses = self._loss({"one2many": preds, "one2one": one} if one is not None else preds, targets, images,
                                       assign_from=None if assign_from is None else (output.head, assign_from))
            output.loss = sum(output.losses.values())
        if decode:
            one2one = self.one_to_one_inference
            if one2one and one is None:
                one = self._preds(self._branch(feats, detect.one2one_cv2, detect.one2one_cv3), feats)
            output.detections = self._decode(one if one2one else preds, one2one, tuple(images.shape[-2:]), score_thresh,
                                             nms_iou, max_det)
        return output

    @property
    def one_to_one_inference(self) -> bool:
        """Whether detections come from the one-to-one branch (top-k, no NMS) or from the
        one-to-many branch with NMS: as the Detect head's own ``end2end`` setting says, so that
        kdet's detections are the ones ``YOLO(...).predict`` and ``.val`` give with their default
        settings for the installed Ultralytics version (whose default has changed between versions)."""
        return self.end2end and bool(getattr(self.net.model[-1], "end2end", False))

    def criterion(self):
        """Ultralytics' loss for this network (built on the network's device, once per device)."""
        device = next(self.net.parameters()).device
        if self._criterion is None or self._criterion_device != device:
            from ultralytics.cfg import get_cfg

            if not hasattr(self.net, "args") or isinstance(self.net.args, dict):
                self.net.args = get_cfg()
            self._criterion = self.net.init_criterion()
            self._criterion_device = device
        return self._criterion

    @staticmethod
    def _batch(targets: Targets, height: int, width: int, device: torch.device) -> dict[str, Tensor]:
        """kdet's targets as Ultralytics' batch: image index, class, normalised xywh boxes."""
        scale = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)
        boxes = [t["boxes"].float().to(device) for t in targets]
        xyxy = torch.cat(boxes) if boxes else torch.zeros(0, 4, device=device)
        xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
        return {"batch_idx": torch.cat([torch.full((len(b),), float(i), device=device) for i, b in enumerate(boxes)]),
                "cls": torch.cat([t["labels"] for t in targets]).float().view(-1, 1).to(device), "bboxes": xywh}

    @property
    def assigns(self) -> bool:
        return True

    def assign(self, head: list, targets: Targets) -> list[Tensor]:
        """Ultralytics' task-aligned assignment (its one-to-many loss's) of ``targets`` to the
        locations of ``head``: per level int64 ``[N, 1, H, W]``, the object index or -1."""
        n = head[0].cls_logits.shape[0]
        maps = [(level.box_dist[:, 0].flatten(1, 2) if level.box_dist is not None else level.box[:, 0], level.cls_logits[:, 0])
                for level in head]
        feats = [level.cls_logits[:, 0] for level in head]  # only their shapes are read (the anchor points)
        criterion = self.criterion()
        criterion = getattr(criterion, "one2many", criterion)
        height, width = (s * head[0].stride for s in head[0].grid_size)
        with torch.no_grad():
            (fg_mask, target_gt_idx, *_), _, _ = criterion.get_assigned_targets_and_loss(
                self._preds([(b.detach(), c.detach()) for b, c in maps], feats), self._batch(targets, height, width, feats[0].device))
        owner = torch.where(fg_mask, target_gt_idx, torch.full_like(target_gt_idx, -1))  # [N, K]
        sizes = [h * w for h, w in (level.grid_size for level in head)]
        return [part.view(n, 1, *level.grid_size) for part, level in zip(owner.split(sizes, 1), head)]

    def _loss(self, preds: dict, targets: Targets, images: Tensor,
              assign_from: tuple[list[HeadLevel], list[HeadLevel]] | None = None) -> dict[str, Tensor]:
        """Ultralytics' loss of ``preds``; with ``assign_from`` (this model's head levels and
        another model's at the same strides and grids, with the same classes) the one-to-many
        branch's task-aligned assignment reads the other model's class scores and boxes instead
        of this model's (``distill.assign: teacher``); the losses stay this model's. An end-to-end
        head's one-to-one branch keeps its own assignment: its one positive per object is what
        lets it skip NMS, and it has to find that itself."""
        batch = self._batch(targets, images.shape[-2], images.shape[-1], images.device)
        criterion = self.criterion()
        if assign_from is None:
            loss, _ = criterion(preds, batch)
        else:
            from ..losses.dfl import check_assign_from, flatten_levels

            own, other = assign_from
            check_assign_from(own, other)
            with torch.no_grad():
                flat = flatten_levels(other)  # locations in the order of Ultralytics' anchor points
            many = getattr(criterion, "one2many", criterion)
            original = many.assigner
            many.assigner = _ReadsOtherPredictions(original, flat.scores.detach(), flat.boxes.detach())
            try:
                loss, _ = criterion(preds, batch)
            finally:
                many.assigner = original
        loss = loss / len(images)  # Ultralytics scales by the batch size; kdet's losses are per image
        names = ("box", "cls", "dfl" if self.reg_max > 1 else "l1")
        return dict(zip(names, loss.unbind()))

    def _boxes_and_scores(self, preds: dict) -> tuple[Tensor, Tensor]:
        """One branch's boxes ``[N, K, 4]`` (xyxy input pixels) and class probabilities ``[N, K, C]``,
        decoded here rather than by the Detect head, whose box format depends on its ``end2end``
        and ``xyxy`` settings."""
        from ultralytics.utils.tal import dist2bbox, make_anchors

        detect = self.net.model[-1]
        anchors, strides = (a.transpose(0, 1) for a in make_anchors(preds["feats"], detect.stride, 0.5))
        boxes = dist2bbox(detect.dfl(preds["boxes"]), anchors.unsqueeze(0), xywh=False, dim=1) * strides
        return boxes.transpose(1, 2), preds["scores"].sigmoid().transpose(1, 2)

    def boxes_and_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes ``[N, K, 4]`` xyxy input pixels (clipped) and class probabilities ``[N, K, C]`` of
        the branch that makes the detections, before NMS (what ONNX export writes)."""
        y = self._layers(self.normalize(images))
        detect = self.net.model[-1]
        feats = [y[j] for j in detect.f]
        heads = (detect.one2one_cv2, detect.one2one_cv3) if self.one_to_one_inference else (detect.cv2, detect.cv3)
        boxes, scores = self._boxes_and_scores(self._preds(self._branch(feats, *heads), feats))
        return clip_boxes_to_image(boxes, tuple(images.shape[-2:])), scores

    def _decode(self, preds: dict, one2one: bool, image_size: tuple[int, int], score_thresh: float, nms_iou: float,
                max_det: int) -> list[Detections]:
        from ultralytics.utils.nms import non_max_suppression

        detect = self.net.model[-1]
        boxes, scores = self._boxes_and_scores(preds)
        if one2one:  # the one-to-one branch's top-k: [N, max_det, 6] (xyxy, score, class), no NMS
            detect.max_det = max_det
            raw = detect.postprocess(torch.cat([boxes, scores], -1))
        else:  # Ultralytics' NMS reads [N, 4 + C, K] with xywh boxes
            xywh = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
            raw = torch.cat([xywh, scores], -1).transpose(1, 2)
        kept = non_max_suppression(raw, score_thresh, nms_iou, multi_label=True, max_det=max_det, nc=self.num_classes,
                                   end2end=one2one)
        return [Detections(clip_boxes_to_image(k[:, :4].float(), image_size), k[:, 4].float(), k[:, 5].long()) for k in kept]


class _ReadsOtherPredictions:
    """Ultralytics' ``TaskAlignedAssigner`` called with given class probabilities ``[N, K, C]``
    and xyxy boxes ``[N, K, 4]`` (input pixels) in place of the trained model's."""

    def __init__(self, assigner: Any, scores: Tensor, boxes: Tensor) -> None:
        self.assigner, self.scores, self.boxes = assigner, scores, boxes

    def __call__(self, pd_scores: Tensor, pd_bboxes: Tensor, *args: Any, **kwargs: Any):
        if self.scores.shape != pd_scores.shape:
            raise ValueError(f"assign_from: {tuple(self.scores.shape)} class scores for a head of {tuple(pd_scores.shape)}")
        return self.assigner(self.scores.to(pd_scores.dtype), self.boxes.to(pd_bboxes.dtype), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.assigner, name)


def architecture(config: ModelConfig) -> dict:
    """A copy of the network description (Ultralytics' yaml as a dict) that ``model.config``
    names, or that of the checkpoint in ``model.weights``."""
    import_ultralytics()
    from ultralytics.nn.tasks import yaml_model_load

    source = config.config
    if source is None:
        if not config.weights:
            raise ValueError("model.family: ultralytics needs model.config (a yaml such as yolo11n.yaml, yolov8s.yaml, "
                             "yolo26n.yaml, or a path) or model.weights (an Ultralytics checkpoint)")
        source = dict(network_of(read_ultralytics_checkpoint(config.weights)).yaml)
    try:
        return copy.deepcopy(source) if isinstance(source, dict) else yaml_model_load(source)
    except FileNotFoundError as error:
        raise ValueError(f"model.config: {error}; give a yaml Ultralytics ships (yolov8n.yaml, yolo11s.yaml, yolo26m.yaml "
                         f"...) or the path of one") from None


def build_network(config: ModelConfig, num_classes: int) -> nn.Module:
    source = architecture(config)  # imports Ultralytics, or says how to install it
    from ultralytics.nn.tasks import DetectionModel

    source["nc"] = num_classes
    return DetectionModel(source, ch=3, nc=num_classes, verbose=False)


def box_bins(config: ModelConfig) -> int:
    """The number of bins of the Detect head's box edge distributions (``reg_max``) of the
    network ``config`` describes: 16 for YOLOv8 and YOLO11, 1 (no distributions) for YOLO26."""
    return int(architecture(config).get("reg_max", 16))


@MODELS.register("ultralytics")
def build_ultralytics(config: ModelConfig, class_names: list[str], input_size: int) -> UltralyticsDetector:
    """An Ultralytics detect model from ``model.config`` (or the architecture of the checkpoint in
    ``model.weights``, whose weights the trainer then loads), with ``len(class_names)`` classes."""
    if config.backbone_args or config.pretrained_backbone:
        raise ValueError("model.family: ultralytics builds the whole network from model.config; remove "
                         "model.backbone_args and model.pretrained_backbone")
    return UltralyticsDetector(class_names, build_network(config, len(class_names)), input_size=input_size)
