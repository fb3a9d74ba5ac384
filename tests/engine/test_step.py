"""The training step and its hooks: the order hooks run in, a step owning two trained models,
and the step wrapped in DistributedDataParallel."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kdet.config import ModelConfig, validate_config
from kdet.engine.setup import build_optimizer, build_scheduler
from kdet.engine.step import Batch, HookBase, TrainStep
from kdet.engine.trainer import Trainer, train
from kdet.models import build_model

from conftest import tiny_config_dict

SIZE = 64


def detector(seed: int = 0, size: str = "p"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family="yolo", backbone="cspdarknet", size=size, anchors="default"), ["a", "b"], SIZE)


def batch(empty_second: bool = False) -> Batch:
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    second = torch.zeros((0, 4)) if empty_second else torch.tensor([[20.0, 8.0, 56.0, 36.0]])
    targets = [{"boxes": torch.tensor([[8.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
               {"boxes": second, "labels": torch.tensor([1])[: len(second)]}]
    return Batch.of(images, targets, [5, 7], epoch=3)


def test_batch_of_labelled_images():
    b = batch()
    assert b.indices == [5, 7] and b.epoch == 3 and b.view == 3
    assert b.labelled.dtype == torch.bool and b.labelled.tolist() == [True, True]


def test_plain_step_is_the_detectors_own_loss():
    model = detector()
    step = TrainStep(model)
    b = batch()
    loss, losses = step(b)
    expected = model(b.images, b.targets)
    assert torch.equal(loss, expected.loss)
    assert set(losses) == {"box", "obj", "cls"} and not any(v.requires_grad for v in losses.values())
    unlabelled = Batch(b.images, b.targets, b.indices, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="unlabelled"):
        step(unlabelled)


class Recorder(HookBase):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def before_train(self, trainer):
        self.calls.append("before_train")

    def before_epoch(self, trainer):
        self.calls.append(f"before_epoch {trainer.epoch}")

    def before_step(self, trainer):
        self.calls.append(f"before_step {trainer.epoch}.{trainer.iteration}")

    def after_step(self, trainer):
        assert trainer.loss is not None and not trainer.loss.requires_grad
        self.calls.append(f"after_step {trainer.epoch}.{trainer.iteration}")

    def after_epoch(self, trainer):
        self.calls.append(f"after_epoch {trainer.epoch}")

    def after_train(self, trainer):
        self.calls.append("after_train")


class RecordingStep(TrainStep):
    """The plain step, recording the progress it is given before each step."""

    def __init__(self, student) -> None:
        super().__init__(student)
        self.seen: list[float] = []

    def before_step(self, trainer):
        self.seen.append(trainer.progress)


def test_hooks_run_in_their_documented_order():
    config = validate_config(tiny_config_dict("unused", epochs=2))
    step = RecordingStep(detector())
    optimizer = build_optimizer(step, config)
    recorder = Recorder()
    trainer = Trainer(step, optimizer, build_scheduler(optimizer, config, 2), epochs=2, steps_per_epoch=2, hooks=[recorder])
    trainer.train(1, lambda epoch: [batch(), batch()])
    assert recorder.calls == [
        "before_train",
        "before_epoch 1", "before_step 1.0", "after_step 1.0", "before_step 1.1", "after_step 1.1", "after_epoch 1",
        "before_epoch 2", "before_step 2.0", "after_step 2.0", "before_step 2.1", "after_step 2.1", "after_epoch 2",
        "after_train",
    ]
    assert step.seen == [0.0, 0.25, 0.5, 0.75]  # the step is a hook too, called first


class MutualStep(TrainStep):
    """Two detectors trained together, each on its labels and on the other's objectness."""

    def __init__(self, first, second) -> None:
        super().__init__(first)
        self.peer = second

    def forward(self, batch: Batch):
        a = self.student(batch.images, batch.targets)
        b = self.peer(batch.images, batch.targets)
        mimic = sum(((x.score.sigmoid() - y.score.sigmoid().detach()).square().mean() +
                     (y.score.sigmoid() - x.score.sigmoid().detach()).square().mean()) for x, y in zip(a.head, b.head))
        loss = a.loss + b.loss + mimic
        return loss, {"a": a.loss.detach(), "b": b.loss.detach()}


def test_a_step_with_two_trained_models_sends_gradients_to_both():
    config = validate_config(tiny_config_dict("unused", epochs=1))
    first, second = detector(0), detector(1, "t")
    step = MutualStep(first, second)
    optimizer = build_optimizer(step, config)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*first.parameters(), *second.parameters()]}
    before = [p.detach().clone() for p in (next(first.parameters()), next(second.parameters()))]
    trainer = Trainer(step, optimizer, build_scheduler(optimizer, config, 1), epochs=1, steps_per_epoch=1)
    trainer.train(1, lambda epoch: [batch()])
    for model in (first, second):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    after = (next(first.parameters()), next(second.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_step_wrapped_in_ddp_runs_one_cpu_step():
    config = validate_config(tiny_config_dict("unused", epochs=1))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        step = TrainStep(detector())
        wrapped = nn.parallel.DistributedDataParallel(step)
        optimizer = build_optimizer(step, config)
        trainer = Trainer(step, optimizer, build_scheduler(optimizer, config, 1), epochs=1, steps_per_epoch=1, module=wrapped)
        trainer.train(1, lambda epoch: [batch()])
        assert torch.isfinite(trainer.loss)
        assert all(p.grad is not None for p in step.student.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_training_with_the_default_step_matches_the_loss_it_logs(shapes_voc, tmp_path):
    """One epoch through train(): the logged loss is the mean of the steps' detection losses."""
    import json

    out = tmp_path / "run"
    train(validate_config(tiny_config_dict(shapes_voc, epochs=1)), out, log=lambda _: None, progress=False)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss"] > 0 and {"loss_box", "loss_obj", "loss_cls"} <= set(record)
