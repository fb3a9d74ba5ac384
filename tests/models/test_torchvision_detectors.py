"""torchvision's RetinaNet and Faster R-CNN behind kdet's interface: the same losses and
detections as torchvision's own forward, box deltas decoded as torchvision's BoxCoder does,
RetinaNet distilling in both roles and exporting to ONNX, and a two-stage teacher that feeds the
feature terms and its RPN objectness while kdet check refuses the response terms with the reason."""
from __future__ import annotations

import pytest
import torch

from kdet.config import ModelConfig
from kdet.distill.pairing import ltrb_in_strides, pair
from kdet.engine.export import ExportWrapper, export_onnx
from kdet.models import build_model
from kdet.models.torchvision_detectors import anchors_at_strides, decode_deltas
from conftest import distil_one_step, kd_terms as terms, two_box_batch as batch

CLASSES = ["cell", "platelet"]
SIZE = 64


def build(family: str, backbone: str = "cspdarknet", size: int = SIZE, **fields):
    torch.manual_seed(0)
    return build_model(ModelConfig(family=family, backbone=backbone, size="p", anchors="default", fpn_channels=64, **fields),
                       CLASSES, size)


def test_retinanet_losses_and_detections_equal_torchvision_forward():
    model = build("retinanet", size=128)
    images, targets = batch(128)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tv = model.torchvision_retinanet
    normalised = list(model.normalize(images))
    model.train(), tv.train()
    ours, theirs = model(images, targets), tv(normalised, targets)
    assert torch.allclose(ours.losses["cls"], theirs["classification"], rtol=1e-4)
    assert torch.allclose(ours.losses["box"], theirs["bbox_regression"], rtol=1e-4, atol=1e-7)
    model.eval(), tv.eval()
    with torch.no_grad():
        ours, theirs = model(images, decode=True, score_thresh=0.05, nms_iou=0.5, max_det=20), tv(normalised)
    for det, ref in zip(ours.detections, theirs):
        assert torch.allclose(det.boxes, ref["boxes"], atol=1e-3) and torch.equal(det.labels, ref["labels"])


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_deltas_decode_as_torchvision_box_coder(family):
    model = build(family).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, SIZE, SIZE))
    features = [out.features[f"neck.{level.name}"].tensor for level in out.head]
    anchors = anchors_at_strides(model.anchor_generator, features, [level.stride for level in out.head])
    coder = model.torchvision_retinanet.box_coder if family == "retinanet" else model.rpn.box_coder
    for level, level_anchors in zip(out.head, anchors):
        level.box.normal_(0, 0.5)
        flat = level.box.permute(0, 3, 4, 1, 2).reshape(-1, 4)  # rows (H, W, A) as torchvision's
        expected = coder.decode_single(flat, level_anchors)
        assert torch.allclose(decode_deltas(level).permute(0, 3, 4, 1, 2).reshape(-1, 4), expected, atol=1e-3)
        # the shared box form of the response terms: edge distances from the cell's corner point, in strides
        ltrb = ltrb_in_strides(level).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        points = level_anchors.view(-1, 2, 2).mean(1).repeat(1, 2)
        assert torch.allclose(ltrb * level.stride * torch.tensor([-1, -1, 1, 1]) + points, expected, atol=1e-3)


def test_faster_rcnn_losses_detections_and_class_mapping():
    model = build("faster_rcnn").train()
    images, targets = batch()
    out = model(images, targets)
    assert set(out.losses) == {"rpn_obj", "rpn_box", "cls", "box"} and torch.isfinite(out.loss)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        detections = model(images, decode=True, score_thresh=0.0).detections
    labels = torch.cat([d.labels for d in detections])
    assert len(labels) and labels.min() >= 0 and labels.max() < len(CLASSES)  # torchvision's background class mapped away
    spec = model.describe((SIZE, SIZE))
    assert spec.two_stage and [level.stride for level in spec.levels] == [8, 16, 32, 64]


def test_two_stage_teacher_feeds_features_and_rpn_objectness_and_refuses_response_terms():
    teacher, student = build("faster_rcnn"), build("yolo")
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)),
                  terms("objectness_scaled", "kl", "pkd", "score_l2"))
    assert "faster_rcnn teacher is two-stage: it feeds feature terms" in " ".join(report.notes)
    assert len(report.errors) == 2
    for error, loss in zip(report.errors, ("objectness_scaled", "kl")):
        assert f"distill.terms.{'01'[loss == 'kl']} ({loss})" in error and "belong to region proposals" in error
        assert "score_l2, which reads that objectness" in error
    losses = distil_one_step(teacher, student, terms("pkd", "score_l2"))
    assert {"kd0_pkd", "kd1_score_l2"} <= set(losses)


@pytest.mark.parametrize(("teacher_family", "student_family", "names"), [
    ("retinanet", "yolo", ("objectness_scaled", "kl", "pkd")),
    ("yolo", "retinanet", ("objectness_scaled", "kl", "soft_bce", "pkd")),
    ("fcos", "retinanet", ("objectness_scaled", "kl", "pkd")),
    ("retinanet", "retinanet", ("l2_logits", "objectness_scaled")),
])
def test_retinanet_distils_as_teacher_and_as_student(teacher_family, student_family, names):
    teacher = build(teacher_family, size="t") if teacher_family == "yolo" else build(teacher_family)
    losses = distil_one_step(teacher, build(student_family, backbone="mobilenet_v3_small", width=0.5), terms(*names))
    assert all(torch.isfinite(value) for value in losses.values())


def test_retinanet_exports_to_onnx_matching_pytorch(tmp_path):
    model = build("retinanet").eval()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, SIZE, tmp_path / "retinanet.onnx", dynamic_batch=True, verify_with=images)
    assert report.max_box_diff <= 1e-2 and report.max_score_diff <= 1e-4
    assert report.num_boxes == sum(9 * (SIZE // s) ** 2 for s in (8, 16, 32)) + 2 * 9  # p6, p7: 1x1
    with pytest.raises(ValueError, match="two-stage detector"):
        ExportWrapper(build("faster_rcnn"), SIZE)
