"""Feature-based and relation-based distillation losses of the modern detection methods
(registered in :data:`kdet.distill.losses.DISTILL_LOSSES`).

Every loss here is a pure function from feature maps to one scalar. The balancing constants
inside FGD and MGD (``alpha_fgd``, ``alpha_mgd``...) are part of each method's definition and
default to the papers' values; the term's ``weight`` multiplies the result on top, so
``weight: 1`` reproduces the paper. The losses with trainable parts (MGD's generator, FGD's
global-context blocks) register a builder; the distiller builds one module per pair, trains it
with the student and hands it back in ``module``.

Shapes: ``N`` images, ``C`` channels, an ``H x W`` grid. Unless a loss registers
``connector=None``, the student map comes through its connector, so both maps are
``[N, C, H, W]`` on the teacher's grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .losses import register


def _check_pair(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"{name}: student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} should both be "
                         f"[N, C, H, W] of one shape; the connector and resampling should have made them equal")


def _zero(*tensors: Tensor) -> Tensor:
    """A zero that stays in the graph of ``tensors`` (a loss with nothing to compare still
    returns a tensor that ``backward`` accepts)."""
    return sum(t.sum() for t in tensors) * 0.0


# ---------------------------------------------------------------------------------------------
# PKD
# ---------------------------------------------------------------------------------------------
def _standardise(x: Tensor, weight: Tensor | None) -> Tensor:
    """Each channel of ``x`` ``[N, C, H, W]`` to mean 0 and standard deviation 1 over its
    ``N * H * W`` locations, or over the locations ``weight`` ``[N, 1, H, W]`` selects."""
    if weight is None:
        mean = x.mean((0, 2, 3), keepdim=True)
        variance = (x - mean).square().mean((0, 2, 3), keepdim=True)
    else:
        count = weight.sum()
        mean = (x * weight).sum((0, 2, 3), keepdim=True) / count
        variance = ((x - mean).square() * weight).sum((0, 2, 3), keepdim=True) / count
    # the small constant keeps a constant channel (a dead ReLU) at 0 with a finite gradient
    return (x - mean) / (variance + 1e-12).sqrt()


@register("pkd", "feature")
def pkd(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Pearson-correlation feature imitation: standardise every channel of both maps (mean 0,
    standard deviation 1 over its ``N * H * W`` locations), then half the mean squared error.

    Inputs ``[N, C, H, W]`` each. For standardised maps the squared error of a channel is
    ``2 * (1 - r)`` per location, so the value is ``mean over channels of (1 - r)``, ``r`` the
    Pearson correlation of the student's and the teacher's channel: 0 for a student map that is
    any positive affine rescaling of the teacher's, per channel; 2 for a negated one. Magnitude
    differences between the two models' features no longer matter, only the pattern.

    The standard deviation is the population one (divide by ``N * H * W``), which makes the value
    exactly ``1 - r``; MMRazor's ``PKDLoss`` divides by ``N * H * W - 1``, a factor
    ``(n - 1) / n`` on the value, nothing for real map sizes.

    With ``mask`` (``[N, 1, H, W]``, a term's ``mask: gt``) the statistics and the average are
    taken over the masked locations only: the correlation of the two maps inside the
    ground-truth boxes. A batch without any masked location gives 0.

    Reference: Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022 (arXiv:2207.02039); MMRazor ``PKDLoss``.
    """
    _check_pair("pkd", student, teacher)
    student, teacher = student.float(), teacher.float()
    if mask is not None:
        mask = mask.to(student.dtype)
        if not bool(mask.sum() > 0):
            return _zero(student)
    squared = (_standardise(student, mask) - _standardise(teacher, mask)).square()  # [N, C, H, W]
    if mask is None:
        return squared.mean() / 2
    return (squared * mask).sum() / (mask.sum() * student.shape[1]) / 2


