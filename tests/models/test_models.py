"""Every registered model family, on a few small backbones, gets the same checks: shapes and
strides, finite losses and gradients (images with no boxes included), decoding, ``describe()``,
determinism, a short training run that must lower the loss, and local backbone weights.
FCOS gets extra checks that its wiring matches torchvision's own ``FCOS``."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList

from kdet.config import ModelConfig
from kdet.models import MODELS, build_model
from kdet.models.fcos import FCOSDetector, decode_ltrb, unflatten_level
from kdet.structures import Detections

CLASS_NAMES = ["cell", "platelet"]



# every family x two small backbones, and one family on resnet18
# families built on kdet backbones; the ultralytics family builds its own network (tests/models/test_ultralytics.py)
FAMILIES = [family for family in MODELS.names() if family != "ultralytics"]
CASES = [(family, backbone) for family in FAMILIES for backbone in ("cspdarknet", "mobilenet_v3_small")]
CASES.append(("fcos", "resnet18"))


def build(family: str, backbone: str = "cspdarknet", input_size: int = 64, **overrides) -> torch.nn.Module:
    fields = dict(size="p", width=1.0 if backbone.startswith("resnet") else 0.5, anchors="default", fpn_channels=64)
    config = ModelConfig(family=family, backbone=backbone, **{**fields, **overrides})
    torch.manual_seed(0)
    return build_model(config, CLASS_NAMES, input_size)


def rectangles(size: int = 64) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two dark images with bright rectangles, and their targets (boxes scaled to ``size``)."""
    boxes = [torch.tensor([[8.0, 12, 40, 44]]), torch.tensor([[20.0, 8, 56, 36], [4, 40, 24, 60]])]
    labels = [torch.tensor([0]), torch.tensor([1, 0])]
    images = torch.full((2, 3, size, size), 0.1)
    targets = []
    for index, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        image_boxes = image_boxes * size / 64
        for x1, y1, x2, y2 in image_boxes.long().tolist():
            images[index, :, y1:y2, x1:x2] = 0.9
        targets.append({"boxes": image_boxes, "labels": image_labels})
    return images, targets


def no_boxes() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}


ids = [f"{family}-{backbone}" for family, backbone in CASES]


@pytest.mark.parametrize(("family", "backbone"), CASES, ids=ids)
@pytest.mark.parametrize("height,width", [(64, 64), (96, 128)])
def test_forward_features_and_head_shapes(family, backbone, height, width):
    model = build(family, backbone, input_size=max(height, width)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, height, width))
    assert model.family == family
    for name, stride in zip(("backbone.c3", "backbone.c4", "backbone.c5"), (8, 16, 32)):
        assert out.features[name].stride == stride
    neck = [name for name in out.features if name.startswith("neck.")]
    assert neck == [f"neck.{level.name}" for level in out.head]  # describe() pairs them in order
    for name, feature in out.features.items():
        grid = (math.ceil(height / feature.stride), math.ceil(width / feature.stride))
        assert tuple(feature.tensor.shape[-2:]) == grid, name
    for level in out.head:
        grid = (math.ceil(height / level.stride), math.ceil(width / level.stride))
        n, a = 2, level.num_anchors
        assert level.grid_size == grid
        classes = 0 if model.two_stage else len(CLASS_NAMES)  # a two-stage detector's levels are its RPN's
        assert level.num_classes == classes
        assert level.cls_logits.shape == (n, a, classes, *grid)
        assert level.box.shape == (n, a, 4, *grid)
        assert level.score is None or level.score.shape == (n, a, 1, *grid)
        assert level.box_format
        assert level.score_kind in {"objectness", "centerness"} if level.score is not None else level.score_kind is None
        assert level.anchors is None or level.anchors.shape == (a, 2)
    assert out.losses is None and out.loss is None and out.detections is None


@pytest.mark.parametrize(("family", "backbone"), CASES, ids=ids)
@pytest.mark.parametrize("empty", ["none", "one_image", "all_images"])
def test_losses_and_gradients_are_finite(family, backbone, empty):
    model = build(family, backbone).train()
    images, targets = rectangles()
    if empty == "one_image":
        targets[1] = no_boxes()
    elif empty == "all_images":
        targets = [no_boxes(), no_boxes()]
    out = model(images, targets)
    assert out.losses and all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values()), out.losses
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


DECODE_CASES = [pytest.param(family, backbone, id=f"{family}-{backbone}") for family, backbone in CASES]


