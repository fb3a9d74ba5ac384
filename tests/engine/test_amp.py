"""Mixed precision (train.amp): bf16 on the CPU, the fp16 gradient scaler skipping steps whose
loss is not finite, and configs and checkpoints written when train.amp was a switch."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdet.engine.trainer as trainer_module
from kdet.config import ModelConfig, validate_config
from kdet.engine.setup import amp_settings, build_optimizer, build_scheduler
from kdet.engine.step import Batch, TrainStep
from kdet.engine.trainer import NON_FINITE_LIMIT, Trainer, train
from kdet.losses.yolo import YOLOv5Loss
from kdet.models import build_model

from conftest import tiny_config_dict

quiet = lambda message: None  # noqa: E731
SIZE = 64


def batch() -> Batch:
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[8.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 8.0, 56.0, 36.0]]), "labels": torch.tensor([1])}]
    return Batch.of(images, targets)


def detector():
    torch.manual_seed(0)
    return build_model(ModelConfig(family="yolo", backbone="cspdarknet", size="p", anchors="default"), ["a", "b"], SIZE)


def test_amp_settings_per_device():
    cpu = torch.device("cpu")
    assert amp_settings("none", cpu, quiet) == (None, False)
    assert amp_settings("bf16", cpu, quiet) == (torch.bfloat16, False)
    said = []
    assert amp_settings("fp16", cpu, said.append) == (None, False)  # what train.amp: true always did on the CPU
    assert "fp16 runs on CUDA only" in said[0] and "bf16" in said[0]


def test_bf16_runs_the_step_in_bfloat16_and_keeps_fp32_weights():
    model = detector()
    config = validate_config(tiny_config_dict("unused", epochs=1))
    step = TrainStep(model)
    optimizer = build_optimizer(step, config)
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(step, optimizer, build_scheduler(optimizer, config, 1), epochs=1, steps_per_epoch=1, amp_dtype=torch.bfloat16)
    trainer.train(1, lambda epoch: [batch()])
    assert seen == [torch.bfloat16]
    assert torch.isfinite(trainer.loss) and not trainer.skipped
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_in_bf16_on_the_cpu(shapes_voc, tmp_path):
    said = []
    config = validate_config(tiny_config_dict(shapes_voc, epochs=1, amp="bf16"))
    train(config, tmp_path / "run", log=said.append, progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["loss"] > 0 and "amp_skipped_steps" not in record  # no scaler without fp16
    assert any("bf16 mixed precision" in line for line in said)


def test_a_non_finite_loss_in_bf16_still_stops_naming_the_terms(shapes_voc, tmp_path, monkeypatch):
    real = YOLOv5Loss.__call__

    def poisoned(self, head, targets):
        losses = real(self, head, targets)
        losses["obj"] = losses["obj"] * float("nan")
        return losses

    monkeypatch.setattr(YOLOv5Loss, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 0.*'obj': nan"):
        train(validate_config(tiny_config_dict(shapes_voc, amp="bf16")), tmp_path / "run", log=quiet, progress=False)


def test_fp16_skips_a_step_whose_loss_is_not_finite_counts_and_logs_it(shapes_voc, tmp_path, monkeypatch):
    # fp16 with its gradient scaler, as on CUDA (torch runs both on the CPU too)
    monkeypatch.setattr(trainer_module, "amp_settings", lambda amp, device, log: (torch.float16, True))
    real, calls = YOLOv5Loss.__call__, []

    def poisoned_once(self, head, targets):
        losses = real(self, head, targets)
        calls.append(1)
        if len(calls) == 2:
            losses["obj"] = losses["obj"] * float("nan")
        return losses

    monkeypatch.setattr(YOLOv5Loss, "__call__", poisoned_once)
    said = []
    config = validate_config(tiny_config_dict(shapes_voc, epochs=1, batch_size=2, amp="fp16"))
    train(config, tmp_path / "run", log=said.append, progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["amp_skipped_steps"] >= 1 and record["loss"] == record["loss"]  # the NaN is left out of the mean
    assert any("skipped by the fp16 gradient scaler" in line for line in said)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert saved["scaler"]["scale"] < 65536.0  # the scaler's state goes into last.pt, lowered by the skip


class NaNStep(TrainStep):
    """A step whose loss is NaN from its ``start``-th call on."""

    def __init__(self, start: int) -> None:
        super().__init__(nn.Linear(2, 1))
        self.start, self.calls = start, 0

    def forward(self, batch):
        self.calls += 1
        loss = self.student(torch.ones(1, 2)).sum() ** 2
        if self.calls >= self.start:
            loss = loss * float("nan")
        return loss, {"term": loss.detach()}


def test_fp16_skipped_step_leaves_the_weights_and_too_many_in_a_row_stop_the_run():
    step = NaNStep(start=2)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = Trainer(step, optimizer, scheduler, epochs=1, steps_per_epoch=100, grad_clip=1.0,
                      scaler=torch.amp.GradScaler("cpu", enabled=True, init_scale=1.0), amp_dtype=torch.float16)
    trainer.run_step(batch())
    assert not trainer.skipped
    weights = step.student.weight.detach().clone()
    trainer.run_step(batch())
    assert trainer.skipped and torch.equal(step.student.weight, weights)
    with pytest.raises(FloatingPointError, match=rf"not finite in {NON_FINITE_LIMIT} steps in a row.*'term': nan"):
        for _ in range(NON_FINITE_LIMIT):
            trainer.run_step(batch())
    assert step.calls == NON_FINITE_LIMIT + 1


def test_configs_and_checkpoints_from_when_amp_was_a_switch(shapes_voc, tmp_path):
    assert validate_config(tiny_config_dict(shapes_voc, amp=True)).train.amp == "fp16"
    assert validate_config(tiny_config_dict(shapes_voc, amp=False)).train.amp == "none"
    config = tiny_config_dict(shapes_voc, epochs=1)
    run = tmp_path / "run"
    train(validate_config(config), run, log=quiet, progress=False)
    # last.pt as kdet wrote it before train.amp, data.cache and train.sync_bn
    saved = torch.load(run / "last.pt", weights_only=False)
    saved["config"]["train"]["amp"] = False
    saved["config"]["train"].pop("sync_bn")
    saved["config"]["data"]["cache_images"] = True
    for key in ("cache", "cache_dir"):
        saved["config"]["data"].pop(key)
    saved.pop("scaler")
    torch.save(saved, run / "last.pt")
    train(validate_config(tiny_config_dict(shapes_voc, epochs=2)), run, resume=True, log=quiet, progress=False)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
