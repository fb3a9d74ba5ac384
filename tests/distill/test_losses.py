"""Every registered distillation loss gets the same checks (finite scalar, gradients to the
student only, zero when the student equals the teacher, how it averages over images, images
with no boxes), then its formula is checked against hand arithmetic on tiny tensors. The helpers
that turn head maps into what response losses read (shared box form, quality, best anchor) are
checked against the detectors' own decoders."""
from __future__ import annotations

import math

import pytest
import torch

from kdet.distill.losses import DISTILL_LOSSES, ResponseLevel
from kdet.distill.pairing import level_quality, ltrb_in_strides, pick_best_anchor, response_level
from kdet.models.fcos import decode_ltrb
from kdet.models.yolo import level_boxes_and_scores
from kdet.structures import HeadLevel

# the losses that read only the two models' outputs; those that ask for context (ground truth,
# strides, modules) get the same checks with their context in test_feature_losses.py
def _needs_context(name: str) -> bool:
    """Whether the loss cannot run without context (a context parameter with no default)."""
    import inspect

    params = inspect.signature(DISTILL_LOSSES.get(name).fn).parameters
    return any(params[c].default is inspect.Parameter.empty for c in DISTILL_LOSSES.get(name).context)


LOSS_NAMES = [name for name in DISTILL_LOSSES.names()
              if DISTILL_LOSSES.get(name).fn.__module__ == "kdet.distill.losses" and not _needs_context(name)]
CONTEXT_RESPONSE_NAMES = ["ld"]  # response losses with context: checked by hand below
FIELDS = ("cls_logits", "box", "score", "quality")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def response_levels(seed: int, n: int = 2, a: int = 3, c: int = 3, grids=((4, 4), (2, 2)), requires_grad: bool = False):
    """Two levels of random head maps; ``quality`` is ``sigmoid(score)`` (an objectness head).
    Returns the levels and the leaf tensors they are built from."""
    generator = torch.Generator().manual_seed(seed)
    levels, leaves = [], []
    for h, w in grids:
        cls = torch.randn(n, a, c, h, w, generator=generator).requires_grad_(requires_grad)
        box = torch.randn(n, a, 4, h, w, generator=generator).requires_grad_(requires_grad)
        score = torch.randn(n, a, 1, h, w, generator=generator).requires_grad_(requires_grad)
        levels.append(ResponseLevel(cls, box, score, score.sigmoid()))
        leaves += [cls, box, score]
    return levels, leaves