@pytest.mark.parametrize(("family", "backbone"), DECODE_CASES)
def test_decode_gives_boxes_inside_the_image(family, backbone):
    model = build(family, backbone).eval()
    images, _ = rectangles()
    with torch.no_grad():
        out = model(images, decode=True, score_thresh=0.0, max_det=50)
    assert out.detections is not None and len(out.detections) == len(images)
    for det in out.detections:
        assert isinstance(det, Detections)
        assert 0 < len(det.boxes) <= 50
        assert det.boxes.shape == (len(det.scores), 4) and det.labels.shape == det.scores.shape
        assert det.labels.dtype == torch.int64
        assert ((det.labels >= 0) & (det.labels < len(CLASS_NAMES))).all()
        assert ((det.scores >= 0) & (det.scores <= 1)).all()
        assert torch.isfinite(det.boxes).all() and (det.boxes[:, 2:] >= det.boxes[:, :2]).all()
        assert (det.boxes >= 0).all() and (det.boxes[:, 0::2] <= images.shape[-1]).all() and (det.boxes[:, 1::2] <= images.shape[-2]).all()
    with torch.no_grad():
        strict = model(images, decode=True, score_thresh=0.99)
    assert all(len(det.boxes) == 0 or (det.scores > 0.99).all() for det in strict.detections)
    for det in out.detections:
        # the images are 64 x 64: no box may leave them
        assert (det.boxes >= 0).all() and (det.boxes <= 64).all(), det.boxes.aminmax()


@pytest.mark.parametrize(("family", "backbone"), CASES, ids=ids)
def test_describe_matches_forward(family, backbone):
    model = build(family, backbone).train()
    spec = model.describe((64, 96))
    assert model.training  # describe() puts the mode back
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 64, 96))
    assert spec.family == family and spec.class_names == tuple(CLASS_NAMES)
    assert [level.name for level in spec.levels] == [level.name for level in out.head]
    for level_spec, level in zip(spec.levels, out.head):
        assert level_spec.grid == level.grid_size and level_spec.stride == level.stride
        assert level_spec.channels == out.features[f"neck.{level.name}"].channels > 0
        assert level_spec.num_classes == (0 if spec.two_stage else len(CLASS_NAMES))


@pytest.mark.parametrize(("family", "backbone"), CASES, ids=ids)
def test_eval_forward_is_deterministic(family, backbone):
    model = build(family, backbone).eval()
    images, _ = rectangles()
    with torch.no_grad():
        first = model(images, decode=True)
        second = model(images, decode=True)
    for a, b in zip(first.head, second.head):
        assert torch.equal(a.cls_logits, b.cls_logits) and torch.equal(a.box, b.box)
    for a, b in zip(first.detections, second.detections):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize(("family", "backbone"), [("yolo", "cspdarknet"), ("fcos", "mobilenet_v3_small")])
def test_short_training_lowers_the_loss(family, backbone):
    model = build(family, backbone).train()
    images, targets = rectangles()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def test_every_family_is_covered():
    assert {family for family, _ in CASES} == set(FAMILIES) == set(MODELS.names()) - {"ultralytics"}


# ---------------------------------------------------------------------------------------------
# Local backbone weights
# ---------------------------------------------------------------------------------------------
def mobilenet_v3_small_half() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(width_mult=0.5)


# (family, backbone, torchvision network, key in its file, key in kdet's backbone): every
# family with MobileNetV3, one with ResNet-18 (kdet's backbone renumbers resnet's named stages)
WEIGHT_CASES = [
    (family, "mobilenet_v3_small", mobilenet_v3_small_half, "features.1.block.0.0.weight", "layers.1.block.0.0.weight")
    for family in FAMILIES
] + [("fcos", "resnet18", torchvision.models.resnet18, "layer2.0.conv1.weight", "layers.2.0.conv1.weight")]