# ---------------------------------------------------------------------------------------------
# CWD
# ---------------------------------------------------------------------------------------------
@register("cwd", "feature")
def cwd(student: Tensor, teacher: Tensor, *, tau: float = 1.0) -> Tensor:
    """Channel-wise distillation: each channel becomes a distribution over the ``H * W``
    locations (softmax of the map divided by ``tau``); the loss is KL(teacher || student)
    summed over locations, times ``tau^2``, averaged over the ``N * C`` channels.

    Inputs ``[N, C, H, W]`` each. The student learns where each of the teacher's channels fires
    most, not its values; 0 when the two maps agree up to a constant per channel.

    Reference: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021
    (arXiv:2011.13256); MMRazor ``ChannelWiseDivergence``.
    """
    if tau <= 0:
        raise ValueError(f"cwd: tau must be positive, got {tau}")
    _check_pair("cwd", student, teacher)
    n, c = teacher.shape[:2]
    t_log = F.log_softmax(teacher.float().flatten(2) / tau, -1)  # [N, C, HW]
    s_log = F.log_softmax(student.float().flatten(2) / tau, -1)
    return (t_log.exp() * (t_log - s_log)).sum() * tau**2 / (n * c)


# ---------------------------------------------------------------------------------------------
# MGD
# ---------------------------------------------------------------------------------------------
def mgd_generator(student_channels: int, teacher_channels: int) -> nn.Module:
    """MGD's generation block on the teacher's channels: 3x3 conv, ReLU, 3x3 conv (the
    connector already brought the student to ``teacher_channels``)."""
    return nn.Sequential(
        nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
    )


@register("mgd", "feature", module=mgd_generator)
def mgd(student: Tensor, teacher: Tensor, *, module: nn.Module, alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65) -> Tensor:
    """Masked generative distillation: zero a random ``lambda_mgd`` share of the student map's
    locations (all channels of a location together), let the generator (``module``, see
    :func:`mgd_generator`) rebuild the teacher's full map from what is left, and take
    ``alpha_mgd * sum of squared errors / N``.

    Inputs ``[N, C, H, W]`` each. The student is not asked to copy the teacher but to hold
    enough to regenerate it, so it is never 0, not even for equal maps. The mask is drawn from
    torch's global generator of the map's device, so a run resumed with its RNG state draws the
    same masks. Defaults are the paper's detection settings.

    Reference: Yang et al., "Masked Generative Distillation", ECCV 2022 (arXiv:2205.01529);
    github.com/yzd-v/MGD and MMRazor ``MGDLoss``.
    """
    if not 0.0 <= lambda_mgd <= 1.0:
        raise ValueError(f"mgd: lambda_mgd is the share of masked locations, in [0, 1]; got {lambda_mgd}")
    _check_pair("mgd", student, teacher)
    n, _, h, w = student.shape
    # a location is masked where the uniform draw exceeds 1 - lambda, as the paper's code does
    keep = torch.rand(n, 1, h, w, device=student.device) <= 1.0 - lambda_mgd  # [N, 1, H, W]
    rebuilt = module(student * keep.to(student.dtype))
    return alpha_mgd * (rebuilt.float() - teacher.float()).square().sum() / n


# ---------------------------------------------------------------------------------------------
# FGD
# ---------------------------------------------------------------------------------------------
class GlobalContext(nn.Module):
    """GCNet's global-context block: attention-pool the map into one ``C`` vector, transform
    it (1x1 conv to ``C/2``, LayerNorm, ReLU, 1x1 conv back to ``C``) and add it to every
    location. The last conv starts at 0, so a new block is the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"fgd: the global-context block needs at least 2 channels, got {channels}")
        self.context = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, 1),
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = self.context(x).view(n, 1, h * w).softmax(-1)  # [N, 1, HW]
        pooled = (x.view(n, c, h * w) * weights).sum(-1)  # [N, C]
        return x + self.transform(pooled.view(n, c, 1, 1))


class FGDGlobal(nn.Module):
    """FGD's trainable part: one :class:`GlobalContext` block for the student's map and one for
    the teacher's, both on the teacher's channels."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.student = GlobalContext(teacher_channels)
        self.teacher = GlobalContext(teacher_channels)


