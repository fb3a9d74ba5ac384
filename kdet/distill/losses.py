"""Distillation losses: small pure functions from (student, teacher) outputs to an unweighted
scalar.

The distiller does the rest: it pairs levels and features, detaches the teacher, applies
connectors and weights. Two kinds exist:

* response losses read head outputs, a list of :class:`ResponseLevel` per model, one per paired
  pyramid level, with the same number of anchors, classes and grid on both sides;
* feature losses read student feature maps (already through their connector) and the teacher's
  maps of the same shape, ``[N, C, H, W]``: one pair per call (``levels="each"``; the
  distiller averages the pairs), or every paired level at once as two lists
  (``levels="all"``, for terms that span the pyramid).

Context
  Besides the two models' outputs a loss may need to know where the objects are, the stride of
  a map, or own a trainable part. It says so by naming keyword-only parameters from
  :data:`CONTEXT`; the distiller fills them on every call, and the pairing check refuses a pair
  that cannot give them. Every other keyword-only parameter is one of the loss's own
  arguments (``args:`` in a term's config).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry


CONTEXT: dict[str, str] = {
    "gt_boxes": "ground-truth boxes per image, float [M, 4] xyxy input pixels (M may be 0)",
    "gt_labels": "ground-truth classes per image, int64 [M], in the student's class list",
    "stride": "stride in input pixels of the pair's maps (levels='each')",
    "strides": "stride of every paired map or level, in the order of the lists",
    "input_size": "(H, W) of the input images",
    "assignment": "the student detector's own assignment: per paired map int64 [N, H, W] (a list for "
                  "levels='all' and response losses, [N, A, H, W] per level), index of the object of that image a "
                  "location is a positive for, -1 for background",
    "labelled": "bool [N], whether each image has labels",
    "module": "the trainable module the loss registered (for levels='each' one per pair)",
    "teacher_quality": "[N, 1, H, W] in [0, 1] at the pair's grid: the teacher's best class score (times its "
                       "objectness or centerness), a list for levels='all'",
    "mask": "[N, 1, H, W] float, 1 inside the ground-truth boxes (term mask: gt), None otherwise (a list for levels='all')",
}
"""Context a loss can ask for by naming a keyword-only parameter, and what it receives."""


@dataclass
class ResponseLevel:
    """One pyramid level of a head, as response losses see it.

    ``cls_logits`` ``[N, A, C, H, W]``; ``box`` ``[N, A, 4, H, W]`` in a space both models share
    (the raw head parameterisation when the heads agree, else distances from the cell corner to
    the box edges in units of the stride; see :mod:`kdet.distill.pairing`); ``score``
    ``[N, A, 1, H, W]`` objectness or centerness logits, ``None`` when the head has none;
    ``quality`` ``[N, A, 1, H, W]`` in ``[0, 1]``: how likely a good detection sits at a
    location (objectness for YOLO heads, centerness x best class probability for FCOS).
    ``box_dist`` ``[N, A, 4, R, H, W]``: logits of each box edge's distribution over ``R`` bins
    (heads with a distribution box branch, DFL), else ``None``.
    """

    cls_logits: Tensor
    box: Tensor
    score: Tensor | None
    quality: Tensor
    box_space: str = "raw"  # "raw" head outputs, or "ltrb" distances in strides
    box_dist: Tensor | None = None


@dataclass(frozen=True)
class DistillLoss:
    """A registered loss: its function, what it reads (``response`` or ``feature``) and, for
    feature losses, the connector it uses when the config says ``auto`` (``None``: the loss
    compares maps of any channel count and grid itself, no connector is built), whether it takes
    one pair at a time or every level at once (``levels``), and ``module``: a builder of the
    trainable part it owns, called with the student's and the teacher's channel counts (after the
    connector; lists for ``levels="all"``)."""

    fn: Callable[..., Tensor]
    kind: str
    connector: str | None = "conv"
    box_space: str = "auto"  # response losses: "raw" maps only, "decoded" always, or "auto": raw when the heads agree, else decoded
    levels: str = "each"
    module: Callable[..., nn.Module] | None = None
    needs_box_dist: bool = False  # response losses that read both heads' box distributions (DFL heads)

    @property
    def context(self) -> list[str]:
        """The context names the loss asks for."""
        return [name for name in keyword_names(self.fn) if name in CONTEXT]

    @property
    def supports_mask(self) -> bool:
        """Whether the term may set ``mask: gt``."""
        return "mask" in self.context

    @property
    def arguments(self) -> list[str]:
        """The loss's own arguments (``args:`` of a term)."""
        return [name for name in keyword_names(self.fn) if name not in CONTEXT]


def keyword_names(fn: Callable) -> list[str]:
    return [name for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY]