@pytest.mark.parametrize(
    ("family", "backbone", "network", "file_key", "model_key"), WEIGHT_CASES, ids=[f"{c[0]}-{c[1]}" for c in WEIGHT_CASES]
)
def test_backbone_weights_from_a_local_file(tmp_path, family, backbone, network, file_key, model_key):
    torch.manual_seed(1)
    state = network().state_dict()
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    model = build(family, backbone, pretrained_backbone=str(path))
    assert torch.equal(model.backbone.state_dict()[model_key], state[file_key])
    assert not torch.equal(build(family, backbone).backbone.state_dict()[model_key], state[file_key])


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_backbone_weights_file_is_a_clear_error(tmp_path, family):
    wrong = tmp_path / "wrong.pth"
    torch.save({"not.a.layer": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="no tensor in .*wrong.pth matches"):
        build(family, "mobilenet_v3_small", pretrained_backbone=str(wrong))
    with pytest.raises(FileNotFoundError, match="missing.pth not found"):
        build(family, "mobilenet_v3_small", pretrained_backbone=str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# FCOS: kdet's wiring against torchvision's own FCOS
# ---------------------------------------------------------------------------------------------
def fcos_model(input_size: int = 128, **overrides) -> FCOSDetector:
    model = build("fcos", "mobilenet_v3_small", input_size=input_size, **overrides)
    assert isinstance(model, FCOSDetector)
    return model


def test_fcos_head_levels_are_torchvision_flat_outputs_reshaped():
    model = fcos_model().eval()
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        out = model(images)
        flat = model.head([out.features[f"neck.{level.name}"].tensor for level in out.head])
    # kdet's [N, A, K, H, W] per level -> torchvision's [N, H*W*A, K], levels concatenated
    refold = lambda maps: torch.cat([m.permute(0, 3, 4, 1, 2).reshape(2, -1, m.shape[2]) for m in maps], 1)  # noqa: E731
    assert torch.equal(refold([level.cls_logits for level in out.head]), flat["cls_logits"])
    assert torch.equal(refold([level.box for level in out.head]), flat["bbox_regression"])
    assert torch.equal(refold([level.score for level in out.head]), flat["bbox_ctrness"])
    assert [level.stride for level in out.head] == [8, 16, 32, 64, 128]
    assert [level.grid_size for level in out.head] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]


def test_unflatten_level_orders_rows_as_height_width_anchor():
    flat = torch.arange(2 * 3 * 4 * 2 * 5).view(2, 3 * 4 * 2, 5)  # N=2, H=3, W=4, A=2, K=5
    maps = unflatten_level(flat, 3, 4)
    assert maps.shape == (2, 2, 5, 3, 4)
    # row index (h * W + w) * A + a holds location (h, w) of anchor a
    assert torch.equal(maps[1, 1, :, 2, 3], flat[1, (2 * 4 + 3) * 2 + 1])


def test_fcos_anchors_match_torchvision_where_it_gets_strides_right():
    model = fcos_model()
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, 128, 128))
    features = [out.features[f"neck.{level.name}"].tensor for level in out.head]
    ours = torch.cat(model.anchors_per_level(features))
    theirs = model.anchor_generator(ImageList(torch.zeros(2, 3, 128, 128), [(128, 128)] * 2), features)
    assert torch.equal(ours, theirs[0]) and torch.equal(ours, theirs[1])
    # at 320 px P7 is 3x3; its points must lie 128 px apart (torchvision's own forward: 106)
    features = [torch.zeros(1, 64, s, s) for s in (40, 20, 10, 5, 3)]
    p7 = model.anchors_per_level(features)[-1]
    centres = (p7[:, :2] + p7[:, 2:]) / 2
    assert centres[:, 0].unique().tolist() == [0.0, 128.0, 256.0]
    assert ((p7[:, 2:] - p7[:, :2]) == 128).all()


def test_fcos_ltrb_decoding_matches_torchvision_box_coder():
    model = fcos_model()
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 128, 128))
    features = [out.features[f"neck.{level.name}"].tensor for level in out.head]
    for level, anchors in zip(out.head, model.anchors_per_level(features)):
        level.box = level.box + torch.rand_like(level.box)  # away from the ReLU's zeros
        boxes, scores = decode_ltrb(level)
        flat_box = level.box.permute(0, 3, 4, 1, 2).reshape(-1, 4)
        assert torch.allclose(boxes[0], model.torchvision_fcos.box_coder.decode(flat_box, anchors), atol=1e-4)
        assert scores.shape == (1, level.grid_size[0] * level.grid_size[1], len(CLASS_NAMES))


def test_fcos_losses_and_detections_equal_torchvision_forward():
    """The same images and targets through torchvision's FCOS.forward (fed kdet's normalised
    images, since it never sees kdet's normalisation) give the same losses and detections."""
    model = fcos_model()
    images, targets = rectangles(128)
    targets[1] = no_boxes()
    tv = model.torchvision_fcos
    normalised = list(model.normalize(images))
    model.train()
    tv.train()
    ours = model(images, targets)
    theirs = tv(normalised, targets)
    assert set(ours.losses) == {"cls", "box", "ctr"}
    for kdet_name, tv_name in (("cls", "classification"), ("box", "bbox_regression"), ("ctr", "bbox_ctrness")):
        assert torch.allclose(ours.losses[kdet_name], theirs[tv_name], rtol=1e-4, atol=1e-6), kdet_name
    assert torch.allclose(ours.loss, sum(theirs.values()), rtol=1e-4)
    model.eval()
    tv.eval()
    with torch.no_grad():
        ours = model(images, decode=True, score_thresh=0.05, nms_iou=0.5, max_det=20)
        theirs = tv(normalised)
    assert tv.score_thresh == 0.05 and tv.nms_thresh == 0.5 and tv.detections_per_img == 20
    for det, ref in zip(ours.detections, theirs):
        assert torch.allclose(det.boxes, ref["boxes"], atol=1e-3)
        assert torch.allclose(det.scores, ref["scores"], atol=1e-5)
        assert torch.equal(det.labels, ref["labels"])