def fgd_attention(feature: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """FGD's attention of a map ``[N, C, H, W]``: spatial ``[N, 1, H, W]``, ``H * W`` times the
    softmax over locations of the channel mean of ``|F|`` divided by ``temp`` (so it averages
    1); channel ``[N, C, 1, 1]``, ``C`` times the softmax over channels of the location mean
    of ``|F|`` divided by ``temp``."""
    n, c, h, w = feature.shape
    value = feature.abs()
    spatial = h * w * F.softmax(value.mean(1).view(n, h * w) / temp, -1)
    channel = c * F.softmax(value.mean((2, 3)) / temp, -1)
    return spatial.view(n, 1, h, w), channel.view(n, c, 1, 1)


def fgd_masks(gt_boxes: list[Tensor], stride: float, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks, each ``[N, 1, H, W]``, for boxes ``[M, 4]`` xyxy
    in input pixels per image on a ``grid`` of cells ``stride`` pixels wide.

    Foreground: every cell a box overlaps (at least the one holding its corner, as the
    distiller's ``mask: gt``) gets ``1 / (number of cells of the box)``, the largest value
    where boxes overlap, so a small object counts as much as a large one. Background: 1 on
    every other cell, divided by their number in the image (0 everywhere if there are none).
    The paper's code also takes the row and column after a box's last overlapped cell; here a
    box covers exactly the cells it overlaps.
    """
    height, width = grid
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    foreground = torch.zeros(len(gt_boxes), 1, height, width, device=device)
    for i, boxes in enumerate(gt_boxes):
        if boxes.numel() == 0:
            continue
        cells = boxes.detach().float().reshape(-1, 4) / stride
        c1 = cells[:, 0].floor().clamp(0, width - 1)
        r1 = cells[:, 1].floor().clamp(0, height - 1)
        c2 = torch.maximum(c1 + 1, cells[:, 2].ceil().clamp(max=width))
        r2 = torch.maximum(r1 + 1, cells[:, 3].ceil().clamp(max=height))
        inside = ((rows >= r1.view(-1, 1, 1)) & (rows < r2.view(-1, 1, 1))
                  & (cols >= c1.view(-1, 1, 1)) & (cols < c2.view(-1, 1, 1)))  # [M, H, W]
        share = 1.0 / ((c2 - c1) * (r2 - r1))  # [M]
        foreground[i, 0] = (inside * share.view(-1, 1, 1)).amax(0)
    background = (foreground == 0).float()
    background = background / background.sum((2, 3), keepdim=True).clamp_min(1.0)
    return foreground, background


@register("fgd", "feature", module=FGDGlobal)
def fgd(
    student: Tensor,
    teacher: Tensor,
    *,
    gt_boxes: list[Tensor],
    stride: float,
    module: FGDGlobal,
    temp: float = 0.5,
    alpha_fgd: float = 1e-3,
    beta_fgd: float = 5e-4,
    gamma_fgd: float = 1e-3,
    lambda_fgd: float = 5e-6,
) -> Tensor:
    """Focal and global distillation:
    ``alpha_fgd * L_fg + beta_fgd * L_bg + gamma_fgd * L_at + lambda_fgd * L_global``.

    Inputs ``[N, C, H, W]`` each; ``gt_boxes`` one ``[M, 4]`` per image (``M`` may be 0: the
    image is all background), ``stride`` of the maps in input pixels.

    ``L_fg`` and ``L_bg``: squared error of the maps weighted at each element by the teacher's
    spatial and channel attention (:func:`fgd_attention`) and by the foreground or background
    mask (:func:`fgd_masks`), summed and divided by ``N``. ``L_at``: L1 distance between the
    student's and the teacher's channel attention plus that of their spatial attention, summed,
    divided by ``N``. ``L_global``: squared error between the student's and the teacher's map
    each through its own global-context block (``module``, :class:`FGDGlobal`), summed, divided
    by ``N``. These are the sums of the paper's code; the defaults are its detection settings.
    0 when the maps are equal while the blocks are still new (the identity).

    Reference: Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022
    (arXiv:2111.11837); github.com/yzd-v/FGD and MMRazor ``FGDLoss``.
    """
    if temp <= 0:
        raise ValueError(f"fgd: temp must be positive, got {temp}")
    _check_pair("fgd", student, teacher)
    n, _, h, w = teacher.shape
    if len(gt_boxes) != n:
        raise ValueError(f"fgd: {len(gt_boxes)} box lists for a batch of {n} images")
    student, teacher = student.float(), teacher.float()
    s_spatial, s_channel = fgd_attention(student, temp)
    t_spatial, t_channel = fgd_attention(teacher, temp)
    foreground, background = fgd_masks(gt_boxes, stride, (h, w))
    weighted = (student - teacher).square() * t_spatial * t_channel  # [N, C, H, W]
    fg_loss = (weighted * foreground).sum() / n
    bg_loss = (weighted * background).sum() / n
    attention_loss = ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / n
    global_loss = (module.student(student) - module.teacher(teacher)).square().sum() / n
    return alpha_fgd * fg_loss + beta_fgd * bg_loss + gamma_fgd * attention_loss + lambda_fgd * global_loss


# ---------------------------------------------------------------------------------------------
# Score-weighted L2 (Ultralytics)
# ---------------------------------------------------------------------------------------------
@register("score_l2", "feature")
def score_l2(student: Tensor, teacher: Tensor, *, teacher_quality: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error of the maps, each location weighted by how confident the teacher is there:
    ``sum(q * (S - T)^2) / (C * sum(q) + 1e-9)``, ``q`` the teacher's quality ``[N, 1, H, W]``.

    Inputs ``[N, C, H, W]`` each. The normalisation is Ultralytics': the value is the
    ``q``-weighted mean over locations of the channel-mean squared error, so locations where the
    teacher sees nothing count little, and a batch where it sees nothing anywhere gives 0.
    Ultralytics' ``q`` is the best class probability of YOLO26/YOLOv8 heads (which have no
    objectness); kdet's teacher quality is that times the objectness or centerness where the
    head has one. Ultralytics passes the student through a projector (1x1 conv, ReLU, 1x1
    conv); here that is the term's connector. It also multiplies its loss by the batch size,
    as all its loss terms; kdet's terms are batch means, so that factor is left out.
    With ``mask`` (``[N, 1, H, W]``, a term's ``mask: gt``) the weight is ``q * mask``.

    Reference: Ultralytics ``DistillationModel.loss_sl2`` (``distill_model=`` training,
    ultralytics/ultralytics PR #24894, 2026).
    """
    _check_pair("score_l2", student, teacher)
    weight = teacher_quality if mask is None else teacher_quality * mask  # [N, 1, H, W]
    squared = (student.float() - teacher.float()).square()  # [N, C, H, W]
    return (squared * weight).sum() / (weight.sum() * student.shape[1] + 1e-9)


# ---------------------------------------------------------------------------------------------
# Relation-based
# ---------------------------------------------------------------------------------------------
def _object_rois(gt_boxes: list[Tensor], device: torch.device) -> Tensor:
    """``[M, 5]``: (image index, x1, y1, x2, y2) of every box of the batch."""
    rois = [torch.cat([torch.full((len(b), 1), float(i), device=device), b.detach().float().reshape(-1, 4).to(device)], 1)
            for i, b in enumerate(gt_boxes)]
    return torch.cat(rois) if rois else torch.zeros(0, 5, device=device)


def _object_embeddings(maps: list[Tensor], rois: Tensor, strides: list[float], grids: list[tuple[int, int]],
                       normalize: bool) -> Tensor:
    """``[M, sum of C]``: each object's features averaged inside its box on every map,
    concatenated over the maps. ``grids`` are the grids ``strides`` refer to; a map on another
    grid covers the same image, so the boxes are scaled by the ratio of the grids."""
    parts = []
    for feature, stride, (grid_h, grid_w) in zip(maps, strides, grids):
        h, w = feature.shape[-2:]
        scaled = rois.clone()
        scaled[:, 1::2] *= w / (grid_w * stride)
        scaled[:, 2::2] *= h / (grid_h * stride)
        # aligned=True: cell (r, c) is centred at (c + 0.5, r + 0.5) in units of the stride
        pooled = roi_align(feature.float(), scaled, output_size=(4, 4), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        vectors = pooled.mean((2, 3))  # [M, C]
        parts.append(F.normalize(vectors, dim=1) if normalize else vectors)
    return torch.cat(parts, 1)


def _pair_distances(embeddings: Tensor) -> Tensor:
    """Distances of every pair ``i < j`` of ``[M, D]`` embeddings, divided by their mean."""
    first, second = torch.triu_indices(len(embeddings), len(embeddings), 1, device=embeddings.device)
    # the tiny constant keeps the gradient finite for two identical embeddings
    distances = ((embeddings[first] - embeddings[second]).square().sum(1) + 1e-12).sqrt()
    return distances / distances.mean().clamp_min(1e-12)


def _triplet_cosines(embeddings: Tensor) -> Tensor:
    """Cosine of the angle at ``j`` of every triplet ``(i, j, k)`` of distinct objects."""
    m = len(embeddings)
    directions = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), dim=2)  # [M(j), M(i), D]: e_i - e_j
    cosines = torch.bmm(directions, directions.transpose(1, 2))  # [M(j), M(i), M(k)]
    index = torch.arange(m, device=embeddings.device)
    j, i, k = index.view(m, 1, 1), index.view(1, m, 1), index.view(1, 1, m)
    return cosines[(i != j) & (k != j) & (i != k)]


@register("relation", "feature", connector=None, levels="all")
def relation(
    student_maps: list[Tensor],
    teacher_maps: list[Tensor],
    *,
    gt_boxes: list[Tensor],
    strides: list[float],
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
    normalize: bool = True,
    max_objects: int = 128,
) -> Tensor:
    """Relational distillation between the ground-truth objects of the batch:
    ``distance_weight * L_distance + angle_weight * L_angle`` (the paper's 1 and 2).

    Inputs: one ``[N, C_l, H_l, W_l]`` map per paired level and model; the channel counts and
    grids of the two models may differ, since each model's relations are computed within it.
    ``gt_boxes`` one ``[M, 4]`` per image, ``strides`` the stride of each pair's teacher map
    (the student map of a pair covers the same image, so boxes are scaled to its grid).

    Embeddings: each object's features are averaged inside its box on every level
    (``torchvision.ops.roi_align``, 4x4 bins, adaptive sampling, ``aligned=True``), each
    level's vector is scaled to unit length (``normalize=True``, so every level counts alike
    whatever its feature scale) and the levels are concatenated. Concatenating, rather than
    taking one level chosen by box size as GID's FPN does, works for levels of different
    channel counts and gives every object the same embedding space.

    ``L_distance``: the Euclidean distances between the embeddings of every pair of objects,
    divided by their mean in each model, compared by smooth L1 (averaged over pairs).
    ``L_angle``: the cosine of the angle at ``j`` of every triplet ``(i, j, k)`` of distinct
    objects, compared by smooth L1 (averaged over triplets). The reference code averages over
    whole ``M x M`` and ``M x M x M`` tables, degenerate entries included (equal in both models),
    which only scales each term by ``(M - 1) / M`` and ``(M - 1)(M - 2) / M^2``.
    Objects are those of the whole batch: with fewer than 2 the value is 0 (in the graph), with
    2 only the distance term counts. Beyond ``max_objects`` (the angle term costs ``M^3``) a
    random subset is used, drawn from torch's global generator.

    Reference: Park et al., "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068);
    the relations between instances of a detector: Dai et al., "General Instance Distillation
    for Object Detection", CVPR 2021 (arXiv:2103.02340).
    """
    if not (len(student_maps) == len(teacher_maps) == len(strides)) or not student_maps:
        raise ValueError(f"relation: {len(student_maps)} student maps, {len(teacher_maps)} teacher maps and {len(strides)} "
                         f"strides; expected one of each per paired level")
    if max_objects < 3:
        raise ValueError(f"relation: max_objects must be at least 3 (the angle term needs triplets), got {max_objects}")
    n = teacher_maps[0].shape[0]
    if len(gt_boxes) != n:
        raise ValueError(f"relation: {len(gt_boxes)} box lists for a batch of {n} images")
    rois = _object_rois(gt_boxes, student_maps[0].device)  # [M, 5]
    if len(rois) > max_objects:
        rois = rois[torch.randperm(len(rois)).to(rois.device)[:max_objects]]
    if len(rois) < 2:
        return _zero(*student_maps)
    grids = [tuple(t.shape[-2:]) for t in teacher_maps]
    student_embeddings = _object_embeddings(student_maps, rois, strides, grids, normalize)
    teacher_embeddings = _object_embeddings(teacher_maps, rois, strides, grids, normalize)
    loss = distance_weight * F.smooth_l1_loss(_pair_distances(student_embeddings), _pair_distances(teacher_embeddings))
    if len(rois) >= 3:
        loss = loss + angle_weight * F.smooth_l1_loss(_triplet_cosines(student_embeddings), _triplet_cosines(teacher_embeddings))
    return loss


__all__ = ["FGDGlobal", "GlobalContext", "cwd", "fgd", "fgd_attention", "fgd_masks", "mgd", "mgd_generator", "pkd", "relation",
           "score_l2"]
