"""What the distiller passes to losses besides the two models' maps (ground truth, strides,
assignment, masks, modules), weight: auto and the stop epoch."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from kdet.config import AutoWeightConfig, ConfigError, DistillConfig, DistillSettings, ModelConfig, TermConfig, validate_config
from kdet.distill.distiller import BatchContext, Distiller, box_mask
from kdet.distill.losses import DISTILL_LOSSES, DistillLoss
from kdet.distill.pairing import pair
from kdet.distill.run import distill
from kdet.engine.step import Batch
from kdet.models import build_model

from conftest import tiny_config_dict

SIZE = 64
CLASSES = ["a", "b"]


def build(size: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family="yolo", backbone="cspdarknet", size=size, anchors="default"), CLASSES, SIZE)


def batch() -> Batch:
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[8.0, 12.0, 40.0, 44.0], [44.0, 40.0, 60.0, 62.0]]), "labels": torch.tensor([0, 1])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]  # an image with no boxes
    return Batch.of(images, targets)


@pytest.fixture
def probe_loss():
    """A feature loss registered for one test that records what the distiller passes it."""
    seen: list[dict] = []

    def probe(student, teacher, *, gt_boxes, gt_labels, stride, input_size, labelled, assignment, mask, module, scale: float = 1.0):
        seen.append(dict(gt_boxes=gt_boxes, gt_labels=gt_labels, stride=stride, input_size=input_size, labelled=labelled,
                         assignment=assignment, mask=mask, module=module, shapes=(student.shape, teacher.shape)))
        return scale * (module(student) - teacher).square().mean()

    DISTILL_LOSSES._items["probe"] = DistillLoss(probe, "feature", module=lambda s, t: nn.Conv2d(t, t, 1))
    yield seen
    del DISTILL_LOSSES._items["probe"]


def test_a_loss_that_declares_context_receives_it(probe_loss):
    teacher, student = build("t"), build("p", 1)
    term = TermConfig(loss="probe", student="neck", mask="gt", args={"scale": 2.0})
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), DistillSettings(terms=[term]))
    assert report.ok, report.errors
    assert any("ground-truth boxes" in note and "target assignment" in note for note in report.terms[0].notes)
    distiller = Distiller(student, teacher, report).train()
    assert set(distiller.loss_modules) == {"term0_neck_p3", "term0_neck_p4", "term0_neck_p5"}
    b = batch()
    total, _ = distiller(b)
    assert [call["stride"] for call in probe_loss] == [8, 16, 32]
    for call in probe_loss:
        assert torch.equal(call["gt_boxes"][0], b.targets[0]["boxes"]) and call["gt_boxes"][1].shape == (0, 4)
        assert call["gt_labels"][0].tolist() == [0, 1] and len(call["gt_labels"][1]) == 0
        assert call["input_size"] == (SIZE, SIZE) and call["labelled"].tolist() == [True, True]
        n, _, h, w = call["shapes"][1]
        assert call["mask"].shape == (n, 1, h, w) and call["mask"][1].sum() == 0 and call["mask"][0].sum() > 0
        assert call["assignment"].shape == (n, h, w) and (call["assignment"][1] == -1).all()
        assert set(call["assignment"][0].unique().tolist()) <= {-1, 0, 1}
    assert (probe_loss[0]["assignment"][0] >= 0).any()
    total.backward()
    assert all(p.grad is not None for p in distiller.loss_modules.parameters())


def test_context_cannot_be_set_as_an_argument(probe_loss):
    teacher, student = build("t"), build("p", 1)
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)),
                  DistillSettings(terms=[TermConfig(loss="probe", student="neck.p3", args={"stride": 4})]))
    assert any("stride is filled in by the distiller" in error for error in report.errors)


def test_gt_mask_is_refused_for_a_loss_without_one():
    teacher, student = build("t"), build("p", 1)
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)),
                  DistillSettings(terms=[TermConfig(loss="objectness_scaled", mask="gt")]))
    assert any("does not take a ground-truth mask" in error and "fitnet" in error for error in report.errors)


def test_box_mask_marks_every_cell_a_box_overlaps():
    targets = [{"boxes": torch.tensor([[8.0, 0.0, 24.0, 9.0], [60.0, 60.0, 61.0, 61.0]])}]
    mask = box_mask(targets, 8, (8, 8))[0, 0]
    expected = torch.zeros(8, 8)
    expected[0:2, 1:3] = 1  # x 8..24 -> columns 1, 2; y 0..9 -> rows 0, 1
    expected[7, 7] = 1  # a box smaller than a cell marks the cell it lies in
    assert torch.equal(mask, expected)


def test_yolo_assignment_names_the_object_of_each_positive():
    model = build("p")
    b = batch()
    out = model(b.images)
    owners = model.assign(out.head, b.targets)
    assert [tuple(o.shape) for o in owners] == [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2)]
    assert all((o[1] == -1).all() for o in owners)  # the image without boxes has no positive
    found = set().union(*(set(o[0].unique().tolist()) for o in owners))
    assert found == {-1, 0, 1}


def test_fitnet_with_a_gt_mask_averages_inside_the_boxes():
    fitnet = DISTILL_LOSSES.get("fitnet").fn
    student, teacher = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    student[0, :, 0, 0] = 1.0  # equal to the teacher at (0, 0) only
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert fitnet(student, teacher, teacher_activation="none", mask=mask).item() == pytest.approx(0.5)
    assert fitnet(student, teacher, teacher_activation="none").item() == pytest.approx(0.75)


def test_auto_weight_balances_gradients_and_is_kept():
    teacher, student = build("t"), build("p", 1)
    term = TermConfig(loss="fitnet", student="neck.p3", weight="auto")
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), DistillSettings(terms=[term]))
    messages = []
    distiller = Distiller(student, teacher, report, auto=AutoWeightConfig(fraction=0.25, steps=2), log=messages.append).train()
    b = batch()
    distiller(b)
    first = distiller.auto_weights()["distill.terms.0"]
    # check the first measurement by hand: weight * |grad term| = 0.25 * |grad detection loss|
    out, teacher_out = student(b.images, b.targets), teacher(b.images)
    value = distiller.term(report.terms[0], out, teacher_out, BatchContext(b, out, teacher_out, distiller))
    params = [p for p in student.parameters()]
    norm = lambda v: torch.stack([g.square().sum() for g in torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
                                  if g is not None]).sum().sqrt()
    assert first == pytest.approx(0.25 * norm(out.loss).item() / norm(value).item(), rel=1e-4)
    distiller(b)
    chosen = distiller.auto_weights()["distill.terms.0"]
    assert messages and "weight auto ->" in messages[0]
    distiller(b)  # fixed after auto.steps steps
    assert distiller.auto_weights()["distill.terms.0"] == chosen
    # saved with the run and restored
    fresh = Distiller(student, teacher, report, auto=AutoWeightConfig(fraction=0.25, steps=2))
    fresh.load_saved_state(distiller.state_dict_to_save())
    assert fresh.auto_weights()["distill.terms.0"] == chosen and fresh.auto_state[0][1] == 2


def test_start_epoch_is_a_burn_in(shapes_voc, teacher_checkpoint, tmp_path):
    out = tmp_path / "run"
    distill(run_config(shapes_voc, teacher_checkpoint, start_epoch=2), out, log=lambda _: None, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss_kd0_fitnet" not in records[0] and "loss_kd0_fitnet" in records[1]
    assert "distillation in epochs 2 to 2 of 2" in (out / "pairing.json").read_text()  # what kdet check shows


@pytest.mark.parametrize("settings, words", [
    ({"start_epoch": 3}, "distill.start_epoch: 3 is after the last epoch (train.epochs: 2)"),
    ({"start_epoch": 2, "stop_epoch": 1}, "distill.stop_epoch: 1 is before distill.start_epoch: 2"),
])
def test_distillation_epochs_that_distil_nothing_are_refused(shapes_voc, teacher_checkpoint, settings, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        run_config(shapes_voc, teacher_checkpoint, **settings)


def run_config(data, teacher, **distill_settings) -> DistillConfig:
    config = tiny_config_dict(data, epochs=2)
    config["teacher"] = {"checkpoint": str(teacher)}
    config["distill"] = {"terms": [{"loss": "fitnet", "student": "neck.p3", "weight": "auto"}], **distill_settings}
    return validate_config(config, schema=DistillConfig)


def test_stop_epoch_and_auto_weight_in_a_run(shapes_voc, teacher_checkpoint, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    distill(run_config(shapes_voc, teacher_checkpoint, stop_epoch=1, auto={"steps": 1}), out, log=lines.append, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss_kd0_fitnet" in records[0] and "loss_kd0_fitnet" not in records[1]
    assert any("weight auto ->" in line for line in lines)
    weights = json.loads((out / "auto_weights.json").read_text())
    assert weights["distill.terms.0"] > 0
    saved = torch.load(out / "last.pt", weights_only=False)["objective"]
    assert saved["auto_weight.0"][0].item() == pytest.approx(weights["distill.terms.0"])