def test_fcos_label_k_trains_class_channel_k():
    """torchvision's FCOS one-hot encodes labels over C channels with no background class, so
    kdet's 0-based labels are passed as they are."""
    model = fcos_model().train()
    images = torch.rand(1, 3, 128, 128)
    captured = {}
    model.head.register_forward_hook(lambda module, args, output: captured.update(output))
    # 64 px box centred on (48, 48): the P3 point at row 6, col 6 is a positive for it
    out = model(images, [{"boxes": torch.tensor([[16.0, 16, 80, 80]]), "labels": torch.tensor([1])}])
    (flat_grad,) = torch.autograd.grad(out.losses["cls"], captured["cls_logits"])  # [1, HWA, C]
    grad = unflatten_level(flat_grad[:, : 16 * 16], 16, 16)  # P3 comes first: [1, 1, C, 16, 16]
    assert grad[0, 0, 1, 6, 6] < 0  # raise the logit of the labelled class
    assert grad[0, 0, 0, 6, 6] > 0  # lower the other one


def test_fcos_rejects_bad_targets_and_channels():
    model = fcos_model().train()
    images = torch.rand(1, 3, 64, 64)
    box = torch.tensor([[4.0, 4, 30, 30]])
    with pytest.raises(ValueError, match=r"labels must lie in 0..1"):
        model(images, [{"boxes": box, "labels": torch.tensor([2])}])
    with pytest.raises(ValueError, match=r"shape \[M, 4\], got \(4,\)"):
        model(images, [{"boxes": box[0], "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="positive width and height"):
        model(images, [{"boxes": torch.tensor([[30.0, 4, 30, 20]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        model(torch.rand(2, 3, 64, 64), [no_boxes()])
    with pytest.raises(ValueError, match="fpn_channels is 48.*multiple of 32"):
        fcos_model(fpn_channels=48)


def test_fcos_without_extra_levels_has_p3_to_p5():
    model = fcos_model(extra_levels=False)
    images, targets = rectangles()
    out = model.train()(images, targets)
    assert [level.name for level in out.head] == ["p3", "p4", "p5"]
    assert [name for name in out.features if name.startswith("neck.")] == ["neck.p3", "neck.p4", "neck.p5"]
    assert torch.isfinite(out.loss)


def test_fcos_state_dict_names_each_parameter_once_and_copies_stay_wired():
    model = fcos_model()
    keys = list(model.state_dict())
    assert not any("torchvision_fcos" in key for key in keys)
    assert {key.split(".")[0] for key in keys} == {"backbone", "neck", "head"}
    clone = copy.deepcopy(model)  # what the EMA does
    assert clone.torchvision_fcos.head is clone.head and clone.head is not model.head
    assert clone.torchvision_fcos.backbone.fpn is clone.neck
    clone.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = model.eval()(images, decode=True).detections[0]
        b = clone.eval()(images, decode=True).detections[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_yolo_loss_gradient_stays_finite_when_a_predicted_box_collapses():
    """A size logit so negative that sigmoid underflows gives a box of height exactly 0; the
    CIoU's aspect term must not turn that into a NaN gradient."""
    from kdet.losses.yolo import YOLOv5Loss
    from kdet.structures import HeadLevel

    torch.manual_seed(0)
    box = torch.zeros(1, 1, 4, 4, 4)
    box[:, :, 1] = 2.944  # centre 1.4 cells below the corner: float32 spacing there is 1.2e-7
    box[:, :, 3] = -200.0  # height logit: sigmoid underflows to 0 in float32
    box.requires_grad_(True)
    cls = torch.zeros(1, 1, 2, 4, 4, requires_grad=True)
    score = torch.zeros(1, 1, 1, 4, 4, requires_grad=True)
    level = HeadLevel("p3", 8, cls, box, score, "objectness", "yolov5", torch.tensor([[10.0, 10.0]]))
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 14.0, 14.0]]), "labels": torch.tensor([1])}]
    losses = YOLOv5Loss(2)([level], targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (box, cls, score))
