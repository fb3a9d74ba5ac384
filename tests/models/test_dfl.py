"""The YOLO family's anchor-free DFL head (``model.head: dfl``): shapes and the box convention,
the task-aligned assigner and the Distribution Focal Loss on hand-computed tiny cases, the loss
on images with and without boxes, ``assign_from``, decoding, ONNX export, profiling, the
teacher cache's head parts, pairing with anchor-head and FCOS models, and one training epoch."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_config_dict
from test_models import CLASS_NAMES, no_boxes, rectangles

from kdet.config import DistillSettings, ModelConfig, TermConfig, validate_config
from kdet.distill.cache import CachedTeacher, group_layouts
from kdet.distill.pairing import ltrb_in_strides, pair
from kdet.engine.checkpoint import load_detector
from kdet.engine.export import ExportWrapper, export_onnx, ort_session, postprocess, read_metadata, run_session
from kdet.engine.profile import profile_model
from kdet.losses.dfl import (
    REG_MAX,
    DFLLoss,
    dfl_expectation,
    distribution_focal_loss,
    flatten_levels,
    task_aligned_assign,
)
from kdet.models import build_model
from kdet.models.yolo import dfl_boxes_and_scores
from kdet.structures import HeadLevel

SIZE = 64


def build_dfl(backbone: str = "cspdarknet", input_size: int = SIZE, seed: int = 0, **overrides):
    fields = dict(family="yolo", head="dfl", backbone=backbone, size="p", width=0.5)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**fields, **overrides}), CLASS_NAMES, input_size)


# ---------------------------------------------------------------------------------------------
# Building, shapes, the box convention
# ---------------------------------------------------------------------------------------------
def test_head_defaults_to_anchor_and_dfl_ignores_anchors():
    assert ModelConfig().head == "anchor"
    anchor = build_model(ModelConfig(size="p", anchors="default"), CLASS_NAMES, SIZE)
    assert anchor.head_kind == "anchor" and "anchors" in anchor.state_dict()
    # anchors are not needed (not even resolved from data) and not checked
    for anchors in ("auto", "default", [[[1.0, 2.0]]]):
        model = build_dfl(anchors=anchors)
        assert model.head_kind == "dfl" and "anchors" not in model.state_dict()
    with pytest.raises(ValueError, match="head of the yolo family"):
        build_model(ModelConfig(family="fcos", head="dfl", backbone="mobilenet_v3_small"), CLASS_NAMES, SIZE)


@pytest.mark.parametrize("backbone", ["cspdarknet", "mobilenet_v3_small"])
@pytest.mark.parametrize("height,width", [(64, 64), (96, 128)])
def test_forward_shapes_and_box_convention(backbone, height, width):
    model = build_dfl(backbone, max(height, width)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, height, width))
    assert [level.stride for level in out.head] == [8, 16, 32]
    for level in out.head:
        grid = (math.ceil(height / level.stride), math.ceil(width / level.stride))
        assert level.grid_size == grid and level.num_anchors == 1
        assert level.cls_logits.shape == (2, 1, len(CLASS_NAMES), *grid)
        assert level.box_dist.shape == (2, 1, 4, REG_MAX, *grid)
        assert level.box.shape == (2, 1, 4, *grid)
        assert level.score is None and level.score_kind is None and level.anchors is None
        assert level.box_format == "ltrb_center"
        # box is the expectation of the edge distributions, in [0, R - 1] strides
        assert torch.allclose(level.box, dfl_expectation(level.box_dist, dim=3))
        assert level.box.min() >= 0 and level.box.max() <= REG_MAX - 1
    spec = model.describe((height, width))
    assert all(s.box_format == "ltrb_center" and s.box_bins == REG_MAX and s.num_anchors == 1 for s in spec.levels)


def test_boxes_are_measured_from_cell_centres():
    """Distances of 1 stride on every side put a box of two strides around the cell centre
    ((col + 0.5) * s, (row + 0.5) * s); the distillation form measures from the corner."""
    dist = torch.full((1, 1, 4, REG_MAX, 2, 3), -30.0)
    dist[:, :, :, 1] = 30.0  # all mass on bin 1
    level = HeadLevel("p3", 8, torch.zeros(1, 1, 2, 2, 3), dfl_expectation(dist, 3), box_format="ltrb_center", box_dist=dist)
    boxes, scores = dfl_boxes_and_scores(level)
    assert boxes.shape == (1, 6, 4) and torch.allclose(scores, torch.full((1, 6, 2), 0.5))
    # row 1, column 2 (the last location): centre (20, 12)
    assert torch.allclose(boxes[0, 5], torch.tensor([12.0, 4.0, 28.0, 20.0]), atol=1e-4)
    corner = ltrb_in_strides(level)  # from (col, row) * stride = (16, 8): 0.5 left/above, 1.5 right/below
    assert torch.allclose(corner[0, 0, :, 1, 2], torch.tensor([0.5, 0.5, 1.5, 1.5]), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The assigner and DFL, by hand
# ---------------------------------------------------------------------------------------------
POINTS = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [20.0, 20.0]])


def test_task_aligned_assign_hand_checked():
    """One box [0, 0, 16, 16] of class 0; points 0-2 lie inside it, point 3 outside.
    metric = s^0.5 * IoU^6: point 0 0.5 * 1 = 0.5, point 1 0.9 * 0.5^6 = 0.0140625,
    point 2 0.6 * 0.5^6 = 0.009375. Top-2: points 0 and 1. Soft targets t / max t * max IoU:
    1.0 and 0.028125."""
    boxes = torch.tensor([[0.0, 0, 16, 16], [0, 0, 16, 8], [0, 0, 8, 16], [0, 0, 16, 16]])
    scores = torch.tensor([[0.25, 0.9], [0.81, 0.1], [0.36, 0.0], [1.0, 1.0]])
    result = task_aligned_assign(scores, boxes, POINTS, torch.tensor([[0.0, 0, 16, 16]]), torch.tensor([0]), topk=2)
    assert result.gt_index.tolist() == [0, 0, -1, -1]
    expected = torch.tensor([[1.0, 0.0], [0.028125, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(result.target_scores, expected, atol=1e-6)
    assert torch.allclose(result.metric, torch.tensor([0.5, 0.0140625, 0.0, 0.0]), atol=1e-7)
    # with top-10, every point inside is a positive, and none outside (point 3's box is perfect)
    wide = task_aligned_assign(scores, boxes, POINTS, torch.tensor([[0.0, 0, 16, 16]]), torch.tensor([0]), topk=10)
    assert wide.gt_index.tolist() == [0, 0, 0, -1]
    assert wide.target_scores[2, 0].item() == pytest.approx(0.009375 / 0.5)


@pytest.mark.parametrize(("box_at_point_1", "owner"), [([8.0, 0, 24, 16], 1), ([0.0, 0, 16, 16], 0)])
def test_a_location_claimed_by_two_boxes_goes_to_the_higher_iou(box_at_point_1, owner):
    """Point 1 (12, 4) lies inside A = [0, 0, 16, 16] and B = [8, 0, 24, 16]; its predicted box
    equals one of them (IoU 1) and overlaps the other by 1/3."""
    gt = torch.tensor([[0.0, 0, 16, 16], [8, 0, 24, 16]])
    boxes = torch.tensor([[0.0, 0, 16, 16], box_at_point_1, [0, 0, 16, 16], [16, 16, 24, 24]])
    scores = torch.full((4, 2), 0.5)
    result = task_aligned_assign(scores, boxes, POINTS, gt, torch.tensor([0, 1]), topk=10)
    assert result.gt_index.tolist() == [0, owner, 0, -1]
    # the winner's own best location: target 1 x best IoU 1, on its class
    assert result.target_scores[1, owner].item() == pytest.approx(1.0)
    assert result.target_scores[1, 1 - owner].item() == 0.0


def test_assigner_without_boxes_and_with_points_on_an_edge():
    scores, boxes = torch.full((4, 2), 0.5), torch.tensor([[0.0, 0, 16, 16]] * 4)
    empty = task_aligned_assign(scores, boxes, POINTS, torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long))
    assert (empty.gt_index == -1).all() and (empty.target_scores == 0).all()
    # point 0 (4, 4) is on the box's corner: not inside, so the box has no positive at all
    edge = task_aligned_assign(scores, boxes, POINTS, torch.tensor([[4.0, 4, 11, 11]]), torch.tensor([1]))
    assert (edge.gt_index == -1).all()


def test_distribution_focal_loss_and_expectation_hand_checked():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()
    assert dfl_expectation(logits, dim=0).item() == pytest.approx(2.0)
    loss = distribution_focal_loss(logits.expand(2, 4), torch.tensor([1.25, 3.0]))
    # y = 1.25 between bins 1 and 2: weights 0.75 and 0.25; y = 3 is limited to 2.99
    expected = [-(0.75 * math.log(0.2) + 0.25 * math.log(0.3)), -(0.01 * math.log(0.3) + 0.99 * math.log(0.4))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_loss_of_a_perfect_prediction_has_no_box_or_dfl_term():
    """A 32 px image, one 4x4 level of stride 8; every location predicts 1 stride on each side.
    The box [4, 4, 20, 20] has one cell centre inside it, (12, 12), whose prediction is exact."""
    dist = torch.full((1, 1, 4, REG_MAX, 4, 4), -30.0)
    dist[:, :, :, 1] = 30.0
    cls = torch.full((1, 1, 2, 4, 4), -5.0)
    level = HeadLevel("p3", 8, cls, dfl_expectation(dist, 3), box_format="ltrb_center", box_dist=dist)
    targets = [{"boxes": torch.tensor([[4.0, 4, 20, 20]]), "labels": torch.tensor([1])}]
    loss_fn = DFLLoss(2)
    (owner,) = loss_fn.assign([level], targets)
    assert owner.shape == (1, 1, 4, 4) and owner[0, 0, 1, 1] == 0 and (owner >= 0).sum() == 1
    losses = loss_fn([level], targets)
    assert losses["box"].item() == pytest.approx(0.0, abs=1e-5) and losses["dfl"].item() == pytest.approx(0.0, abs=1e-5)
    # the positive's class target is 1 (best IoU reached on the box), everything else 0
    background = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(-5.0), torch.tensor(0.0)).item()
    positive = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(-5.0), torch.tensor(1.0)).item()
    assert losses["cls"].item() == pytest.approx(31 * background + positive, rel=1e-5)
    assert loss_fn.weights(3, 320) == {"box": 7.5, "cls": 0.5, "dfl": 1.5}


# ---------------------------------------------------------------------------------------------
# The loss on a real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["none", "one_image", "all_images"])
def test_losses_and_gradients_are_finite(empty):
    model = build_dfl().train()
    images, targets = rectangles()
    if empty == "one_image":
        targets[1] = no_boxes()
    elif empty == "all_images":
        targets = [no_boxes(), no_boxes()]
    out = model(images, targets)
    assert set(out.losses) == {"box", "cls", "dfl"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values()), out.losses
    if empty == "all_images":
        assert out.losses["box"] == 0 and out.losses["dfl"] == 0
    else:
        assert out.losses["box"] > 0 and out.losses["dfl"] > 0
    weighted = 7.5 * out.losses["box"] + 0.5 * out.losses["cls"] + 1.5 * out.losses["dfl"]
    assert out.loss.item() == pytest.approx(weighted.item(), rel=1e-5)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    box_grads = [p.grad for p in model.head.box_branches.parameters()]
    assert (empty == "all_images") or any(g.abs().sum() > 0 for g in box_grads)


def test_assign_from_takes_the_positives_of_the_other_model():
    student, teacher = build_dfl(seed=0).train(), build_dfl(seed=1).eval()
    images, targets = rectangles()
    with torch.no_grad():
        teacher_head = teacher(images).head
    student_out = student(images, targets)
    own = student.loss_fn.assign(student_out.head, targets)
    taken = student.loss_fn.assign(student_out.head, targets, assign_from=teacher_head)
    assert all(a.shape == (2, 1, *level.grid_size) for a, level in zip(own, student_out.head))
    # the teacher's own assignment, not the student's
    reference = teacher.loss_fn.assign(teacher_head, targets)
    assert all(torch.equal(a, b) for a, b in zip(taken, reference))
    assert not all(torch.equal(a, b) for a, b in zip(own, taken))
    # through forward: the losses change, the student's own predictions give the default
    with_teacher = student(images, targets, assign_from=teacher_head)
    with_self = student(images, targets, assign_from=[replace(level) for level in student_out.head])
    assert with_self.loss.item() == pytest.approx(student_out.loss.item(), rel=1e-6)
    assert with_teacher.loss.item() != pytest.approx(student_out.loss.item(), rel=1e-3)
    with_teacher.loss.backward()  # gradients reach the student, the teacher has none
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.head.parameters())


def test_assign_from_is_checked_and_refused_by_other_heads():
    student = build_dfl().train()
    images, targets = rectangles()
    with torch.no_grad():
        head = student(images).head
    with pytest.raises(ValueError, match="levels of the trained head"):
        student(images, targets, assign_from=head[:2])
    anchor = build_model(ModelConfig(size="p", anchors="default"), CLASS_NAMES, SIZE).train()
    with pytest.raises(ValueError, match="assign_from needs model.head: dfl"):
        anchor(images, targets, assign_from=head)
    with torch.no_grad():
        anchor_head = anchor(images).head
    with pytest.raises(ValueError, match="one anchor per location"):
        student(images, targets, assign_from=anchor_head)
    fcos = build_model(ModelConfig(family="fcos", backbone="mobilenet_v3_small", width=0.5), CLASS_NAMES, SIZE).train()
    with pytest.raises(ValueError, match="FCOS assigns by location"):
        fcos(images, targets, assign_from=head)


def test_assignment_reads_fcos_levels_from_their_corner_points():
    """An FCOS-style level (box_format ltrb, from the cell corner) and the same boxes written from
    the cell centre give the same decoded boxes, hence the same assignment."""
    torch.manual_seed(0)
    centre = torch.rand(1, 1, 4, 8, 8) * 3 + 0.5
    cls = torch.randn(1, 1, 2, 8, 8)
    corner = centre + torch.tensor([-0.5, -0.5, 0.5, 0.5]).view(1, 1, 4, 1, 1)
    a = flatten_levels([HeadLevel("p3", 8, cls, centre, box_format="ltrb_center")])
    b = flatten_levels([HeadLevel("p3", 8, cls, corner, box_format="ltrb")])
    assert torch.allclose(a.boxes, b.boxes, atol=1e-5) and torch.equal(a.scores, b.scores)


def test_short_training_lowers_the_loss():
    model = build_dfl().train()
    images, targets = rectangles()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# Decoding, export, profile
# ---------------------------------------------------------------------------------------------
def test_decode_gives_class_probabilities_and_boxes_inside_the_image():
    model = build_dfl().eval()
    images, _ = rectangles()
    with torch.no_grad():
        out = model(images, decode=True, score_thresh=0.0, max_det=50)
    best = max(level.cls_logits.sigmoid().max().item() for level in out.head)
    for det in out.detections:
        assert 0 < len(det.boxes) <= 50 and det.labels.dtype == torch.int64
        assert (det.boxes >= 0).all() and (det.boxes <= SIZE).all()
        assert (det.boxes[:, 2:] >= det.boxes[:, :2]).all()
        assert det.scores.max().item() <= best + 1e-6


def calibrated(model):
    """BatchNorm statistics from random images, so scores spread as in a trained model."""
    images = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


@pytest.mark.parametrize("opset", [17, 11])
def test_onnx_export_matches_pytorch(tmp_path, opset):
    model = calibrated(build_dfl())
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    report = export_onnx(model, SIZE, tmp_path / "dfl.onnx", dynamic_batch=True, opset=opset, verify_with=x)
    assert report.max_box_diff <= 1e-2 and report.max_score_diff <= 1e-4
    assert report.num_boxes == 8 * 8 + 4 * 4 + 2 * 2
    assert read_metadata(report.path)["kdet.scores"].startswith("scores: float32 [N, K, C] per class (class probability)")
    boxes, scores = run_session(ort_session(report.path, threads=1), x)
    with torch.no_grad():
        torch_boxes, torch_scores = ExportWrapper(model, SIZE)(x)
        reference = model(x, decode=True, score_thresh=0.01, max_det=100).detections
    assert np.abs(boxes - torch_boxes.numpy()).max() <= 1e-2 and np.abs(scores - torch_scores.numpy()).max() <= 1e-4
    for ours, theirs in zip(postprocess(boxes, scores, 0.01, 0.6, 100), reference):
        assert torch.equal(ours.labels, theirs.labels)
        assert torch.allclose(ours.boxes, theirs.boxes, atol=1e-2) and torch.allclose(ours.scores, theirs.scores, atol=1e-4)


def test_profile_counts_the_dfl_head():
    model = build_dfl().eval()
    dfl = profile_model(model, SIZE, runs=2, threads=1)
    anchor_model = build_model(ModelConfig(size="p", width=0.5, anchors="default"), CLASS_NAMES, SIZE)
    anchor = profile_model(anchor_model, SIZE, runs=2, threads=1)
    assert dfl.params == sum(p.numel() for p in model.parameters()) and dfl.flops > anchor.flops > 0
    assert dfl.latency_ms_median > 0


# ---------------------------------------------------------------------------------------------
# Distillation plumbing: the teacher cache and pairing
# ---------------------------------------------------------------------------------------------
class _RowsOf:
    """Stands in for a TeacherCache: returns the rows of one teacher output."""

    def __init__(self, output, groups):
        self.rows = {name: group.rows(output) for name, group in groups.items()}

    def read(self, group, view, indices):
        return self.rows[group.name][indices]


def test_teacher_cache_stores_and_restores_the_edge_distributions():
    teacher = build_dfl().eval()
    images, _ = rectangles()
    with torch.no_grad():
        output = teacher(images)
    groups = group_layouts(output, ["head"])
    names = [array.name for array in groups["head"].arrays]
    assert names == [f"{level}.{part}" for level in ("p3", "p4", "p5") for part in ("cls_logits", "box", "box_dist")]
    cached = CachedTeacher(_RowsOf(output, groups), groups, None, output).outputs([1, 0], 1, torch.device("cpu"))
    for restored, live in zip(cached.head, output.head):
        assert restored.score is None and restored.box_format == "ltrb_center"
        assert torch.equal(restored.box_dist, live.box_dist[[1, 0]]) and torch.equal(restored.box, live.box[[1, 0]])


def spec_of(config: ModelConfig):
    torch.manual_seed(0)
    return build_model(config, CLASS_NAMES, SIZE).describe((SIZE, SIZE))


DFL = ModelConfig(head="dfl", size="p")
ANCHOR = ModelConfig(size="t", anchors="default")
FCOS = ModelConfig(family="fcos", backbone="resnet18", fpn_channels=64)


@pytest.mark.parametrize(
    ("teacher", "student"), [(ANCHOR, DFL), (DFL, ANCHOR), (FCOS, DFL)], ids=["anchor-dfl", "dfl-anchor", "fcos-dfl"]
)
def test_pairing_with_other_heads_decodes_boxes_and_refuses_raw_maps(teacher, student):
    terms = [TermConfig(loss="objectness_scaled"), TermConfig(loss="kl"), TermConfig(loss="l2_logits")]
    report = pair(spec_of(teacher), spec_of(student), DistillSettings(terms=terms))
    assert [plan.box_space for plan in report.terms[:2]] == ["decoded", "decoded"]
    assert report.terms[0].level_pairs == [(0, 0), (1, 1), (2, 2)]
    (error,) = report.errors
    assert "l2_logits" in error and ("encode boxes differently" in error or "families differ" in error)
    assert "model.anchors" not in error


def test_pairing_two_dfl_heads_compares_raw_maps():
    terms = [TermConfig(loss="l2_logits"), TermConfig(loss="objectness_scaled")]
    report = pair(spec_of(ModelConfig(head="dfl", size="t")), spec_of(DFL), DistillSettings(terms=terms))
    assert report.ok and [plan.box_space for plan in report.terms] == ["raw", "raw"]


# ---------------------------------------------------------------------------------------------
# One training epoch through the trainer, and the checkpoint it writes
# ---------------------------------------------------------------------------------------------
def test_one_training_epoch_with_the_trainer(shapes_voc, tmp_path):
    from kdet.engine.trainer import train

    config = tiny_config_dict(shapes_voc, epochs=1)
    config["model"]["head"] = "dfl"
    results = train(validate_config(config), tmp_path / "run", log=lambda _: None, progress=False)
    assert results
    model, payload = load_detector(tmp_path / "run" / "best.pt")
    assert model.head_kind == "dfl" and payload["model_config"]["head"] == "dfl"
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64), decode=True)
    assert out.detections is not None and out.head[0].box_dist is not None


def test_compare_names_the_dfl_head():
    from kdet.distill.compare import model_name

    model = {"family": "yolo", "backbone": "cspdarknet", "size": "t"}
    assert model_name(model) == model_name({**model, "head": "anchor"}) == "yolo cspdarknet-t"
    assert model_name({**model, "head": "dfl"}) == "yolo cspdarknet-t dfl"
