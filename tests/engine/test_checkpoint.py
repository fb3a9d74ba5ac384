"""Checkpoints given the way users give them: a run directory, a last.pt, an edited file."""
from __future__ import annotations

import pytest
import torch

from kdet.cli import main
from kdet.config import ModelConfig
from kdet.engine.checkpoint import load_checkpoint, load_detector, model_payload, save_atomic
from kdet.models import build_model

CLASSES = ["bar", "square"]


def _checkpoint(path, size: str = "p") -> dict:
    config = ModelConfig(size=size, anchors="default")
    payload = model_payload(build_model(config, CLASSES, 64), config, 64)
    save_atomic(payload, path)
    return payload


def test_run_directory_stands_for_its_best_pt(tmp_path):
    run = tmp_path / "run"
    saved = _checkpoint(run / "best.pt")
    notes: list[str] = []
    model, payload = load_detector(run, log=notes.append)
    assert payload["class_names"] == CLASSES and notes == [f"{run} is a run directory: using its best.pt ({run / 'best.pt'})"]
    assert torch.equal(model.state_dict()[next(iter(saved["state_dict"]))], next(iter(saved["state_dict"].values())))


def test_last_pt_and_a_folder_without_best_pt_say_what_to_use(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "best.pt")
    save_atomic({"config": {}, "model": {}, "optimizer": {}, "run_state": {"epoch": 1}}, run / "last.pt")
    with pytest.raises(ValueError, match=f"training state .* use {run / 'best.pt'}"):
        load_checkpoint(run / "last.pt")
    (run / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="folder without best.pt .it holds last.pt"):
        load_checkpoint(run)


def test_weights_that_do_not_fit_the_checkpoints_own_config_are_named(tmp_path, capsys):
    payload = _checkpoint(tmp_path / "best.pt")
    payload["model_config"]["size"] = "t"  # edited: the weights are still size p
    save_atomic(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError) as info:
        load_detector(tmp_path / "edited.pt")
    message = str(info.value)
    assert "do not fit the model its own config describes (yolo cspdarknet-t, 2 classes)" in message
    assert "with another shape (e.g. " in message and "vs [" in message
    assert main(["export", str(tmp_path / "edited.pt")]) == 2
    err = capsys.readouterr().err
    assert "kdet export: error:" in err and "Traceback" not in err


def test_teacher_checkpoint_given_a_last_pt_says_to_use_best_pt(tmp_path):
    from kdet.config import ConfigError, TeacherConfig
    from kdet.distill.distiller import load_teacher

    run = tmp_path / "teacher_run"
    _checkpoint(run / "best.pt", size="t")
    save_atomic({"config": {}, "model": {}, "optimizer": {}, "run_state": {"epoch": 1}}, run / "last.pt")
    with pytest.raises(ConfigError, match=f"teacher.checkpoint: .* use {run / 'best.pt'}"):
        load_teacher(TeacherConfig(checkpoint=str(run / "last.pt")), CLASSES, 64)
    teacher, size = load_teacher(TeacherConfig(checkpoint=str(run)), CLASSES, 64)
    assert size == 64 and not any(p.requires_grad for p in teacher.parameters())
