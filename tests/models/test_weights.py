"""Weights files that fit a model only in part are refused, unless a partial load is asked for;
every load says how many tensors it loaded."""
from __future__ import annotations

import pytest
import torch
import yaml

from kdet.cli import main
from kdet.config import ModelConfig, TeacherConfig
from kdet.models import build_model
from kdet.models.backbones import build_backbone

from conftest import tiny_config_dict

CLASSES = ["bar", "square"]


def test_pretrained_backbone_of_another_size_is_refused_unless_partial(tmp_path, capsys):
    other = build_backbone("cspdarknet", size="t").state_dict()
    for key in other:
        if key.endswith("num_batches_tracked"):
            other[key].fill_(7)  # the only tensors a size-t file shares in shape with a size-p model
    torch.save(other, tmp_path / "t.pt")
    own = build_backbone("cspdarknet", size="p")
    torch.save(own.state_dict(), tmp_path / "p.pt")

    build_model(ModelConfig(size="p", anchors="default", pretrained_backbone=str(tmp_path / "p.pt")), CLASSES, 64)
    total = len(own.state_dict())
    assert f"model.pretrained_backbone: loaded {total}/{total} tensors from {tmp_path / 'p.pt'}" in capsys.readouterr().err

    config = ModelConfig(size="p", anchors="default", pretrained_backbone=str(tmp_path / "t.pt"))
    with pytest.raises(ValueError) as info:
        build_model(config, CLASSES, 64)
    message = str(info.value)
    assert f"model.pretrained_backbone: {tmp_path / 't.pt'} does not fit the model" in message
    assert "165 with another shape (e.g. stem.0.weight [16, 3, 6, 6] vs [8, 3, 6, 6]" in message and "set model.partial_weights: true" in message

    model = build_model(config.model_copy(update={"partial_weights": True}), CLASSES, 64)
    err = capsys.readouterr().err
    shared = sum(1 for key in other if key.endswith("num_batches_tracked"))
    assert f"loaded {shared}/{total} tensors from {tmp_path / 't.pt'} (partial load, model.partial_weights: true; not loaded:" in err
    loaded = {k: int(v) for k, v in model.backbone.state_dict().items() if k.endswith("num_batches_tracked")}
    assert set(loaded.values()) == {7}  # what matched came from the file


def _teacher_weights(tmp_path, size: str):
    path = tmp_path / f"teacher_{size}.pt"
    torch.save(build_model(ModelConfig(size=size, anchors="default"), CLASSES, 64).state_dict(), path)
    return path


def test_teacher_weights_of_another_size_are_refused_unless_partial(tmp_path, capsys):
    from kdet.distill.distiller import load_teacher

    wrong = _teacher_weights(tmp_path, "p")  # the teacher is size t
    config = TeacherConfig(model=ModelConfig(size="t", anchors="default"), weights=str(wrong))
    with pytest.raises(ValueError, match=r"teacher.weights: .* does not fit the model: \d+ of the model's \d+ tensors match.*"
                                         r"set teacher.partial_weights: true"):
        load_teacher(config, CLASSES, 64)
    load_teacher(config.model_copy(update={"partial_weights": True}), CLASSES, 64)
    assert "(partial load, teacher.partial_weights: true" in capsys.readouterr().err
    right = _teacher_weights(tmp_path, "t")
    load_teacher(TeacherConfig(model=ModelConfig(size="t", anchors="default"), weights=str(right)), CLASSES, 64)
    assert "teacher.weights: loaded" in capsys.readouterr().err


def test_kdet_check_refuses_a_teacher_whose_weights_do_not_fit(shapes_voc, tmp_path, capsys):
    config = tiny_config_dict(shapes_voc)
    config["teacher"] = {"model": {"size": "t", "anchors": "default"}, "weights": str(_teacher_weights(tmp_path, "p"))}
    config["distill"] = {"terms": [{"loss": "objectness_scaled"}]}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    assert "does not fit the model" in captured.err and "pairing: OK" not in captured.out
