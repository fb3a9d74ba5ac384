"""The feature- and relation-based losses of :mod:`kdet.distill.feature_losses`: what each asks
the distiller for, the common contract (finite scalar, gradients to the student and the loss's
own module but never the teacher, zero for equal maps where that holds, images with no boxes),
then each formula against hand arithmetic on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdet.distill import feature_losses
from kdet.distill.feature_losses import FGDGlobal, fgd_attention, fgd_masks
from kdet.distill.losses import DISTILL_LOSSES

# every loss of kdet.distill.feature_losses; the losses of kdet.distill.losses (which take no
# context) get the common checks in test_losses.py
NAMES = [name for name in DISTILL_LOSSES.names() if DISTILL_LOSSES.get(name).fn.__module__ == "kdet.distill.feature_losses"]
SHAPE = (2, 8, 4, 4)  # N, C, H, W at stride 8: 32 x 32 pixel images
STRIDE = 8
BOXES = [torch.tensor([[4.0, 4.0, 20.0, 12.0]]), torch.tensor([[0.0, 0.0, 8.0, 8.0], [12.0, 10.0, 31.0, 30.0]])]
RELATION_BOXES = [torch.tensor([[1.0, 1.0, 14.0, 9.0], [16.0, 2.0, 30.0, 30.0]]),
                  torch.tensor([[0.0, 0.0, 8.0, 8.0], [9.0, 12.0, 31.0, 28.0]])]


def entry(name: str):
    return DISTILL_LOSSES.get(name)


def random_map(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def context(name: str, seed: int = 0) -> dict:
    """What the distiller would pass ``name`` besides the maps (its module freshly built)."""
    torch.manual_seed(seed)  # the modules' initialisation
    quality = torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(seed + 100))
    if name == "relation":
        return {"gt_boxes": RELATION_BOXES, "strides": [8, 16]}
    values = {"gt_boxes": BOXES, "stride": STRIDE, "teacher_quality": quality}
    out = {k: v for k, v in values.items() if k in entry(name).context}
    if entry(name).module is not None:
        out["module"] = entry(name).module(SHAPE[1], SHAPE[1])
    return out


def maps(name: str, seed: int, requires_grad: bool = False) -> list[torch.Tensor] | torch.Tensor:
    """One ``[N, C, H, W]`` map, or for ``relation`` two levels (stride 8 and 16) whose channel
    counts differ from the other model's."""
    if name == "relation":
        channels = (6, 10) if seed % 2 else (8, 16)
        return [random_map(seed, (2, channels[0], 4, 4)).requires_grad_(requires_grad),
                random_map(seed + 50, (2, channels[1], 2, 2)).requires_grad_(requires_grad)]
    return random_map(seed).requires_grad_(requires_grad)


def leaves(x) -> list[torch.Tensor]:
    return x if isinstance(x, list) else [x]


def detached(x):
    return [t.detach() for t in x] if isinstance(x, list) else x.detach()