DISTILL_LOSSES: Registry[DistillLoss] = Registry("distillation loss")


def register(name: str, kind: str, **options) -> Callable:
    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        entry = DistillLoss(fn, kind, **options)
        if entry.levels not in ("each", "all"):
            raise ValueError(f"{name}: levels must be 'each' or 'all', got {entry.levels!r}")
        if ("module" in entry.context) != (entry.module is not None):
            raise ValueError(f"{name}: a loss asks for its module (a 'module' parameter) exactly when it registers a builder")
        DISTILL_LOSSES.register(name)(entry)
        return fn

    return add


def _channels_last(t: Tensor) -> Tensor:
    """``[N, A, K, H, W]`` -> ``[N, A, H, W, K]``."""
    return t.permute(0, 1, 3, 4, 2)


def _weighted_mean(values: list[Tensor], weights: list[Tensor]) -> Tensor:
    """``sum(w * v) / sum(w)`` over every location of every level; 0 when all weights are 0."""
    numerator = sum((w * v).sum() for v, w in zip(values, weights))
    denominator = sum(w.sum() for w in weights)
    return numerator / denominator.clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Response-based
# ---------------------------------------------------------------------------------------------
@register("l2_logits", "response", box_space="raw")
def l2_logits(student: list[ResponseLevel], teacher: list[ResponseLevel]) -> Tensor:
    """Mean squared error between the raw head maps: class logits, box outputs and score logits,
    each averaged over its elements, summed, averaged over levels.

    Plain L2 distillation of every head output, as PaddleDetection's YOLOv3 distillation does.
    It needs heads of the same kind (same box parameterisation and anchors); the pairing check
    refuses it otherwise.

    Reference: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014 (logit
    regression); PaddleDetection ``slim/distillation/distill.py`` (L2 loss on YOLOv3 outputs).
    """
    total = []
    for s, t in zip(student, teacher):
        level = F.mse_loss(s.cls_logits, t.cls_logits) + F.mse_loss(s.box, t.box)
        if s.score is not None and t.score is not None:
            level = level + F.mse_loss(s.score, t.score)
        total.append(level)
    return torch.stack(total).mean()


@register("kl", "response")
def kl(
    student: list[ResponseLevel],
    teacher: list[ResponseLevel],
    *,
    temperature: float = 2.0,
    mode: str = "softmax",
    weighting: str = "teacher_quality",
) -> Tensor:
    """KL(teacher || student) of temperature-softened class distributions, times ``T^2``.

    ``mode="softmax"``: one distribution over the classes per location (Hinton's form).
    ``mode="sigmoid"``: one Bernoulli per class (heads with a sigmoid per class; the only
    informative choice with a single class), summed over classes.
    Locations are averaged with weights: ``weighting="teacher_quality"`` (default) weights each by
    the teacher's quality, so the classes the teacher predicts on empty background, where no
    class loss ever trained it, count little; ``"uniform"`` is the plain mean.

    Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531 (2015).
    """
    if temperature <= 0:
        raise ValueError(f"kl: temperature must be positive, got {temperature}")
    if mode not in ("softmax", "sigmoid"):
        raise ValueError(f"kl: mode must be 'softmax' or 'sigmoid', got {mode!r}")
    if weighting not in ("teacher_quality", "uniform"):
        raise ValueError(f"kl: weighting must be 'teacher_quality' or 'uniform', got {weighting!r}")
    values, weights = [], []
    for s, t in zip(student, teacher):
        s_logits = _channels_last(s.cls_logits) / temperature
        t_logits = _channels_last(t.cls_logits) / temperature
        if mode == "softmax":
            t_log = F.log_softmax(t_logits, -1)
            divergence = (t_log.exp() * (t_log - F.log_softmax(s_logits, -1))).sum(-1)
        else:
            t_log_p, t_log_q = F.logsigmoid(t_logits), F.logsigmoid(-t_logits)
            s_log_p, s_log_q = F.logsigmoid(s_logits), F.logsigmoid(-s_logits)
            divergence = (t_log_p.exp() * (t_log_p - s_log_p) + t_log_q.exp() * (t_log_q - s_log_q)).sum(-1)
        values.append(divergence)  # [N, A, H, W]
        weights.append(t.quality[:, :, 0] if weighting == "teacher_quality" else torch.ones_like(divergence))
    return _weighted_mean(values, weights) * temperature**2


