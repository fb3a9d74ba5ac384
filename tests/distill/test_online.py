"""Online (mutual) distillation: teacher.train: true trains the teacher in the same step."""
from __future__ import annotations

import json

import pytest
import torch

from kdet.cli import main
from kdet.config import ConfigError, DistillConfig, ModelConfig, validate_config
from kdet.distill.distiller import Distiller
from kdet.distill.losses import kl
from kdet.distill.pairing import response_level
from kdet.distill.run import distill
from kdet.distill.setup import pair_config
from kdet.engine.checkpoint import load_detector
from kdet.engine.step import Batch
from kdet.models import build_model
from conftest import interrupt_then_resume, tiny_config_dict

SIZE = 64


def quiet(_: str) -> None:
    pass


def online_dict(data, teacher: dict, *, epochs: int = 2, terms: list | None = None) -> dict:
    config = tiny_config_dict(data, epochs=epochs)
    config["teacher"] = {**teacher, "train": True}
    config["distill"] = {"terms": terms or [{"loss": "kl", "weight": 1.0, "args": {"mode": "sigmoid"}},
                                            {"loss": "fitnet", "student": "neck.p3", "weight": 0.5}]}
    return config


def yolo(size: str, seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family="yolo", backbone="cspdarknet", size=size, anchors="default"), ["bar", "square"], SIZE)