def call(name: str, student, teacher, **overrides) -> torch.Tensor:
    return entry(name).fn(student, teacher, **{**context(name), **overrides})


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------
def test_registered_entries_ask_for_their_context():
    assert sorted(NAMES) == sorted(["pkd", "cwd", "mgd", "fgd", "score_l2", "relation"])
    assert {"gt_boxes", "stride", "module"} <= set(entry("fgd").context)
    assert entry("mgd").context == ["module"]
    assert entry("score_l2").context == ["teacher_quality", "mask"]
    assert entry("pkd").context == ["mask"] and entry("cwd").context == []
    assert [n for n in NAMES if entry(n).supports_mask] == ["pkd", "score_l2"]
    assert entry("relation").levels == "all" and entry("relation").connector is None
    assert set(entry("relation").context) == {"gt_boxes", "strides"}
    assert all(entry(n).levels == "each" and entry(n).connector == "conv" for n in NAMES if n != "relation")
    assert entry("fgd").arguments == ["temp", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd"]
    assert entry("mgd").arguments == ["alpha_mgd", "lambda_mgd"]
    assert entry("relation").arguments[:2] == ["distance_weight", "angle_weight"]


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_cites_its_paper_and_gives_shapes(name):
    doc = entry(name).fn.__doc__
    assert "Reference:" in doc and "[N, C" in doc


def test_module_builders_work_on_the_teacher_channels():
    generator = entry("mgd").module(4, 16)
    assert [tuple(m.weight.shape) for m in generator if isinstance(m, nn.Conv2d)] == [(16, 16, 3, 3)] * 2
    blocks = entry("fgd").module(4, 16)
    assert isinstance(blocks, FGDGlobal)
    assert blocks.student.context.in_channels == blocks.teacher.context.in_channels == 16
    assert blocks.student.transform[0].out_channels == 8
    x = random_map(0, (2, 16, 3, 3))
    assert torch.equal(blocks.student(x), x) and torch.equal(blocks.teacher(x), x)  # the identity until trained


# ---------------------------------------------------------------------------------------------
# Common contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_value_is_a_finite_positive_scalar(name):
    value = call(name, maps(name, 0), maps(name, 1))
    assert value.dim() == 0 and torch.isfinite(value) and value > 0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_student_and_the_module_never_the_teacher(name):
    student, teacher = maps(name, 0, requires_grad=True), maps(name, 1, requires_grad=True)
    extra = context(name)
    entry(name).fn(student, detached(teacher), **extra).backward()
    assert all(t.grad is None for t in leaves(teacher))
    for s in leaves(student):
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    if "module" in extra:
        grads = [p.grad for p in extra["module"].parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_fgd_trains_both_global_context_blocks():
    student, teacher = maps("fgd", 0, requires_grad=True), maps("fgd", 1)
    extra = context("fgd")
    entry("fgd").fn(student, teacher, **extra).backward()
    for block in (extra["module"].student, extra["module"].teacher):
        assert block.transform[-1].weight.grad.abs().sum() > 0  # the zero-initialised last conv learns first


@pytest.mark.parametrize("name", ["pkd", "cwd", "fgd", "score_l2", "relation"])
def test_zero_when_student_equals_teacher(name):
    teacher = maps(name, 3)
    student = [t.clone() for t in teacher] if name == "relation" else teacher.clone()
    assert torch.allclose(call(name, student, teacher), torch.zeros(()), atol=1e-6)


def test_mgd_is_not_zero_for_equal_maps():
    """The generator has to rebuild the teacher from a masked map: nothing to copy."""
    teacher = maps("mgd", 3)
    assert call("mgd", teacher.clone(), teacher) > 0


@pytest.mark.parametrize("name", ["cwd", "fgd"])
def test_value_on_a_batch_is_the_mean_over_its_images(name):
    student, teacher = maps(name, 0), maps(name, 1)
    extra = context(name)
    value = entry(name).fn(student, teacher, **extra)
    per_image = []
    for i in range(2):
        single = {**extra, "gt_boxes": extra["gt_boxes"][i : i + 1]} if "gt_boxes" in extra else extra
        per_image.append(entry(name).fn(student[i : i + 1], teacher[i : i + 1], **single))
    assert torch.allclose(value, torch.stack(per_image).mean(), rtol=1e-5)


@pytest.mark.parametrize("name", ["fgd", "relation"])
def test_images_without_boxes_work(name):
    student, teacher = maps(name, 0, requires_grad=True), maps(name, 1)
    no_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    value = call(name, student, teacher, gt_boxes=no_boxes)
    assert torch.isfinite(value) and value.requires_grad
    value.backward()
    assert all(torch.isfinite(s.grad).all() for s in leaves(student))
    if name == "fgd":  # only background: the foreground weight has nothing to weigh
        assert torch.allclose(call(name, student, teacher, gt_boxes=no_boxes, alpha_fgd=1.0), value)
    else:  # no objects, no relations
        assert value == 0


@pytest.mark.parametrize("name", ["pkd", "score_l2"])
def test_mask_without_any_location_gives_zero(name):
    student, teacher = maps(name, 0, requires_grad=True), maps(name, 1)
    value = call(name, student, teacher, mask=torch.zeros(SHAPE[0], 1, *SHAPE[2:]))
    assert value == 0 and value.requires_grad
    value.backward()
    assert torch.isfinite(student.grad).all()


def test_bad_arguments_raise_value_error():
    student, teacher = maps("cwd", 0), maps("cwd", 1)
    with pytest.raises(ValueError, match="tau must be positive, got 0"):
        call("cwd", student, teacher, tau=0)
    with pytest.raises(ValueError, match=r"lambda_mgd .* in \[0, 1\]; got 1.5"):
        call("mgd", student, teacher, lambda_mgd=1.5)
    with pytest.raises(ValueError, match="temp must be positive"):
        call("fgd", student, teacher, temp=0.0)
    with pytest.raises(ValueError, match="1 box lists for a batch of 2 images"):
        call("fgd", student, teacher, gt_boxes=BOXES[:1])
    with pytest.raises(ValueError, match="at least 2 channels, got 1"):
        entry("fgd").module(1, 1)
    with pytest.raises(ValueError, match=r"pkd: student map \(2, 8, 4, 4\) and teacher map \(2, 4, 4, 4\)"):
        call("pkd", student, random_map(1, (2, 4, 4, 4)))
    with pytest.raises(ValueError, match="2 student maps, 1 teacher maps and 2 strides"):
        call("relation", maps("relation", 0), maps("relation", 1)[:1])
    with pytest.raises(ValueError, match="max_objects must be at least 3"):
        call("relation", maps("relation", 0), maps("relation", 1), max_objects=2)


# ---------------------------------------------------------------------------------------------
# PKD
# ---------------------------------------------------------------------------------------------
def channels(*rows: list[float]) -> torch.Tensor:
    """One image, one channel per row, a 1 x L grid."""
    return torch.tensor(rows).view(1, len(rows), 1, len(rows[0]))


def test_pkd_is_one_minus_the_pearson_correlation_per_channel():
    # channel 0: deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5): r = 4 / 5
    # channel 1: the student's is the teacher's negated: r = -1
    student = channels([1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 0.0, 2.0])
    teacher = channels([1.0, 3.0, 2.0, 4.0], [-5.0, -1.0, 0.0, -2.0])
    expected = ((1 - 0.8) + (1 - -1.0)) / 2
    assert entry("pkd").fn(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_pkd_is_zero_for_any_positive_affine_rescaling_per_channel():
    teacher = random_map(4)
    scale = torch.tensor([0.01, 0.5, 1.0, 3.0, 7.0, 10.0, 100.0, 2.0]).view(1, 8, 1, 1)
    shift = torch.linspace(-50, 50, 8).view(1, 8, 1, 1)
    assert entry("pkd").fn(teacher * scale + shift, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert entry("pkd").fn(-teacher, teacher).item() == pytest.approx(2.0, rel=1e-5)


def test_pkd_mask_correlates_the_masked_locations_only():
    # the first four locations are those of the by-hand example above (r = 0.8); the last two
    # are outside the mask and may hold anything
    student = channels([1.0, 2.0, 3.0, 4.0, 100.0, -7.0])
    teacher = channels([1.0, 3.0, 2.0, 4.0, -9.0, 50.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 6)
    assert entry("pkd").fn(student, teacher, mask=mask).item() == pytest.approx(0.2, rel=1e-5)
    assert entry("pkd").fn(student, teacher).item() > 0.5  # without the mask the outliers count


# ---------------------------------------------------------------------------------------------
# CWD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cwd_by_hand_on_a_two_location_map(tau):
    student, teacher = channels([0.0, 1.0]), channels([1.0, 0.0])  # one image, one channel, a 1 x 2 grid
    p_t, p_s = softmax([1.0 / tau, 0.0]), softmax([0.0, 1.0 / tau])
    expected = tau**2 * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    assert entry("cwd").fn(student, teacher, tau=tau).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_averages_channels_and_ignores_a_constant_per_channel():
    student, teacher = channels([0.0, 1.0], [3.0, 3.0]), channels([1.0, 0.0], [-2.0, -2.0])
    p_t, p_s = softmax([1.0, 0.0]), softmax([0.0, 1.0])
    first = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    assert entry("cwd").fn(student, teacher).item() == pytest.approx(first / 2, rel=1e-5)  # channel 2 agrees
    teacher = random_map(2)
    assert entry("cwd").fn(teacher + torch.randn(1, 8, 1, 1), teacher).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# MGD
# ---------------------------------------------------------------------------------------------
def test_mgd_by_hand_with_an_identity_generator():
    student, teacher = random_map(0), random_map(1)
    torch.manual_seed(7)
    value = entry("mgd").fn(student, teacher, module=nn.Identity(), alpha_mgd=0.5, lambda_mgd=0.4)
    torch.manual_seed(7)  # the mask comes from the global generator: the same draw again
    keep = (torch.rand(2, 1, 4, 4) <= 0.6).float()
    expected = 0.5 * (student * keep - teacher).square().sum() / 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mgd_masks_the_given_share_of_locations_and_replays_with_the_seed():
    n, c, h, w = 2, 3, 64, 64
    ones, zeros = torch.ones(n, c, h, w), torch.zeros(n, c, h, w)
    mgd = entry("mgd").fn
    # an identity generator against a zero teacher: the value counts the kept elements
    kept = mgd(ones, zeros, module=nn.Identity(), alpha_mgd=1.0) * n / (n * c * h * w)
    assert kept.item() == pytest.approx(1 - 0.65, abs=0.02)
    assert mgd(ones, zeros, module=nn.Identity(), alpha_mgd=1.0, lambda_mgd=0.0) * n == n * c * h * w
    assert mgd(ones, zeros, module=nn.Identity(), alpha_mgd=1.0, lambda_mgd=1.0) == 0
    student, teacher, generator = random_map(0), random_map(1), entry("mgd").module(8, 8)
    torch.manual_seed(3)
    first = mgd(student, teacher, module=generator)
    torch.manual_seed(3)
    assert mgd(student, teacher, module=generator) == first
    assert mgd(student, teacher, module=generator) != first  # the next draw masks other locations


# ---------------------------------------------------------------------------------------------
# FGD
# ---------------------------------------------------------------------------------------------
def test_fgd_masks_on_a_4x4_grid_with_one_box():
    # stride 8: x 4..20 overlaps columns 0, 1, 2 and y 4..12 rows 0, 1: six cells of 1/6
    foreground, background = fgd_masks([torch.tensor([[4.0, 4.0, 20.0, 12.0]])], 8, (4, 4))
    expected = torch.zeros(4, 4)
    expected[0:2, 0:3] = 1 / 6
    assert foreground.shape == background.shape == (1, 1, 4, 4)
    assert torch.allclose(foreground[0, 0], expected)
    assert torch.allclose(background[0, 0], (expected == 0).float() / 10)
    assert background.sum().item() == pytest.approx(1.0)


def test_fgd_masks_keep_the_larger_value_where_boxes_overlap_and_clip_to_the_grid():
    boxes = torch.tensor([[4.0, 4.0, 20.0, 12.0], [0.0, 0.0, 8.0, 8.0], [25.0, 17.0, 60.0, 40.0]])
    foreground, background = fgd_masks([boxes, torch.zeros(0, 4)], 8, (4, 4))
    expected = torch.zeros(4, 4)
    expected[0:2, 0:3] = 1 / 6
    expected[0, 0] = 1.0  # the one-cell box
    expected[2:4, 3] = 1 / 2  # clipped to the grid: two cells left
    assert torch.allclose(foreground[0, 0], expected)
    assert torch.allclose(background[0, 0], (expected == 0).float() / 8)  # 16 - 6 - 2 cells
    # the image without boxes is all background
    assert not foreground[1].any() and torch.allclose(background[1], torch.full((1, 4, 4), 1 / 16))


def test_fgd_attention_by_hand():
    # one image, two channels, a 1 x 2 grid: |F| channel means (1.5, 1.5), location means (2, 1)
    feature = channels([1.0, -3.0], [2.0, 0.0])
    spatial, channel = fgd_attention(feature, 0.5)
    assert spatial.shape == (1, 1, 1, 2) and channel.shape == (1, 2, 1, 1)
    assert torch.allclose(spatial.flatten(), torch.tensor([1.0, 1.0]))
    assert torch.allclose(channel.flatten(), 2 * torch.tensor(softmax([2 / 0.5, 1 / 0.5])))


def test_fgd_by_hand():
    # one image, two channels, a 2 x 2 grid at stride 8; one box on the top-left cell
    s = [[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.0, 3.0]]  # per channel, locations row by row
    t = [[0.0, 1.0, 1.0, -1.0], [1.5, 0.5, -2.0, 1.0]]
    student, teacher = torch.tensor(s).view(1, 2, 2, 2), torch.tensor(t).view(1, 2, 2, 2)
    temp = 0.5

    def attention(m):
        spatial = [4 * p for p in softmax([(abs(m[0][i]) + abs(m[1][i])) / 2 / temp for i in range(4)])]
        channel = [2 * p for p in softmax([sum(abs(v) for v in m[c]) / 4 / temp for c in range(2)])]
        return spatial, channel

    (ss, sc), (ts, tc) = attention(s), attention(t)
    foreground, background = [1.0, 0.0, 0.0, 0.0], [0.0, 1 / 3, 1 / 3, 1 / 3]
    weighted = [[ts[i] * tc[c] * (s[c][i] - t[c][i]) ** 2 for i in range(4)] for c in range(2)]
    fg = sum(weighted[c][i] * foreground[i] for c in range(2) for i in range(4))
    bg = sum(weighted[c][i] * background[i] for c in range(2) for i in range(4))
    attention_loss = sum(abs(a - b) for a, b in zip(sc, tc)) + sum(abs(a - b) for a, b in zip(ss, ts))
    global_loss = sum((s[c][i] - t[c][i]) ** 2 for c in range(2) for i in range(4))  # new blocks: the identity
    module = FGDGlobal(2, 2)
    value = entry("fgd").fn(student, teacher, gt_boxes=[torch.tensor([[0.0, 0.0, 8.0, 8.0]])], stride=8, module=module,
                            alpha_fgd=1.0, beta_fgd=10.0, gamma_fgd=100.0, lambda_fgd=1000.0)
    expected = fg + 10 * bg + 100 * attention_loss + 1000 * global_loss
    assert value.item() == pytest.approx(expected, rel=1e-5)
    defaults = entry("fgd").fn(student, teacher, gt_boxes=[torch.tensor([[0.0, 0.0, 8.0, 8.0]])], stride=8, module=module)
    assert defaults.item() == pytest.approx(1e-3 * fg + 5e-4 * bg + 1e-3 * attention_loss + 5e-6 * global_loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Score-weighted L2
# ---------------------------------------------------------------------------------------------
def test_score_l2_by_hand():
    # one image, two channels, a 1 x 2 grid; squared errors per location (1 + 0, 4 + 0)
    student, teacher = channels([1.0, 2.0], [0.0, 0.0]), torch.zeros(1, 2, 1, 2)
    quality = torch.tensor([0.5, 0.25]).view(1, 1, 1, 2)
    score_l2 = entry("score_l2").fn
    # Ultralytics: sum(q * mse) / (C * sum(q))
    assert score_l2(student, teacher, teacher_quality=quality).item() == pytest.approx((0.5 * 1 + 0.25 * 4) / (2 * 0.75))
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert score_l2(student, teacher, teacher_quality=quality, mask=mask).item() == pytest.approx(0.5 * 1 / (2 * 0.5))
    assert score_l2(student, teacher, teacher_quality=torch.zeros(1, 1, 1, 2)) == 0  # the teacher sees nothing


# ---------------------------------------------------------------------------------------------
# Relation
# ---------------------------------------------------------------------------------------------
# three objects, each a 4 x 4 pixel box inside its own 6 x 6 region of constant features on a
# 16 x 16 map at stride 1 (roi_align's samples then all fall inside the region)
REGIONS = [(0, 0), (0, 8), (8, 0)]  # top-left cell (row, col) of each region
HAND_BOXES = torch.tensor([[1.0, 1.0, 5.0, 5.0], [9.0, 1.0, 13.0, 5.0], [1.0, 9.0, 5.0, 13.0]])


def object_map(vectors: list[list[float]], size: int = 16, cell: int = 1) -> torch.Tensor:
    """``[1, D, size, size]`` with ``vectors[i]`` over region ``i`` (regions in cells of ``cell`` pixels)."""
    feature = torch.zeros(1, len(vectors[0]), size, size)
    for (row, col), vector in zip(REGIONS, vectors):
        r, c, extent = row // cell, col // cell, -(-6 // cell)
        feature[0, :, r : r + extent, c : c + extent] = torch.tensor(vector).view(-1, 1, 1)
    return feature


STUDENT_POINTS = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]  # a 3-4-5 triangle, right-angled at the first
TEACHER_POINTS = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # right-angled isosceles, three channels


def hand_relation(distance_weight: float = 1.0, angle_weight: float = 2.0) -> float:
    student = [d / 4 for d in (3.0, 4.0, 5.0)]  # pair distances over their mean
    mean = (2 + math.sqrt(2)) / 3
    teacher = [d / mean for d in (1.0, 1.0, math.sqrt(2))]
    distance = sum(smooth_l1(a - b) for a, b in zip(student, teacher)) / 3
    # cosine at each vertex: right angles at the first (0 in both), then 3/5 and 4/5 against 1/sqrt(2)
    angle = (0.0 + smooth_l1(0.6 - 1 / math.sqrt(2)) + smooth_l1(0.8 - 1 / math.sqrt(2))) / 3
    return distance_weight * distance + angle_weight * angle


def test_relation_distances_and_angles_of_three_hand_placed_objects():
    relation = entry("relation").fn
    student, teacher = object_map(STUDENT_POINTS), object_map(TEACHER_POINTS)
    value = relation([student], [teacher], gt_boxes=[HAND_BOXES], strides=[1], normalize=False)
    assert value.item() == pytest.approx(hand_relation(), rel=1e-5)
    distance_only = relation([student], [teacher], gt_boxes=[HAND_BOXES], strides=[1], normalize=False, angle_weight=0.0)
    assert distance_only.item() == pytest.approx(hand_relation(angle_weight=0.0), rel=1e-5)
    # the objects of every image of the batch are related with each other
    batch = relation([torch.cat([student, student])], [torch.cat([teacher, teacher])], strides=[1], normalize=False,
                     gt_boxes=[HAND_BOXES[:2], HAND_BOXES[2:]])
    assert batch.item() == pytest.approx(hand_relation(), rel=1e-5)


def test_relation_maps_the_boxes_onto_each_models_grid():
    """A teacher map at stride 2 (an 8 x 8 grid) against a student map at stride 1: the strides
    are the teacher's, the student's map covers the same 16 x 16 pixel image."""
    coarse = object_map(TEACHER_POINTS, size=8, cell=2)
    value = entry("relation").fn([object_map(STUDENT_POINTS)], [coarse], gt_boxes=[HAND_BOXES], strides=[2], normalize=False)
    assert value.item() == pytest.approx(hand_relation(), rel=1e-5)


def test_relation_is_blind_to_each_levels_scale_when_normalized():
    teacher = maps("relation", 1)
    student = [teacher[0] * 10, torch.cat([teacher[1], teacher[1]], 1) * 0.1]  # other scales, channels doubled
    relation = entry("relation").fn
    assert relation(student, teacher, gt_boxes=RELATION_BOXES, strides=[8, 16]).item() == pytest.approx(0.0, abs=1e-6)
    assert relation(student, teacher, gt_boxes=RELATION_BOXES, strides=[8, 16], normalize=False) > 1e-4


def test_relation_with_fewer_than_three_objects():
    relation = entry("relation").fn
    student, teacher = object_map(STUDENT_POINTS).requires_grad_(), object_map(TEACHER_POINTS)
    # two objects: one pair, whose distance is 1 after dividing by the mean in both models; no angle
    two = relation([student], [teacher], gt_boxes=[HAND_BOXES[:2]], strides=[1])
    assert two == 0 and two.requires_grad
    for boxes in (HAND_BOXES[:1], torch.zeros(0, 4)):
        value = relation([student], [teacher], gt_boxes=[boxes], strides=[1])
        assert value == 0 and value.requires_grad
        value.backward()
        assert torch.isfinite(student.grad).all()


def test_relation_subsamples_objects_beyond_max_objects_reproducibly():
    student, teacher = maps("relation", 0), maps("relation", 1)
    many = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 24.0, 8.0], [0.0, 8.0, 8.0, 31.0], [16.0, 16.0, 31.0, 31.0]])] * 2
    relation = entry("relation").fn
    torch.manual_seed(0)
    first = relation(student, teacher, gt_boxes=many, strides=[8, 16], max_objects=3)
    torch.manual_seed(0)
    assert torch.isfinite(first) and relation(student, teacher, gt_boxes=many, strides=[8, 16], max_objects=3) == first


def test_module_exports():
    assert {"pkd", "cwd", "mgd", "fgd", "score_l2", "relation"} <= set(feature_losses.__all__)