@register("objectness_scaled", "response")
def objectness_scaled(
    student: list[ResponseLevel],
    teacher: list[ResponseLevel],
    *,
    obj_weight: float = 1.0,
    cls_weight: float = 1.0,
    box_weight: float = 1.0,
) -> Tensor:
    """Mehta & Ozay's loss for one-stage detectors:
    ``obj_weight * L_obj + cls_weight * L_cls + box_weight * L_box`` (the paper: all 1).

    ``L_obj``: squared difference of the student's and the teacher's quality (objectness
    probability for YOLO heads), averaged over every location.
    ``L_cls``: squared difference of the class probabilities, ``L_box``: squared difference of
    the box maps; each averaged over classes (coordinates), then over locations weighted by the
    teacher's quality, so the flood of background locations, where the teacher's class and box
    outputs mean nothing, does not dominate.

    Boxes are compared as the heads output them (``box_space="raw"``, the paper's choice) when
    both heads are of one kind with the same anchors. Otherwise they come decoded, as distances
    to the box edges in strides (``"ltrb"``), and each difference is divided by the teacher
    box's size (half its width plus height, at least one stride): raw distances grow with the
    object, and their squared error would let large boxes drown every other term.

    FCOS heads have no objectness; their quality is ``sigmoid(centerness) * max_c sigmoid(cls)``,
    the score their detections are ranked by (up to torchvision's square root), which plays the
    same role: near zero on background, high on the boxes the teacher would keep.

    The component weights let the three parts be balanced like the detector's own loss terms:
    with equal weights the box part's gradient can be tens of times the detector's (YOLOv5
    weights its own box loss by 0.05), see BENCHMARKS.md.

    Reference: Mehta & Ozay, "Object detection at 200 Frames Per Second", ECCV Workshops 2018
    (arXiv:1805.06361), section 3.2.
    """
    obj_values, cls_values, box_values, weights = [], [], [], []
    for s, t in zip(student, teacher):
        obj_values.append((s.quality - t.quality).square())
        cls_values.append((s.cls_logits.sigmoid() - t.cls_logits.sigmoid()).square().mean(2, keepdim=True))
        difference = s.box - t.box
        if t.box_space == "ltrb":
            difference = difference / _box_scale(t.box)
        box_values.append(difference.square().mean(2, keepdim=True))
        weights.append(t.quality)
    obj = sum(v.sum() for v in obj_values) / sum(v.numel() for v in obj_values)
    return obj_weight * obj + cls_weight * _weighted_mean(cls_values, weights) + box_weight * _weighted_mean(box_values, weights)


@register("soft_bce", "response")
def soft_bce(student: list[ResponseLevel], teacher: list[ResponseLevel], *, beta: float = 2.0) -> Tensor:
    """The student's class logits learn the teacher's class probabilities with a binary cross
    entropy on soft targets, each (location, class) weighted by ``|p_s - p_t|^beta`` as the
    quality focal loss does, summed and divided by the sum of the teacher's probabilities (at
    least 1): where the teacher is sure of background both are near 0 and the pair counts little,
    so the flood of empty locations does not drown the objects.

    Paired with ``distill.assign: teacher`` (the student's own loss takes its positives and
    their targets from the teacher's assignment) it is PP-YOLOE+'s distillation recipe for
    one-stage detectors; on its own it distils the class branch of any head.

    Reference: Li et al., "Generalized Focal Loss", NeurIPS 2020 (quality focal loss); Xu et al.,
    "PP-YOLOE: An evolved version of YOLO", arXiv:2203.16250 (2022) and PaddleDetection's
    ``ppyoloe_plus_distill`` (soft-label class distillation); Nguyen et al., "Improving Object
    Detection by Label Assignment Distillation", WACV 2022.
    """
    if beta < 0:
        raise ValueError(f"soft_bce: beta must be >= 0, got {beta}")
    total, normaliser = 0.0, 0.0
    for s, t in zip(student, teacher):
        target = t.cls_logits.sigmoid()
        weight = (s.cls_logits.sigmoid() - target).abs().pow(beta)
        total = total + (F.binary_cross_entropy_with_logits(s.cls_logits, target, reduction="none") * weight).sum()
        normaliser = normaliser + target.sum()
    return total / torch.clamp(torch.as_tensor(normaliser), min=1.0)