def test_the_step_trains_both_models_each_from_the_other():
    config = validate_config(online_dict("unused", {"model": {"size": "t", "anchors": "default"}}), schema=DistillConfig)
    student, teacher = yolo("p", 0), yolo("t", 1)
    teachers = [(config.teachers()[0], teacher, SIZE)]
    links, pairing = pair_config(config, student, ["bar", "square"], teachers=teachers)
    assert pairing.ok, pairing.all_errors()
    assert links[0].mode == "trained" and [p.index for p in links[0].reverse.terms] == [0]
    assert any("learns from it through distill.terms.0 (kl) in reverse" in n for n in links[0].report.notes)
    step = Distiller(student, links, pairing).train()
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    # the optimiser sees the student first, then the teacher
    params = list(step.parameters())
    assert params[: len(list(student.parameters()))] == list(student.parameters())
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 20.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 20.0, 44.0, 44.0]]), "labels": torch.tensor([1])}]
    step.eval()
    total, losses = step(Batch.of(images, targets))
    assert {"det_obj", "teacher_det_obj", "kd0_kl", "kd1_fitnet", "tkd0_kl"} <= set(losses)
    assert "tkd1_fitnet" not in losses  # feature terms teach the student only
    s_out, t_out = student(images, targets), teacher(images, targets)
    forward = kl([response_level(lv, "raw", None) for lv in s_out.head], [response_level(lv, "raw", None) for lv in t_out.head], mode="sigmoid")
    backward = kl([response_level(lv, "raw", None) for lv in t_out.head], [response_level(lv, "raw", None) for lv in s_out.head], mode="sigmoid")
    assert losses["kd0_kl"].item() == pytest.approx(forward.item(), rel=1e-5)
    assert losses["tkd0_kl"].item() == pytest.approx(backward.item(), rel=1e-5)
    assert total.item() == pytest.approx((s_out.loss + forward + 0.5 * losses["kd1_fitnet"] + t_out.loss + backward).item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in teacher.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_online_run_saves_and_scores_both_and_resumes_exactly(shapes_voc, teacher_checkpoint, tmp_path, monkeypatch, capsys):
    config = validate_config(online_dict(shapes_voc, {"checkpoint": str(teacher_checkpoint)}), schema=DistillConfig)
    straight = tmp_path / "straight"
    results = distill(config, straight, log=quiet, progress=False)
    teacher = results["teacher"]
    assert teacher["online"] and teacher["checkpoint"] == str(straight / "teacher_best.pt")
    assert teacher["started_from"] == str(teacher_checkpoint)
    record = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_det_obj", "loss_teacher_det_obj", "loss_kd0_kl", "loss_tkd0_kl", "loss_kd1_fitnet"} <= set(record)
    history = json.loads((straight / "teacher_metrics.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2] and history["epoch"] in (1, 2)
    # the teacher changed, and teacher_best.pt is a detector every command reads
    before, _ = load_detector(teacher_checkpoint)
    after, payload = load_detector(straight / "teacher_best.pt")
    assert payload["epoch"] == history["epoch"]
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    capsys.readouterr()
    assert main(["eval", str(straight / "teacher_best.pt"), "--data", str(shapes_voc), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coco"]["AP"] == pytest.approx(teacher["metrics"]["coco"]["AP"])  # scored as saved

    resumed = tmp_path / "resumed"
    interrupt_then_resume(distill, config, resumed, monkeypatch)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    teacher_keys = [k for k in a["objective"] if k.startswith("online.teacher.")]
    assert teacher_keys and all(torch.equal(a["objective"][k], b["objective"][k]) for k in teacher_keys)
    assert a["objective"]["online.best"] == b["objective"]["online.best"]


def test_a_teacher_trained_from_scratch(shapes_voc, tmp_path):
    """Deep Mutual Learning proper: both models start untrained; anchors: auto takes the student's."""
    config = online_dict(shapes_voc, {"model": {"size": "t"}}, epochs=1, terms=[{"loss": "objectness_scaled"}])
    results = distill(validate_config(config, schema=DistillConfig), tmp_path / "run", log=quiet, progress=False)
    assert results["teacher"]["started_from"] == "scratch"
    saved = torch.load(tmp_path / "run" / "teacher_best.pt", weights_only=False)
    student = yaml_model(tmp_path / "run")
    assert saved["model_config"]["anchors"] == student["anchors"] and saved["model_config"]["size"] == "t"


def yaml_model(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]


def test_what_online_distillation_cannot_do_is_refused(shapes_voc, teacher_checkpoint, tmp_path):
    base = online_dict(shapes_voc, {"checkpoint": str(teacher_checkpoint)})
    with_cache = {**base, "distill": {**base["distill"], "cache": {"dir": str(tmp_path / "cache")}}}
    with pytest.raises(ConfigError, match="cannot be cached"):
        distill(validate_config(with_cache, schema=DistillConfig), tmp_path / "a", log=quiet, progress=False)
    several = {**base, "teacher": [{"checkpoint": str(teacher_checkpoint), "train": True}, {"checkpoint": str(teacher_checkpoint)}]}
    with pytest.raises(ConfigError, match="trains one teacher beside the student"):
        distill(validate_config(several, schema=DistillConfig), tmp_path / "b", log=quiet, progress=False)
    # a teacher of other classes cannot learn this data's labels
    student, teacher = yolo("p", 0), yolo("t", 1)
    teacher.class_names = ["square", "bar"]
    config = validate_config(online_dict("unused", {"model": {"size": "t"}}), schema=DistillConfig)
    _, pairing = pair_config(config, student, ["bar", "square"], teachers=[(config.teachers()[0], teacher, SIZE)])
    assert any("needs the data's classes in order" in error for error in pairing.all_errors())


def _distil_in_process(rank: int, world: int, port: int, config: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        distill(DistillConfig.model_validate(config), out, log=quiet, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_train_the_teacher_together(shapes_voc, teacher_checkpoint, tmp_path):
    """Under torchrun both models are trained by every process and validated in shares; rank 0
    writes teacher_best.pt and its record once."""
    import socket

    import torch.multiprocessing as mp

    config = online_dict(shapes_voc, {"checkpoint": str(teacher_checkpoint)}, epochs=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_distil_in_process, args=(2, port, config, str(tmp_path / "two")), nprocs=2, join=True, start_method="fork")
    history = json.loads((tmp_path / "two" / "teacher_metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["teacher"]["online"] and (tmp_path / "two" / "teacher_best.pt").is_file()
