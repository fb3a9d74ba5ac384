"""Self distillation: the student's own moving average as its teacher (mean teacher)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdet.config import ConfigError, DistillConfig, ModelConfig, validate_config
from kdet.distill.compare import collect_runs, comparison_rows
from kdet.distill.run import distill
from kdet.distill.setup import pair_config
from kdet.engine.ema import ModelEMA
from kdet.engine.step import Batch
from kdet.engine.trainer import EMAHook, train
from kdet.models import build_model
from conftest import interrupt_then_resume, tiny_config_dict


def quiet(_: str) -> None:
    pass


def self_config(data, **train) -> dict:
    config = tiny_config_dict(data, epochs=2, **train)
    config["teacher"] = {"self": "ema"}
    config["distill"] = {"terms": [{"loss": "kl", "weight": 1.0, "args": {"mode": "sigmoid"}},
                                   {"loss": "fitnet", "student": "neck.p3", "weight": 0.5}]}
    return config


def test_the_mean_teacher_is_the_students_ema():
    from kdet.distill.distiller import Distiller

    config = self_config("unused")
    config["teacher"] = {"self": "ema", "batch_stats": False}  # the average in eval mode, as it is read below
    config = validate_config(config, schema=DistillConfig)
    torch.manual_seed(0)
    student = build_model(ModelConfig(family="yolo", backbone="cspdarknet", size="p", anchors="default"), ["a", "b"], 64)
    links, pairing = pair_config(config, student, ["a", "b"])
    assert pairing.ok and links[0].mode == "ema"
    assert any("exponential moving average" in note for note in links[0].report.notes)  # kdet check shows it
    step = Distiller(student, links, pairing).train()
    assert not list(step.teachers)  # the EMA is the trainer's, not a module of the step
    ema = ModelEMA(student, 0.9, ramp=1)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(0.05)  # an average that differs from the student
    step.before_train(SimpleNamespace(hooks=[step, EMAHook(ema, student)]))
    assert step.links[0].model is ema.module and student.training
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 20.0]]), "labels": torch.tensor([0])}] * 2
    step.eval()
    _, losses = step(Batch.of(images, targets))
    from kdet.distill.losses import kl
    from kdet.distill.pairing import response_level

    s_out, t_out = student(images), ema.module(images)
    expected = kl([response_level(lv, "raw", None) for lv in s_out.head], [response_level(lv, "raw", None) for lv in t_out.head],
                  mode="sigmoid")
    assert losses["kd0_kl"].item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    # no EMA to read: a clear error
    with pytest.raises(ConfigError, match="train.ema: true"):
        step.before_train(SimpleNamespace(hooks=[step]))


def test_mean_teacher_run_resumes_exactly_and_has_no_teacher_row(shapes_voc, tmp_path, monkeypatch):
    config = validate_config(self_config(shapes_voc), schema=DistillConfig)
    straight = tmp_path / "straight"
    results = distill(config, straight, log=quiet, progress=False)
    assert "teacher" not in results and "teachers" not in results
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_kd0_kl"] >= 0 and "loss_kd1_fitnet" in r for r in records)

    resumed = tmp_path / "resumed"
    interrupt_then_resume(distill, config, resumed, monkeypatch)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    base = tiny_config_dict(shapes_voc, epochs=2)
    train(validate_config(base), tmp_path / "base", log=quiet, progress=False)
    rows = comparison_rows(collect_runs([tmp_path / "base", straight]))
    assert [r["role"] for r in rows] == ["baseline", "distilled"] and rows[1]["teacher"] == "self (ema)"


@pytest.mark.parametrize("change, message", [
    ({"train": {"ema": False}}, "set train.ema: true"),
    ({"distill": {"cache": {"dir": "somewhere"}}}, "cannot be cached"),
    ({"teacher": {"self": "ema", "checkpoint": "x.pt"}}, "teacher.self: ema makes the student's own moving average"),
    ({"teacher": [{"self": "ema"}, {"checkpoint": "x.pt"}]}, "a teacher on its own"),
    ({"distill": {"terms": [{"loss": "kl", "weight": "auto"}]}}, r"distill.terms.0 \(kl\): weight: auto is measured .* still the student"),
])
def test_what_a_mean_teacher_cannot_do_is_refused(shapes_voc, tmp_path, change, message):
    config = self_config(shapes_voc)
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key != "teacher" else value
    with pytest.raises(ConfigError, match=message):
        distill(validate_config(config, schema=DistillConfig), tmp_path / "run", log=quiet, progress=False)


def test_self_distillation_without_terms_is_refused_with_what_was_measured(shapes_voc):
    from kdet.distill.recipe import with_default_recipe

    config = self_config(shapes_voc)
    config["distill"] = {"terms": []}
    with pytest.raises(ConfigError, match=r"no default recipe for self distillation .* diverge .* Give the terms"):
        with_default_recipe(validate_config(config, schema=DistillConfig), log=quiet)


def test_batch_statistics_normalise_by_the_batch_and_leave_the_running_ones():
    from kdet.distill.teachers import batch_statistics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    images = torch.rand(4, 3, 8, 8)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), batch_statistics(model):
        out = model(images)
        assert not model[2].training  # dropout stays in eval mode: only the normalisation changes
    conv = model[0](images).detach()
    expected = torch.nn.functional.batch_norm(conv, None, None, model[1].weight, model[1].bias, training=True, eps=model[1].eps)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, model(images), atol=1e-3)  # eval mode reads the running statistics
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not model[1].training and model[1].track_running_stats


def test_a_mean_teacher_is_read_on_the_batchs_statistics_by_default():
    from kdet.distill.distiller import Distiller

    config = validate_config(self_config("unused"), schema=DistillConfig)  # teacher: {self: ema}, no batch_stats
    assert config.teacher.batch_stats is None and config.teacher.reads_batch_stats()
    torch.manual_seed(0)
    student = build_model(ModelConfig(family="yolo", backbone="cspdarknet", size="p", anchors="default"), ["a", "b"], 64)
    links, pairing = pair_config(config, student, ["a", "b"])
    assert links[0].batch_stats and any("teacher.batch_stats" in note for note in links[0].report.notes)
    step = Distiller(student, links, pairing).train()
    ema = ModelEMA(student, 0.9, ramp=1)
    step.before_train(SimpleNamespace(hooks=[step, EMAHook(ema, student)]))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    running = ema.module.state_dict()
    running = {k: v.clone() for k, v in running.items()}
    out = step.teacher_outputs(images, None)
    # the average, with the student's weights (ramp 1, no update yet), gives the student's training-mode outputs
    with torch.no_grad():
        train_mode = student.train()(images)
        eval_mode = ema.module(images)
    assert torch.allclose(out.head[0].cls_logits, train_mode.head[0].cls_logits, atol=1e-5)
    assert not torch.allclose(out.head[0].cls_logits, eval_mode.head[0].cls_logits, atol=1e-3)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, running[key]), key
    assert not ema.module.training


@pytest.mark.parametrize("teacher, cache, message", [
    ({"checkpoint": "x.pt", "batch_stats": True}, True, "teacher.batch_stats: with the batch's statistics .* cannot be cached"),
    ({"checkpoint": "x.pt", "batch_stats": True, "train": True}, False, "already normalises with the batch's statistics"),
])
def test_batch_stats_refusals(shapes_voc, tmp_path, teacher, cache, message):
    config = self_config(shapes_voc)
    config["teacher"] = teacher
    if cache:
        config["distill"] = {**config["distill"], "cache": {"dir": "somewhere"}}
    with pytest.raises(ConfigError, match=message):
        distill(validate_config(config, schema=DistillConfig), tmp_path / "run", log=quiet, progress=False)


def test_only_the_mean_teacher_reads_batch_statistics_by_default():
    from kdet.config import TeacherConfig

    assert not TeacherConfig(checkpoint="x.pt").reads_batch_stats()
    assert TeacherConfig(checkpoint="x.pt", batch_stats=True).reads_batch_stats()
    assert not TeacherConfig(self="ema", batch_stats=False).reads_batch_stats()
