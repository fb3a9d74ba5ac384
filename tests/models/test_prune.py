"""Prune, then distil (source document 001): kdet prune removes channels of a trained detector,
the checkpoint's channel plan rebuilds it for every command, and kdet distill trains the pruned
model as the student of the unpruned one."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("torch_pruning")

from conftest import tiny_config_dict  # noqa: E402

from kdet.cli import main  # noqa: E402
from kdet.config import ModelConfig  # noqa: E402
from kdet.engine.checkpoint import load_detector  # noqa: E402
from kdet.models import build_model  # noqa: E402
from kdet.models.prune import apply_channel_plan, channel_plan, prune_detector  # noqa: E402


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [ModelConfig(size="p", anchors="default"), ModelConfig(size="p", head="dfl"),
                                    ModelConfig(backbone="mobilenet_v3_small", width=0.5, size="p", anchors="default")],
                         ids=["anchor", "dfl", "mobilenet"])
def test_pruned_model_is_rebuilt_from_its_channel_plan(config):
    torch.manual_seed(0)
    model = build_model(config, ["a", "b"], 64).eval()
    images = torch.rand(2, 3, 64, 64)
    pruned = prune_detector(model, 64, 0.5, log=lambda _: None)
    assert params(pruned) < 0.45 * params(build_model(config, ["a", "b"], 64))
    plan = channel_plan(pruned, build_model(config, ["a", "b"], 64))
    rebuilt = build_model(config.model_copy(update={"channels": plan}), ["a", "b"], 64).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        for ours, theirs in zip(rebuilt(images).head, pruned(images).head):
            assert torch.allclose(ours.cls_logits, theirs.cls_logits, atol=1e-5)
    with pytest.raises(ValueError, match="another architecture"):
        apply_channel_plan(build_model(ModelConfig(family="fcos"), ["a", "b"], 64), plan)


def test_prune_then_distil_with_the_unpruned_teacher(shapes_voc, teacher_checkpoint, tmp_path, capsys):
    pruned = tmp_path / "pruned.pt"
    assert main(["prune", str(teacher_checkpoint), "--ratio", "0.5", "--out", str(pruned)]) == 0
    assert "pruned 50% of the channels (l1)" in capsys.readouterr().out
    model, payload = load_detector(pruned, log=lambda _: None)
    teacher, _ = load_detector(teacher_checkpoint, log=lambda _: None)
    assert params(model) < 0.45 * params(teacher) and payload["prune_ratio"] == 0.5
    assert main(["eval", str(pruned), "--data", str(shapes_voc), "--json"]) == 0
    assert main(["prune", str(teacher_checkpoint), "--method", "taylor", "--data", str(shapes_voc), "--batches", "1",
                 "--out", str(tmp_path / "taylor.pt")]) == 0

    config = tiny_config_dict(shapes_voc, epochs=1)
    config["model"] = {**config["model"], "size": "t", "weights": str(pruned)}
    config["teacher"] = {"checkpoint": str(teacher_checkpoint)}
    config["distill"] = {"terms": [{"loss": "objectness_scaled"}, {"loss": "pkd", "student": "neck"}]}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["check", str(path)]) == 0
    out = tmp_path / "run"
    assert main(["distill", str(path), "--out", str(out)]) == 0
    assert "is a pruned model: building it with its channel plan" in capsys.readouterr().out
    student, _ = load_detector(out / "best.pt", log=lambda _: None)
    assert params(student) == params(model)
    assert json.loads((out / "results.json").read_text())["teacher"]["checkpoint"] == str(teacher_checkpoint)