@register("ld", "response", box_space="decoded", needs_box_dist=True)
def ld(
    student: list[ResponseLevel],
    teacher: list[ResponseLevel],
    *,
    assignment: list[Tensor],
    gt_boxes: list[Tensor],
    strides: list[int],
    temperature: float = 10.0,
    vlr_weight: float = 1.0,
) -> Tensor:
    """Localization distillation: KL divergence between the teacher's and the student's
    distribution of every box edge, softened with ``temperature``, times ``T^2``, averaged over
    the four edges and over the locations of two regions:

    * the main distillation region: the student's positive locations (its own assignment);
    * the valuable localization region: locations that are not positives but whose cell centre
      lies inside a ground-truth box, where the teacher's box knowledge is still informative
      (the paper selects them by anchor IoU; an anchor-free head has no anchor box, so kdet uses
      the object's extent), weighted by ``vlr_weight``.

    Each region's mean counts separately, so the many VLR locations do not drown the positives;
    a region without locations adds 0. Needs box distributions on both sides (DFL heads, same
    number of bins): ``box_dist`` ``[N, A, 4, R, H, W]``.

    Reference: Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022
    (arXiv:2102.12252).
    """
    if temperature <= 0:
        raise ValueError(f"ld: temperature must be positive, got {temperature}")
    main_sum, main_count, vlr_sum, vlr_count = 0.0, 0.0, 0.0, 0.0
    for s, t, owner, stride in zip(student, teacher, assignment, strides):
        if s.box_dist is None or t.box_dist is None:
            raise ValueError("ld: both heads need box distributions (box_dist); use DFL heads")
        divergence = edge_divergence(s.box_dist, t.box_dist, temperature)  # [N, A, H, W]
        positive = (owner >= 0).to(divergence.dtype)
        inside = _inside_boxes(gt_boxes, stride, tuple(divergence.shape[-2:])).to(divergence.dtype)  # [N, 1, H, W]
        valuable = inside * (1 - positive)
        main_sum, main_count = main_sum + (divergence * positive).sum(), main_count + positive.sum()
        vlr_sum, vlr_count = vlr_sum + (divergence * valuable).sum(), vlr_count + valuable.sum()
    main = main_sum / torch.clamp(torch.as_tensor(main_count), min=1.0)
    vlr = vlr_sum / torch.clamp(torch.as_tensor(vlr_count), min=1.0)
    return main + vlr_weight * vlr


def edge_divergence(student_dist: Tensor, teacher_dist: Tensor, temperature: float) -> Tensor:
    """``ld``'s divergence at every location: KL(teacher || student) between the distributions of
    each box edge (``[N, A, 4, R, H, W]`` logits), softened with ``temperature``, times ``T^2``,
    averaged over the four edges -> ``[N, A, H, W]``."""
    t_log = F.log_softmax(teacher_dist / temperature, 3)
    s_log = F.log_softmax(student_dist / temperature, 3)
    return (t_log.exp() * (t_log - s_log)).sum(3).mean(2) * temperature**2


def _inside_boxes(gt_boxes: list[Tensor], stride: int, grid: tuple[int, int]) -> Tensor:
    """``bool [N, 1, H, W]``: whether each cell's centre lies inside one of its image's boxes."""
    height, width = grid
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    out = []
    for boxes in gt_boxes:
        boxes = boxes.reshape(-1, 4).float()
        inside_x = (xs[None] > boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # [M, W]
        inside_y = (ys[None] > boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # [M, H]
        out.append((inside_y[:, :, None] & inside_x[:, None, :]).any(0)[None])  # [1, H, W]
    return torch.stack(out)


def _box_scale(ltrb: Tensor) -> Tensor:
    """Half of (width + height) of boxes given as ``[N, A, 4, H, W]`` edge distances, at least 1."""
    return ((ltrb[:, :, 0:1] + ltrb[:, :, 2:3] + ltrb[:, :, 1:2] + ltrb[:, :, 3:4]) / 2).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Feature-based
# ---------------------------------------------------------------------------------------------
@register("fitnet", "feature", connector="converter")
def fitnet(student: Tensor, teacher: Tensor, *, teacher_activation: str = "relu6", normalize: bool = False,
           mask: Tensor | None = None) -> Tensor:
    """FitNets hint loss: mean squared error between the student's feature map (through its
    connector) and the teacher's.

    ``teacher_activation="relu6"`` passes the teacher map through ReLU6, matching the range of
    the converter (conv + BN + ReLU6) on the student side; ``"none"`` leaves it as is.
    ``normalize=True`` divides both maps by their L2 norm over channels at every location first,
    which makes the loss insensitive to the two models' feature scales.
    With ``mask`` (``[N, 1, H, W]``, a term's ``mask: gt``) only the masked locations count: the
    mean is taken over them, as fine-grained feature imitation does near the objects.

    Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550);
    with ``mask``: Wang et al., "Distilling Object Detectors with Fine-grained Feature
    Imitation", CVPR 2019.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"fitnet: student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ; "
                         f"the connector and resampling should have made them equal")
    if teacher_activation == "relu6":
        teacher = F.relu6(teacher)
    elif teacher_activation != "none":
        raise ValueError(f"fitnet: teacher_activation must be 'relu6' or 'none', got {teacher_activation!r}")
    if normalize:
        student, teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    if mask is None:
        return F.mse_loss(student, teacher)
    squared = (student - teacher).square().mean(1, keepdim=True)  # [N, 1, H, W]
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


# the other families register themselves on import
from . import feature_losses  # noqa: E402,F401