def feature_map(seed: int, requires_grad: bool = False, shape=(2, 8, 4, 4)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def detached(levels: list[ResponseLevel]) -> list[ResponseLevel]:
    """What the distiller hands a loss as the teacher: the same maps, outside any graph."""
    return [ResponseLevel(*(None if getattr(l, f) is None else getattr(l, f).detach() for f in FIELDS)) for l in levels]


def copies(levels: list[ResponseLevel]) -> list[ResponseLevel]:
    return [ResponseLevel(*(None if getattr(l, f) is None else getattr(l, f).clone() for f in FIELDS)) for l in levels]


def images(levels: list[ResponseLevel], index: slice) -> list[ResponseLevel]:
    return [ResponseLevel(*(None if getattr(l, f) is None else getattr(l, f)[index] for f in FIELDS)) for l in levels]


def twice(levels: list[ResponseLevel]) -> list[ResponseLevel]:
    """The batch concatenated with itself."""
    return [ResponseLevel(*(None if getattr(l, f) is None else torch.cat([getattr(l, f)] * 2) for f in FIELDS)) for l in levels]


def student_and_teacher(name: str, requires_grad: bool = True):
    """Random inputs of the kind ``name`` reads: (student, teacher, student leaves, teacher leaves)."""
    if DISTILL_LOSSES.get(name).kind == "response":
        student, s_leaves = response_levels(0, requires_grad=requires_grad)
        teacher, t_leaves = response_levels(1, requires_grad=requires_grad)
        return student, teacher, s_leaves, t_leaves
    student, teacher = feature_map(0, requires_grad), feature_map(1, requires_grad)
    return student, teacher, [student], [teacher]


def loss_fn(name: str):
    return DISTILL_LOSSES.get(name).fn


# ---------------------------------------------------------------------------------------------
# Common contract of every registered loss
# ---------------------------------------------------------------------------------------------
def test_every_loss_has_a_known_kind_and_hand_computed_check():
    from test_feature_losses import NAMES as CONTEXT_LOSS_NAMES

    assert sorted(LOSS_NAMES + CONTEXT_LOSS_NAMES + CONTEXT_RESPONSE_NAMES) == DISTILL_LOSSES.names()  # every loss is checked
    assert set(LOSS_NAMES) == set(BATCH_AVERAGING) == set(HAND_COMPUTED)
    for name in LOSS_NAMES:
        assert DISTILL_LOSSES.get(name).kind in {"response", "feature"}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_value_is_a_finite_positive_scalar(name):
    student, teacher, _, _ = student_and_teacher(name, requires_grad=False)
    value = loss_fn(name)(student, teacher)
    assert isinstance(value, torch.Tensor) and value.dim() == 0
    assert torch.isfinite(value) and value > 0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_reach_the_student_and_not_the_detached_teacher(name):
    student, teacher, s_leaves, t_leaves = student_and_teacher(name)
    teacher = detached(teacher) if isinstance(teacher, list) else teacher.detach()
    loss_fn(name)(student, teacher).backward()
    assert all(t.grad is None for t in t_leaves)
    grads = [s.grad for s in s_leaves if s.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# which student maps each response loss reads (and so must send gradients to)
READS = {
    "l2_logits": {"cls_logits", "box", "score"},
    "kl": {"cls_logits"},
    "objectness_scaled": {"cls_logits", "box", "score"},  # score through quality = sigmoid(score)
    "soft_bce": {"cls_logits"},
}


@pytest.mark.parametrize("name", sorted(READS))
def test_response_loss_gradients_reach_exactly_the_maps_it_reads(name):
    student, _ = response_levels(0, requires_grad=True)
    teacher, _ = response_levels(1)
    loss_fn(name)(student, teacher).backward()
    for level in student:
        for field in ("cls_logits", "box", "score"):
            grad = getattr(level, field).grad
            if field in READS[name]:
                assert grad is not None and grad.abs().sum() > 0, field
            else:
                assert grad is None or not grad.any(), field


def test_feature_loss_gradients_reach_every_student_element():
    student, teacher = feature_map(0, requires_grad=True), feature_map(1)
    loss_fn("fitnet")(student, teacher, teacher_activation="none").backward()
    assert (student.grad != 0).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_when_student_equals_teacher(name):
    if DISTILL_LOSSES.get(name).kind == "response":
        teacher, _ = response_levels(3)
        value = loss_fn(name)(copies(teacher), teacher)
    else:
        teacher = torch.rand(2, 8, 4, 4) * 6  # already in ReLU6's range
        value = loss_fn(name)(teacher.clone(), teacher)
    assert torch.allclose(value, torch.zeros(()), atol=1e-6)


def test_fitnet_zero_for_any_equal_maps_without_the_teacher_activation():
    teacher = feature_map(4) * 10  # negative and above 6: ReLU6 would change it
    assert loss_fn("fitnet")(teacher.clone(), teacher, teacher_activation="none") == 0
    assert loss_fn("fitnet")(teacher.clone(), teacher) > 0


def test_kl_is_zero_when_only_the_class_logits_agree():
    teacher, _ = response_levels(5)
    student, _ = response_levels(6)
    for s, t in zip(student, teacher):
        s.cls_logits = t.cls_logits.clone()
    for mode in ("softmax", "sigmoid"):
        assert torch.allclose(loss_fn("kl")(student, teacher, mode=mode), torch.zeros(()), atol=1e-6)


# "mean": the value on a batch is the mean of the values on each image;
# "weighted": a weighted mean over locations, unchanged when the batch is repeated
BATCH_AVERAGING = {"l2_logits": "mean", "fitnet": "mean", "kl": "weighted", "objectness_scaled": "weighted",
                   "soft_bce": "weighted"}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_averaging_over_images(name):
    student, teacher, _, _ = student_and_teacher(name, requires_grad=False)
    fn = loss_fn(name)
    value = fn(student, teacher)
    response = DISTILL_LOSSES.get(name).kind == "response"
    if BATCH_AVERAGING[name] == "mean":
        pick = (lambda x, i: images(x, slice(i, i + 1))) if response else (lambda x, i: x[i : i + 1])
        per_image = [fn(pick(student, i), pick(teacher, i)) for i in range(2)]
        assert torch.allclose(value, torch.stack(per_image).mean(), rtol=1e-5)
    else:
        repeat = twice if response else (lambda x: torch.cat([x, x]))
        assert torch.allclose(fn(repeat(student), repeat(teacher)), value, rtol=1e-5)


@pytest.mark.parametrize("name", ["kl", "objectness_scaled"])
def test_teacher_seeing_only_background_gives_a_finite_value(name):
    """Images with no boxes: a teacher whose quality is 0 everywhere weights every location 0."""
    student, s_leaves = response_levels(0, requires_grad=True)
    teacher, _ = response_levels(1)
    for level in teacher:
        level.quality = torch.zeros_like(level.quality)
    value = loss_fn(name)(student, teacher)
    assert torch.isfinite(value)
    # only the unweighted objectness part remains: the mean of the student's squared quality
    quality = torch.cat([level.quality.flatten() for level in student])
    expected = quality.square().mean() if name == "objectness_scaled" else torch.zeros(())
    assert torch.allclose(value, expected, atol=1e-6)
    value.backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in s_leaves if leaf.grad is not None)


def test_bad_arguments_raise_value_error():
    student, teacher, _, _ = student_and_teacher("kl", requires_grad=False)
    with pytest.raises(ValueError, match="temperature must be positive"):
        loss_fn("kl")(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="mode must be 'softmax' or 'sigmoid', got 'bogus'"):
        loss_fn("kl")(student, teacher, mode="bogus")
    with pytest.raises(ValueError, match="weighting must be"):
        loss_fn("kl")(student, teacher, weighting="bogus")
    with pytest.raises(ValueError, match="teacher_activation must be 'relu6' or 'none', got 'bogus'"):
        loss_fn("fitnet")(feature_map(0), feature_map(1), teacher_activation="bogus")
    with pytest.raises(ValueError, match=r"student map \(2, 8, 4, 4\) and teacher map \(2, 4, 4, 4\) differ"):
        loss_fn("fitnet")(feature_map(0), feature_map(1, shape=(2, 4, 4, 4)))


# ---------------------------------------------------------------------------------------------
# Formulas, by hand
# ---------------------------------------------------------------------------------------------
def at_locations(rows) -> torch.Tensor:
    """One list of K values per location -> ``[1, 1, K, 1, L]`` (one image, one anchor, a 1 x L grid)."""
    values = torch.tensor(rows, dtype=torch.float32)  # [L, K]
    return values.T.reshape(1, 1, values.shape[1], 1, values.shape[0])


def hand_level(cls, box, score=None, quality=None) -> ResponseLevel:
    quality = quality if quality is not None else [[1.0]] * len(cls)
    return ResponseLevel(at_locations(cls), at_locations(box), None if score is None else at_locations(score), at_locations(quality))


def split_locations(level: ResponseLevel) -> list[ResponseLevel]:
    """A 1 x L level cut into L levels of one location each."""
    width = level.cls_logits.shape[-1]
    return [ResponseLevel(*(None if getattr(level, f) is None else getattr(level, f)[..., i : i + 1] for f in FIELDS))
            for i in range(width)]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def test_l2_logits_by_hand():
    # level 1: one location, C=2; level 2: a 1x2 grid where only the class logits differ, by 1
    s1 = hand_level(cls=[[1.0, 2.0]], box=[[1.0, 1.0, 1.0, 0.0]], score=[[0.5]])
    t1 = hand_level(cls=[[0.0, 0.0]], box=[[0.0, 0.0, 0.0, 3.0]], score=[[-0.5]])
    s2 = hand_level(cls=[[1.0, 1.0], [2.0, 0.0]], box=[[0.0] * 4] * 2, score=[[0.0]] * 2)
    t2 = hand_level(cls=[[0.0, 0.0], [1.0, -1.0]], box=[[0.0] * 4] * 2, score=[[0.0]] * 2)
    level1 = (1 + 4) / 2 + (1 + 1 + 1 + 9) / 4 + 1.0  # mse(cls) + mse(box) + mse(score)
    level2 = 1.0
    value = loss_fn("l2_logits")([s1, s2], [t1, t2])
    assert value.item() == pytest.approx((level1 + level2) / 2, rel=1e-6)  # mean over levels
    # a head without score: only classes and boxes
    s1.score = None
    assert loss_fn("l2_logits")([s1], [t1]).item() == pytest.approx(level1 - 1.0, rel=1e-6)


KL_STUDENT = [[1.0, 3.0], [0.0, 0.0], [-1.0, 2.0]]
KL_TEACHER = [[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]]
KL_QUALITY = [0.5, 0.25, 0.0]


def kl_levels():
    student = hand_level(cls=KL_STUDENT, box=[[0.0] * 4] * 3)
    teacher = hand_level(cls=KL_TEACHER, box=[[1.0] * 4] * 3, quality=[[q] for q in KL_QUALITY])
    return student, teacher


def weighted(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_softmax_by_hand(temperature):
    divergences = []
    for s, t in zip(KL_STUDENT, KL_TEACHER):
        p_t = softmax([x / temperature for x in t])
        p_s = softmax([x / temperature for x in s])
        divergences.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
    expected = temperature**2 * weighted(divergences, KL_QUALITY)
    student, teacher = kl_levels()
    value = loss_fn("kl")([student], [teacher], temperature=temperature)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # the weighted mean runs over every location of every level, not level by level
    split = loss_fn("kl")(split_locations(student), split_locations(teacher), temperature=temperature)
    assert split.item() == pytest.approx(expected, rel=1e-5)
    uniform = loss_fn("kl")([student], [teacher], temperature=temperature, weighting="uniform")
    assert uniform.item() == pytest.approx(temperature**2 * sum(divergences) / 3, rel=1e-5)


def test_kl_sigmoid_by_hand():
    temperature = 1.5
    divergences = []
    for s, t in zip(KL_STUDENT, KL_TEACHER):
        total = 0.0
        for xs, xt in zip(s, t):  # one Bernoulli per class
            p_t, p_s = sigmoid(xt / temperature), sigmoid(xs / temperature)
            total += p_t * math.log(p_t / p_s) + (1 - p_t) * math.log((1 - p_t) / (1 - p_s))
        divergences.append(total)
    student, teacher = kl_levels()
    value = loss_fn("kl")([student], [teacher], temperature=temperature, mode="sigmoid")
    assert value.item() == pytest.approx(temperature**2 * weighted(divergences, KL_QUALITY), rel=1e-5)


def test_objectness_scaled_by_hand():
    s_cls, t_cls = [[0.0, 1.0], [2.0, -2.0]], [[1.0, -1.0], [0.0, 0.0]]
    s_box, t_box = [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]
    q_s, q_t = [0.2, 0.9], [0.6, 0.2]
    student = hand_level(s_cls, s_box, quality=[[q] for q in q_s])
    teacher = hand_level(t_cls, t_box, quality=[[q] for q in q_t])
    obj = ((0.2 - 0.6) ** 2 + (0.9 - 0.2) ** 2) / 2
    cls = [sum((sigmoid(a) - sigmoid(b)) ** 2 for a, b in zip(s, t)) / 2 for s, t in zip(s_cls, t_cls)]
    box = [(1 + 4) / 4, 4 / 4]
    expected = obj + weighted(cls, q_t) + weighted(box, q_t)
    assert loss_fn("objectness_scaled")([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)
    split = loss_fn("objectness_scaled")(split_locations(student), split_locations(teacher))
    assert split.item() == pytest.approx(expected, rel=1e-6)


def test_fitnet_by_hand():
    # N=1, C=3, a 1x2 grid; rows are channels, columns locations
    s = [[1.0, 0.0], [2.0, 2.0], [0.5, 7.0]]
    t = [[-1.0, 1.0], [7.0, 2.0], [0.5, 3.0]]
    student, teacher = torch.tensor(s).view(1, 3, 1, 2), torch.tensor(t).view(1, 3, 1, 2)
    relu6 = [[min(max(v, 0.0), 6.0) for v in row] for row in t]

    def mse(a, b):
        return sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / 6

    def unit_columns(m):
        norms = [math.sqrt(sum(m[c][j] ** 2 for c in range(3))) for j in range(2)]
        return [[m[c][j] / norms[j] for j in range(2)] for c in range(3)]

    fitnet = loss_fn("fitnet")
    assert fitnet(student, teacher).item() == pytest.approx(mse(s, relu6), rel=1e-6)
    assert mse(s, relu6) == pytest.approx(34 / 6)
    assert fitnet(student, teacher, teacher_activation="none").item() == pytest.approx(mse(s, t), rel=1e-6)
    normalized = fitnet(student, teacher, normalize=True)
    assert normalized.item() == pytest.approx(mse(unit_columns(s), unit_columns(relu6)), rel=1e-5)
    # normalising makes the loss blind to the scale of either map
    plain = fitnet(student, teacher, normalize=True, teacher_activation="none")
    scaled = fitnet(student * 10, teacher * 0.5, normalize=True, teacher_activation="none")
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


# losses whose formula a *_by_hand test above checks
HAND_COMPUTED = {"l2_logits", "kl", "objectness_scaled", "fitnet", "soft_bce"}


# ---------------------------------------------------------------------------------------------
# Head maps -> ResponseLevel
# ---------------------------------------------------------------------------------------------
YOLO_ANCHORS = torch.tensor([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]])


def head_level(box_format: str, score_kind: str = "objectness", n: int = 2, c: int = 2, grid: int = 3, stride: int = 8,
               seed: int = 0) -> HeadLevel:
    generator = torch.Generator().manual_seed(seed)
    a = len(YOLO_ANCHORS) if box_format == "yolov5" else 1
    box = torch.randn(n, a, 4, grid, grid, generator=generator)
    if box_format == "ltrb":
        box = box.abs()  # FCOS distances come after a ReLU
    return HeadLevel(
        name="p3",
        stride=stride,
        cls_logits=torch.randn(n, a, c, grid, grid, generator=generator),
        box=box,
        score=torch.randn(n, a, 1, grid, grid, generator=generator),
        score_kind=score_kind,
        box_format=box_format,
        anchors=YOLO_ANCHORS if box_format == "yolov5" else None,
    )


def boxes_from_ltrb(ltrb: torch.Tensor, stride: int) -> torch.Tensor:
    """``[N, A, 4, H, W]`` distances in strides from each cell corner -> ``[N, A*H*W, 4]`` xyxy
    pixels, ordered anchor, row, column."""
    n, a, _, h, w = ltrb.shape
    expected = torch.empty(n, a, h, w, 4)
    for row in range(h):
        for col in range(w):
            left, top, right, bottom = ltrb[:, :, :, row, col].unbind(-1)  # each [N, A]
            expected[:, :, row, col] = torch.stack(
                [col * stride - left * stride, row * stride - top * stride, col * stride + right * stride,
                 row * stride + bottom * stride], -1)
    return expected.reshape(n, a * h * w, 4)


def test_ltrb_in_strides_leaves_fcos_boxes_as_they_are():
    level = head_level("ltrb", "centerness")
    assert ltrb_in_strides(level) is level.box
    boxes, _ = decode_ltrb(level)  # FCOS's own decoder reads the same numbers
    assert torch.allclose(boxes_from_ltrb(ltrb_in_strides(level), level.stride), boxes, atol=1e-4)


def test_ltrb_in_strides_of_yolo_boxes_decodes_like_the_yolo_decoder():
    level = head_level("yolov5")
    ltrb = ltrb_in_strides(level)
    assert ltrb.shape == level.box.shape
    boxes, _ = level_boxes_and_scores(level)
    assert torch.allclose(boxes_from_ltrb(ltrb, level.stride), boxes, atol=1e-4)
    # the anchor sizes are in pixels: doubling the stride halves them in strides
    coarse = head_level("yolov5", stride=16)
    widths = ltrb[:, :, 0] + ltrb[:, :, 2]
    assert torch.allclose(ltrb_in_strides(coarse)[:, :, 0] + ltrb_in_strides(coarse)[:, :, 2], widths / 2, atol=1e-5)


def test_ltrb_in_strides_rejects_an_unknown_box_format():
    level = head_level("ltrb")
    level.box_format = "xywh"
    with pytest.raises(ValueError, match="unknown box format 'xywh'"):
        ltrb_in_strides(level)


def test_level_quality_per_score_kind():
    yolo = head_level("yolov5", "objectness")
    assert torch.allclose(level_quality(yolo), yolo.score.sigmoid())
    fcos = head_level("ltrb", "centerness")
    best_class = fcos.cls_logits.sigmoid().max(2, keepdim=True).values
    assert torch.allclose(level_quality(fcos), fcos.score.sigmoid() * best_class)
    assert level_quality(fcos).shape == fcos.score.shape
    fcos.score = None
    assert torch.allclose(level_quality(fcos), best_class)


def test_response_level_reorders_classes_and_picks_the_box_space():
    level = head_level("yolov5")
    raw = response_level(level, "raw", None)
    assert raw.box is level.box and raw.cls_logits is level.cls_logits and raw.score is level.score
    decoded = response_level(level, "decoded", [1, 0])
    assert torch.equal(decoded.box, ltrb_in_strides(level))
    assert torch.equal(decoded.cls_logits, level.cls_logits.flip(2))
    assert torch.equal(decoded.quality, level_quality(level))


def test_pick_best_anchor_repeats_the_most_confident_anchor():
    n, a, h, w = 2, 3, 2, 2
    generator = torch.Generator().manual_seed(0)
    quality = torch.rand(n, a, 1, h, w, generator=generator)
    # each map holds the anchor's index, so what was picked can be read back
    ids = torch.arange(a, dtype=torch.float32).view(1, a, 1, 1, 1)
    level = ResponseLevel(ids.expand(n, a, 2, h, w) + 0, ids.expand(n, a, 4, h, w) + 10, None, quality)
    picked = pick_best_anchor(level, 5)
    assert picked.cls_logits.shape == (n, 5, 2, h, w) and picked.box.shape == (n, 5, 4, h, w)
    assert picked.score is None
    best = quality.argmax(1)  # [N, 1, H, W]
    for image in range(n):
        for row in range(h):
            for col in range(w):
                anchor = int(best[image, 0, row, col])
                assert (picked.cls_logits[image, :, :, row, col] == anchor).all()
                assert (picked.box[image, :, :, row, col] == anchor + 10).all()
                assert (picked.quality[image, :, 0, row, col] == quality[image, :, 0, row, col].max()).all()


def test_objectness_scaled_component_weights_and_decoded_boxes_by_hand():
    s_cls, t_cls = [[0.0, 1.0]], [[1.0, -1.0]]
    q_s, q_t = 0.2, 0.6
    # teacher box: l, t, r, b = 1, 1, 3, 3 strides -> width 4, height 4, scale (4 + 4) / 2 = 4
    s_box, t_box = [[2.0, 1.0, 3.0, 1.0]], [[1.0, 1.0, 3.0, 3.0]]
    student = hand_level(s_cls, s_box, quality=[[q_s]])
    teacher = hand_level(t_cls, t_box, quality=[[q_t]])
    obj = (q_s - q_t) ** 2
    cls = sum((sigmoid(a) - sigmoid(b)) ** 2 for a, b in zip(s_cls[0], t_cls[0])) / 2
    raw_box = (1 + 0 + 0 + 4) / 4
    value = loss_fn("objectness_scaled")([student], [teacher], obj_weight=2.0, cls_weight=0.5, box_weight=0.1)
    assert value.item() == pytest.approx(2.0 * obj + 0.5 * cls + 0.1 * raw_box, rel=1e-6)
    teacher.box_space = student.box_space = "ltrb"  # decoded: differences relative to the teacher box size
    decoded = loss_fn("objectness_scaled")([student], [teacher])
    assert decoded.item() == pytest.approx(obj + cls + raw_box / 16, rel=1e-6)


def test_soft_bce_by_hand():
    # one location, two classes: student logits (0, 2), teacher logits (1, -1)
    student = [hand_level([[0.0, 2.0]], [[0.0] * 4])]
    teacher = [hand_level([[1.0, -1.0]], [[0.0] * 4])]
    expected_sum, teacher_sum = 0.0, 0.0
    for s_logit, t_logit in ((0.0, 1.0), (2.0, -1.0)):
        p_s, p_t = sigmoid(s_logit), sigmoid(t_logit)
        bce = -(p_t * math.log(p_s) + (1 - p_t) * math.log(1 - p_s))
        expected_sum += abs(p_s - p_t) ** 2 * bce
        teacher_sum += p_t
    value = loss_fn("soft_bce")(student, teacher)
    assert value.item() == pytest.approx(expected_sum / max(teacher_sum, 1.0), rel=1e-5)
    # beta 0: plain soft BCE, the same normaliser
    plain = sum(-(sigmoid(t) * math.log(sigmoid(s)) + (1 - sigmoid(t)) * math.log(1 - sigmoid(s))) for s, t in ((0.0, 1.0), (2.0, -1.0)))
    assert loss_fn("soft_bce")(student, teacher, beta=0.0).item() == pytest.approx(plain / max(teacher_sum, 1.0), rel=1e-5)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        loss_fn("soft_bce")(student, teacher, beta=-1)


def ld_level(dist_rows, cells: int = 2) -> ResponseLevel:
    """One image, one anchor, a 1 x ``cells`` grid, 2 bins per edge: ``dist_rows[cell]`` is the
    (bin 0, bin 1) logits of all four edges at that cell."""
    dist = torch.tensor(dist_rows, dtype=torch.float32)  # [cells, 2]
    box_dist = dist.T[None, None, None, :, None, :].expand(1, 1, 4, 2, 1, cells).clone()  # [1, 1, 4, 2, 1, cells]
    zeros = torch.zeros(1, 1, 4, 1, cells)
    return ResponseLevel(torch.zeros(1, 1, 1, 1, cells), zeros, None, torch.ones(1, 1, 1, 1, cells), "ltrb", box_dist)


def test_ld_by_hand():
    ld = loss_fn("ld")
    student = [ld_level([[0.0, 0.0], [1.0, 0.0]])]
    teacher = [ld_level([[2.0, 0.0], [0.0, 3.0]])]
    # cell 0 is the student's positive; the box covers both cell centres (4, 4) and (12, 4) at stride 8
    assignment = [torch.tensor([[[[0, -1]]]])]
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 8.0]])]

    def kl(t, s, temperature):
        pt = softmax([x / temperature for x in t])
        ps = softmax([x / temperature for x in s])
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)) * temperature**2

    for temperature, vlr_weight in ((1.0, 1.0), (10.0, 0.5)):
        expected = kl([2.0, 0.0], [0.0, 0.0], temperature) + vlr_weight * kl([0.0, 3.0], [1.0, 0.0], temperature)
        value = ld(student, teacher, assignment=assignment, gt_boxes=boxes, strides=[8], temperature=temperature, vlr_weight=vlr_weight)
        assert value.item() == pytest.approx(expected, rel=1e-5)
    # a box that leaves cell 1 outside: only the main region counts
    small = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    value = ld(student, teacher, assignment=assignment, gt_boxes=small, strides=[8], temperature=1.0)
    assert value.item() == pytest.approx(kl([2.0, 0.0], [0.0, 0.0], 1.0), rel=1e-5)
    # an image without boxes or positives: 0, still in the graph
    leaf = ld_level([[0.0, 0.0], [1.0, 0.0]])
    leaf.box_dist.requires_grad_(True)
    empty = ld([leaf], teacher, assignment=[torch.full((1, 1, 1, 2), -1)], gt_boxes=[torch.zeros((0, 4))], strides=[8])
    assert empty.item() == 0.0 and empty.requires_grad
    # the same distributions give 0; gradients reach the student's distributions only
    same = ld([leaf], [ld_level([[0.0, 0.0], [1.0, 0.0]])], assignment=assignment, gt_boxes=boxes, strides=[8])
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    ld([leaf], teacher, assignment=assignment, gt_boxes=boxes, strides=[8]).backward()
    assert leaf.box_dist.grad is not None and leaf.box_dist.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature must be positive"):
        ld(student, teacher, assignment=assignment, gt_boxes=boxes, strides=[8], temperature=0)
    with pytest.raises(ValueError, match="box distributions"):
        no_dist = ResponseLevel(*(getattr(student[0], f) for f in FIELDS))
        ld([no_dist], teacher, assignment=assignment, gt_boxes=boxes, strides=[8])
