"""What `kdet check` says for each kind of teacher/student mismatch, on real tiny models
described at 64 px, and one distillation step through the Distiller."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from kdet.config import DistillSettings, ModelConfig, TermConfig
from kdet.distill.distiller import Distiller
from kdet.distill.losses import DISTILL_LOSSES
from kdet.distill.pairing import FeaturePair, PairingError, pair
from kdet.engine.step import Batch
from kdet.models import build_model
from kdet.models.anchors import DEFAULT_ANCHORS

CLASSES = ("cell", "platelet")
SIZE = 64
TWO_ANCHORS = [[[10, 13], [16, 30]], [[30, 61], [62, 45]], [[116, 90], [156, 198]]]

MODELS = {
    "yolo_s": ModelConfig(family="yolo", backbone="cspdarknet", size="s", anchors="default"),
    "yolo_p": ModelConfig(family="yolo", backbone="cspdarknet", size="p", anchors="default"),
    "yolo_p_two_anchors": ModelConfig(family="yolo", backbone="cspdarknet", size="p", anchors=TWO_ANCHORS),
    "yolo_p_other_anchors": ModelConfig(
        family="yolo", backbone="cspdarknet", size="p", anchors=[[[w * 2, h * 2] for w, h in level] for level in DEFAULT_ANCHORS]
    ),
    "yolo_mobilenet": ModelConfig(family="yolo", backbone="mobilenet_v3_small", width=0.5, size="p", anchors="default"),
    # FCOS needs fpn_channels a multiple of 32 and at least 64 (GroupNorm(32) on 1x1 levels)
    "fcos_resnet18": ModelConfig(family="fcos", backbone="resnet18", fpn_channels=64, extra_levels=True),
}


def build(name: str, classes=CLASSES):
    torch.manual_seed(0)
    return build_model(MODELS[name], list(classes), SIZE)


@functools.lru_cache(maxsize=None)
def spec(name: str, classes: tuple[str, ...] = CLASSES):
    return build(name, classes).describe((SIZE, SIZE))


def settings(*terms: TermConfig, **switches) -> DistillSettings:
    return DistillSettings(terms=list(terms), **switches)


def check(teacher: str, student: str, *terms: TermConfig, **kwargs):
    return pair(spec(teacher), spec(student), settings(*terms), **kwargs)


def fitnet(student: str = "neck.p3", **fields) -> TermConfig:
    return TermConfig(loss="fitnet", student=student, **fields)


def response(loss: str, **fields) -> TermConfig:
    return TermConfig(loss=loss, **fields)


# the response losses any head can feed (ld reads box distributions: DFL heads only, tested below)
RESPONSE_LOSSES = [name for name in DISTILL_LOSSES.names()
                   if DISTILL_LOSSES.get(name).kind == "response" and not DISTILL_LOSSES.get(name).needs_box_dist]


def test_ld_needs_box_distributions_on_both_sides():
    report = check("yolo_s", "yolo_p", response("ld"))
    assert not report.ok
    assert "the teacher and the student heads do not have (only model.head: dfl predicts them)" in report.errors[0]
    assert "objectness_scaled / kl" in report.errors[0]


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------
def test_same_architecture_pairs_every_level_with_nothing_to_adapt():
    report = check("yolo_p", "yolo_p", *(response(name) for name in RESPONSE_LOSSES))
    assert report.ok and report.errors == [] and report.notes == []
    assert [plan.config.loss for plan in report.terms] == RESPONSE_LOSSES
    for plan in report.terms:
        assert plan.active and plan.kind == "response"
        assert plan.level_pairs == [(0, 0), (1, 1), (2, 2)]
        assert not plan.pick_teacher_anchor
        assert plan.box_space == "raw"  # same head kind and anchors: boxes compared as the heads output them
        assert "p3<-p3, p4<-p4, p5<-p5" in plan.notes[0]
    assert report.student_classes == report.teacher_classes == [0, 1]
    report.raise_errors()  # nothing to raise


def test_fcos_teacher_with_five_levels_teaches_a_yolo_student_on_the_shared_strides():
    """The seed-000 situation: FCOS ResNet-18 (p3..p7) teacher, YOLO MobileNet (p3..p5) student."""
    report = check("fcos_resnet18", "yolo_mobilenet", response("objectness_scaled"), response("kl"))
    assert report.ok, report.errors
    assert [level.stride for level in report.teacher.levels] == [8, 16, 32, 64, 128]
    assert any("families differ" in note and "fcos" in note and "yolo" in note for note in report.notes)
    for plan in report.terms:
        assert plan.level_pairs == [(0, 0), (1, 1), (2, 2)]
        assert plan.box_space == "decoded"
        assert plan.pick_teacher_anchor  # one point per location vs three anchors
        unused = [note for note in plan.notes if "not used" in note]
        assert len(unused) == 1 and "p6" in unused[0] and "p7" in unused[0]
        assert any("anchors per location: teacher [1], student [3]" in note for note in plan.notes)


def test_l2_logits_across_families_is_refused_and_points_to_objectness_scaled():
    report = check("fcos_resnet18", "yolo_mobilenet", response("l2_logits"), response("objectness_scaled"))
    assert not report.ok
    assert len(report.errors) == 1
    error = report.errors[0]
    assert error.startswith("distill.terms.0 (l2_logits)") and "raw head maps" in error
    assert "objectness_scaled" in error
    assert report.terms[1].level_pairs == [(0, 0), (1, 1), (2, 2)]  # the other term is still planned
    with pytest.raises(PairingError, match="l2_logits compares raw head maps"):
        report.raise_errors()


def test_different_anchors_per_location_pick_the_teachers_best_anchor():
    report = check("yolo_s", "yolo_p_two_anchors", response("objectness_scaled"))
    assert report.ok, report.errors
    plan = report.terms[0]
    assert plan.pick_teacher_anchor and plan.box_space == "decoded"
    assert plan.level_pairs == [(0, 0), (1, 1), (2, 2)]
    assert any("anchors per location: teacher [3], student [2]" in note for note in plan.notes)


def test_different_anchors_per_location_refuse_l2_logits():
    report = check("yolo_s", "yolo_p_two_anchors", response("l2_logits"))
    assert len(report.errors) == 1
    assert "different anchors per location" in report.errors[0]
    assert "objectness_scaled" in report.errors[0]
    assert "[[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]" in report.errors[0]  # the teacher's anchors, to copy


def test_same_anchor_count_but_other_anchor_boxes_refuse_l2_logits_only():
    report = check("yolo_p", "yolo_p_other_anchors", response("l2_logits"), response("kl"))
    assert len(report.errors) == 1 and report.errors[0].startswith("distill.terms.0 (l2_logits)")
    assert "different anchor boxes" in report.errors[0]
    assert not report.terms[1].pick_teacher_anchor and report.terms[1].box_space == "decoded"


def test_response_terms_must_read_the_head():
    report = check("yolo_p", "yolo_p", response("kl", student="neck.p3"))
    assert len(report.errors) == 1 and "response losses read the head" in report.errors[0]
    assert "student: neck.p3" in report.errors[0]


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------
def test_channel_mismatch_gets_the_losss_default_connector():
    report = check("yolo_s", "yolo_p", fitnet("neck.p3"))
    assert report.ok, report.errors
    s_ch, t_ch = spec("yolo_p").features["neck.p3"][0], spec("yolo_s").features["neck.p3"][0]
    assert s_ch != t_ch
    plan = report.terms[0]
    assert plan.features == [FeaturePair("neck.p3", "neck.p3", (s_ch, 8, 8), (t_ch, 8, 8), (8, 8), "converter", False)]
    assert DISTILL_LOSSES.get("fitnet").connector == "converter"
    assert len(plan.notes) == 1 and f"{s_ch} ch" in plan.notes[0] and f"{t_ch} ch" in plan.notes[0]
    assert "converter" in plan.notes[0]


def test_connector_can_be_chosen_and_none_needs_equal_channels():
    assert check("yolo_s", "yolo_p", fitnet(connector="conv")).terms[0].features[0].connector == "conv"
    same = check("yolo_p", "yolo_p", fitnet(connector="none"))
    assert same.ok and same.terms[0].features[0].connector == "none"
    report = check("yolo_s", "yolo_p", fitnet(connector="none"))
    assert len(report.errors) == 1 and report.terms[0].features == []
    assert "connector" in report.errors[0] and "32 channels" in report.errors[0] and "128" in report.errors[0]


def test_spatial_mismatch_names_both_grids_and_the_resample_switch():
    report = check("yolo_s", "yolo_p", fitnet("neck.p3", teacher="neck.p4"))
    assert len(report.errors) == 1
    error = report.errors[0]
    for part in ("student neck.p3 is 8x8 (stride 8)", "teacher neck.p4 is 4x4 (stride 16)", "resample: true"):
        assert part in error
    assert "neck.p3" in error.split("Pick a teacher feature of stride 8")[1]  # the teacher map that would fit
    resampled = check("yolo_s", "yolo_p", fitnet("neck.p3", teacher="neck.p4", resample=True))
    assert resampled.ok, resampled.errors
    (feature,) = resampled.terms[0].features
    assert feature.resample and feature.stride == (8, 16)
    assert "resized 8x8 -> 4x4" in resampled.terms[0].notes[0]


@pytest.mark.parametrize(("name", "hint"), [("neck.p9", None), ("nek.p3", "Did you mean 'neck.p3'?")])
def test_unknown_feature_name_lists_the_available_ones(name, hint):
    report = check("yolo_s", "yolo_p", fitnet(name))
    assert [error.split(":")[0] for error in report.errors] == [
        "distill.terms.0 (fitnet).student", "distill.terms.0 (fitnet).teacher"]  # the teacher reads the same name
    for error in report.errors:
        assert f"no feature {name!r}" in error and "backbone.c3, backbone.c4, backbone.c5, neck.p3" in error
        assert hint is None or hint in error
    assert report.terms[0].features == []


def test_unknown_teacher_feature_only_blames_the_teacher():
    report = check("yolo_s", "yolo_p", fitnet("neck.p3", teacher="neck.p9"))
    assert len(report.errors) == 1 and report.errors[0].startswith("distill.terms.0 (fitnet).teacher")


def test_feature_group_pairs_levels_by_stride_across_families():
    report = check("fcos_resnet18", "yolo_mobilenet", fitnet("neck"))
    assert report.ok, report.errors
    features = report.terms[0].features
    assert [(f.student, f.teacher) for f in features] == [("neck.p3", "neck.p3"), ("neck.p4", "neck.p4"), ("neck.p5", "neck.p5")]
    assert all(f.stride[0] == f.stride[1] and f.connector == "converter" and not f.resample for f in features)
    assert [f.teacher_shape[0] for f in features] == [64, 64, 64]  # the FPN's width
    assert len(report.terms[0].notes) == 3


def test_feature_group_against_one_teacher_map_pairs_the_level_of_its_stride():
    report = check("yolo_s", "yolo_p", fitnet("neck", teacher="neck.p5"))
    assert report.ok and [f.student for f in report.terms[0].features] == ["neck.p5"]
    assert sum("not distilled" in note for note in report.terms[0].notes) == 2  # p3, p4


def test_feature_group_without_a_shared_stride_is_an_error():
    report = check("fcos_resnet18", "yolo_mobilenet", fitnet("neck", teacher="neck.p6"))
    assert len(report.errors) == 1
    assert "no feature of the student's 'neck' shares a stride" in report.errors[0]
    assert "student strides [8, 16, 32], teacher [64]" in report.errors[0]


# ---------------------------------------------------------------------------------------------
# Classes, input size, terms
# ---------------------------------------------------------------------------------------------
def class_report(teacher_classes, student_classes):
    return pair(spec("yolo_p", tuple(teacher_classes)), spec("yolo_p", tuple(student_classes)), settings(response("kl")))


def assert_matched_by_name(report):
    student, teacher = report.student.class_names, report.teacher.class_names
    assert [student[i] for i in report.student_classes] == [teacher[i] for i in report.teacher_classes]


def test_classes_in_another_order_are_reordered():
    report = class_report(["cell", "platelet"], ["platelet", "cell"])
    assert report.ok
    assert report.student_classes == [0, 1] and report.teacher_classes == [1, 0]
    assert_matched_by_name(report)
    assert len(report.notes) == 1 and "same names in another order" in report.notes[0] and "reordered" in report.notes[0]


def test_partly_shared_classes_name_what_each_side_lacks():
    report = class_report(["cell", "platelet", "rbc"], ["wbc", "platelet"])
    assert report.ok
    assert report.student_classes == [1] and report.teacher_classes == [1]
    assert_matched_by_name(report)
    (note,) = report.notes
    assert "1 shared (platelet)" in note
    assert "student's ['wbc']" in note and "teacher's ['cell', 'rbc']" in note


def test_disjoint_classes_are_an_error():
    report = class_report(["cell", "platelet"], ["dog", "cat"])
    assert report.student_classes == report.teacher_classes == []
    assert len(report.errors) == 1 and "no class name is shared" in report.errors[0]
    assert report.terms[0].level_pairs == []  # no second error from the response term


def test_teacher_trained_at_another_input_size_gets_a_note():
    report = check("yolo_s", "yolo_p", response("kl"), teacher_input_size=128)
    assert report.ok
    (note,) = report.notes
    assert "128px" in note and "64px" in note and "0.50x" in note
    assert check("yolo_s", "yolo_p", response("kl"), teacher_input_size=64).notes == []


def test_unknown_loss_lists_the_valid_names():
    report = check("yolo_p", "yolo_p", response("bogus"), response("kl"))
    assert len(report.errors) == 1 and report.errors[0].startswith("distill.terms.0.loss: unknown distillation loss 'bogus'")
    assert all(name in report.errors[0] for name in DISTILL_LOSSES.names())
    assert [plan.index for plan in report.terms] == [1]


def test_misspelt_loss_argument_names_its_key_and_the_right_spelling():
    report = check("yolo_p", "yolo_p", response("kl", args={"temprature": 2}))
    assert len(report.errors) == 1
    assert report.errors[0].startswith("distill.terms.0.args.temprature:")
    assert "Did you mean 'temperature'?" in report.errors[0]
    assert check("yolo_p", "yolo_p", response("kl", args={"temperature": 2, "mode": "sigmoid"})).ok


def test_no_terms_is_an_error():
    report = check("yolo_p", "yolo_p")
    assert len(report.errors) == 1 and "distill.terms is empty" in report.errors[0]


@pytest.mark.parametrize(("switches", "active"), [
    ({}, [True, True]),
    ({"features": False}, [True, False]),
    ({"response": False}, [False, True]),
])
def test_switches_turn_terms_of_one_kind_off(switches, active):
    report = pair(spec("yolo_s"), spec("yolo_p"), settings(response("objectness_scaled"), fitnet(), **switches))
    assert report.ok
    assert [plan.active for plan in report.terms] == active
    assert [plan.kind for plan in report.terms] == ["response", "feature"]
    assert report.terms[1].features  # an inactive term is still planned (kdet check shows it)


def test_every_term_switched_off_is_noted():
    report = pair(spec("yolo_s"), spec("yolo_p"),
                  settings(response("kl"), fitnet(enabled=False), features=True, response=False))
    assert report.ok and not any(plan.active for plan in report.terms)
    assert any("every term is switched off" in note for note in report.notes)


# ---------------------------------------------------------------------------------------------
# Through the Distiller
# ---------------------------------------------------------------------------------------------
def batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    targets = [
        {"boxes": torch.tensor([[8.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[20.0, 8.0, 56.0, 36.0]]), "labels": torch.tensor([1])},
    ]
    return Batch.of(images, targets)


def test_distiller_step_trains_the_student_and_connectors_only():
    teacher, student = build("yolo_s"), build("yolo_p")
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)),
                  settings(response("objectness_scaled"), fitnet("neck")))
    distiller = Distiller(student, teacher, report)
    distiller.train()
    assert teacher.training is False
    assert not any(p.requires_grad for p in teacher.parameters())
    assert set(distiller.connectors) == {"term1_neck_p3", "term1_neck_p4", "term1_neck_p5"}

    total, losses = distiller(batch())
    assert student.training and total.dim() == 0 and torch.isfinite(total)
    assert {k for k in losses if k.startswith("det_")} == {"det_box", "det_obj", "det_cls"}
    assert {k for k in losses if k.startswith("kd")} == {"kd0_objectness_scaled", "kd1_fitnet"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in losses.values())
    assert losses["kd0_objectness_scaled"] > 0 and losses["kd1_fitnet"] > 0

    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in distiller.connectors.parameters())
    assert any(p.grad.abs().sum() > 0 for p in distiller.connectors.parameters())
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and all(torch.isfinite(g).all() for g in student_grads)
    # the step trains the student and the connectors: the teacher is not among its trainable parameters
    trainable = {id(p) for p in distiller.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*student.parameters(), *distiller.connectors.parameters()]}


def test_distiller_weights_the_terms_and_the_hard_loss():
    teacher, student = build("yolo_s"), build("yolo_p")
    terms = (response("objectness_scaled", weight=0.5), fitnet("neck.p3", weight=2.0))
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), settings(*terms))
    distiller = Distiller(student, teacher, report, hard_weight=0.0).eval()
    total, losses = distiller(batch())
    assert torch.allclose(total, 0.5 * losses["kd0_objectness_scaled"] + 2.0 * losses["kd1_fitnet"], rtol=1e-5)


def test_distiller_refuses_a_report_with_errors():
    report = check("yolo_s", "yolo_p_two_anchors", response("l2_logits"))
    with pytest.raises(PairingError, match="different anchors per location"):
        Distiller(build("yolo_p_two_anchors"), build("yolo_s"), report)


def test_distiller_reorders_teacher_classes_by_name():
    """A teacher that is the student with its class list (and class outputs) reversed teaches
    nothing new: every response term is zero once the classes are matched by name."""
    student = build("yolo_p").eval()
    head = student.head
    with torch.no_grad():
        for conv in head.convs:  # make the two classes' outputs clearly different
            conv.bias.view(head.num_anchors, head.num_outputs)[:, 5:] += torch.tensor([2.0, -2.0])
    teacher = copy.deepcopy(student)
    teacher.class_names = list(reversed(CLASSES))
    with torch.no_grad():
        for conv in teacher.head.convs:
            for param in (conv.weight, conv.bias):
                per_anchor = param.view(head.num_anchors, head.num_outputs, *param.shape[1:])
                per_anchor[:, 5:] = per_anchor[:, 5:].flip(1).clone()
    terms = [response(name) for name in RESPONSE_LOSSES]
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), settings(*terms))
    assert report.ok and report.teacher_classes == [1, 0]
    _, losses = Distiller(student, teacher, report).eval()(batch())
    for name in RESPONSE_LOSSES:
        assert losses[f"kd{RESPONSE_LOSSES.index(name)}_{name}"].item() == pytest.approx(0.0, abs=1e-6), name
    # the same teacher with its class names left as the student's compares class 0 with class 1
    teacher.class_names = list(CLASSES)
    unmatched = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), settings(*terms))
    _, losses = Distiller(student, teacher, unmatched).eval()(batch())
    assert losses[f"kd{RESPONSE_LOSSES.index('kl')}_kl"] > 1e-4


def test_distiller_fcos_teacher_to_yolo_student_gives_finite_terms():
    teacher, student = build("fcos_resnet18"), build("yolo_mobilenet").train()
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)),
                  settings(response("objectness_scaled"), response("kl"), fitnet("neck")))
    total, losses = Distiller(student, teacher, report).train()(batch())
    assert math.isfinite(total.item())
    assert all(math.isfinite(losses[key].item()) for key in ("kd0_objectness_scaled", "kd1_kl", "kd2_fitnet"))
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_l2_logits_refusal_across_families_does_not_suggest_anchors():
    error = check("fcos_resnet18", "yolo_p", response("l2_logits")).errors[0]
    assert "families differ (teacher fcos, student yolo)" in error
    assert "anchors" not in error


def test_kl_with_one_shared_class_suggests_sigmoid_mode():
    one = pair(spec("yolo_p", ("cell", "virus")), spec("yolo_p", ("cell", "bacterium")), settings(response("kl")))
    assert any("mode: sigmoid" in note for note in one.terms[0].notes)
    two = pair(spec("yolo_p"), spec("yolo_p"), settings(response("kl")))
    assert not any("sigmoid" in note for note in two.terms[0].notes)


def test_teacher_quality_ignores_classes_the_student_lacks():
    from kdet.distill.pairing import response_level
    from kdet.structures import HeadLevel

    cls = torch.tensor([-9.0, 5.0]).view(1, 1, 2, 1, 1)  # confident only in a class the student lacks
    level = HeadLevel("p3", 8, cls, torch.zeros(1, 1, 4, 1, 1), torch.zeros(1, 1, 1, 1, 1), "centerness", "ltrb")
    kept = response_level(level, "decoded", [0])
    assert kept.cls_logits.shape[2] == 1
    assert kept.quality.item() == pytest.approx(0.5 * torch.sigmoid(torch.tensor(-9.0)).item())
    assert response_level(level, "decoded", None).quality.item() == pytest.approx(0.5 * torch.sigmoid(torch.tensor(5.0)).item())


@pytest.mark.parametrize("name", DISTILL_LOSSES.names())
@pytest.mark.parametrize("pair_names", [("fcos_resnet18", "yolo_mobilenet"), ("yolo_s", "yolo_mobilenet")])
def test_every_loss_pairs_across_families_and_backbones_or_says_why(name, pair_names):
    """Each loss between an FCOS and a YOLO model, and between different backbones: one finite
    distillation step with gradients reaching the student, or a refusal before training that
    names the loss and what to use instead."""
    teacher, student = build(pair_names[0]), build(pair_names[1]).train()
    entry = DISTILL_LOSSES.get(name)
    term = response(name) if entry.kind == "response" else TermConfig(loss=name, student="neck", weight=1.0)
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), settings(term))
    if not report.ok:
        assert name in ("l2_logits", "ld"), report.errors  # raw maps, or box distributions only DFL heads have
        assert name in report.errors[0] and ("Use " in report.errors[0] or "use " in report.errors[0])
        return
    total, losses = Distiller(student, teacher, report).train()(batch())
    assert math.isfinite(losses[f"kd0_{name}"].item())
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
