"""kdet prune on the Ultralytics family: YOLOv8, YOLO11 and YOLO26 (end-to-end head, attention in C2PSA
and C3k2) built from their yamls, pruned through the CLI from a kdet or an Ultralytics checkpoint,
rebuilt from the channel plan by kdet's checkpoint loader, and exact: the pruned network computes
what the unpruned one computes with the removed channels zeroed."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
pytest.importorskip("torch_pruning")
pytest.importorskip("ultralytics")
from kdet.models.ultralytics import import_ultralytics  # noqa: E402

import_ultralytics()

from kdet.cli import main  # noqa: E402
from kdet.config import ModelConfig  # noqa: E402
from kdet.engine.checkpoint import load_detector, model_payload, save_atomic  # noqa: E402
from kdet.models import build_model  # noqa: E402
from kdet.models.prune import apply_channel_plan, output_layers, prune_detector  # noqa: E402
from kdet.models.ultralytics import save_ultralytics_checkpoint  # noqa: E402

CLASSES = ["bar", "square"]
SIZE = 64


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def raw_maps(output) -> list[torch.Tensor]:
    return [t for level in output.head for t in (level.cls_logits, level.box_dist if level.box_dist is not None else level.box)]


def tagged(config: ModelConfig):
    """A model whose BatchNorm channels carry their index in ``running_var`` (1 + 1e-4 i, read back
    after pruning), with random class and box output convs without bias so that every map varies
    about zero."""
    from ultralytics.nn.modules.conv import Conv

    torch.manual_seed(0)
    model = build_model(config, CLASSES, SIZE).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Conv):
                module.bn.running_var.copy_(1 + 1e-4 * torch.arange(module.bn.num_features, dtype=torch.float32))
                module.bn.running_mean.normal_(0, 0.1)
        for layer in output_layers(model):
            if isinstance(layer, torch.nn.Conv2d) and layer.weight.requires_grad:
                layer.weight.normal_()
                layer.bias.zero_()
    return model


def zero_removed(original, pruned):
    """``original`` with the channels ``pruned`` lacks zeroed (conv rows, BN scale, shift and mean):
    they contribute exactly nothing, so it must compute what ``pruned`` does."""
    from ultralytics.nn.modules.conv import Conv

    kept = dict(pruned.named_modules())
    original = copy.deepcopy(original)
    removed = 0
    with torch.no_grad():
        for name, module in original.named_modules():
            if isinstance(module, Conv):
                index = ((kept[name].bn.running_var - 1) * 1e4).round().long()
                drop = torch.ones(module.bn.num_features, dtype=torch.bool)
                drop[index] = False
                removed += int(drop.sum())
                for tensor in (module.conv.weight, module.bn.weight, module.bn.bias, module.bn.running_mean):
                    tensor[drop] = 0
    return original, removed


@pytest.mark.parametrize("yaml_name, source_format", [("yolov8n.yaml", "kdet"), ("yolo11n.yaml", "kdet"),
                                                     ("yolo26n.yaml", "ultralytics")])
def test_ultralytics_model_is_pruned_rebuilt_and_exact(yaml_name, source_format, tmp_path, capsys):
    config = ModelConfig(family="ultralytics", config=yaml_name)
    model = tagged(config)
    source, pruned_path = tmp_path / "model.pt", tmp_path / "pruned.pt"
    if source_format == "kdet":
        save_atomic(model_payload(model, config, SIZE), source)
    else:
        save_ultralytics_checkpoint(model, source, SIZE)
    assert main(["prune", str(source), "--ratio", "0.5", "--out", str(pruned_path)]) == 0
    assert "pruned 50% of the channels (l1)" in capsys.readouterr().out

    pruned, payload = load_detector(pruned_path, log=lambda _: None)  # kdet's loader: the plan rebuilds it
    plan = payload["model_config"]["channels"]
    assert plan and payload["prune_ratio"] == 0.5
    assert params(pruned) < 0.5 * params(model)
    rebuilt = apply_channel_plan(build_model(config, CLASSES, SIZE), plan)  # a fresh network from the yaml
    rebuilt.load_state_dict(pruned.state_dict())

    before, after = dict(model.named_modules()), dict(pruned.named_modules())
    outputs = [name for name, module in model.named_modules() if any(module is layer for layer in output_layers(model))]
    assert len(outputs) == (13 if pruned.end2end else 7)  # class and box convs of every level and branch, and DFL
    for name in outputs:  # their output channels (inputs may shrink)
        for key, tensor in before[name].state_dict().items():
            assert after[name].state_dict()[key].shape[0] == tensor.shape[0], name

    images = torch.rand(2, 3, SIZE, SIZE)
    reference, removed = zero_removed(model, pruned)
    assert removed > 0
    with torch.no_grad():
        ours, theirs = pruned(images, decode=True), reference(images)
    for mine, expected in zip(raw_maps(ours), raw_maps(theirs)):
        assert mine.shape == expected.shape
        assert (mine - expected).abs().max() <= 1e-5 * expected.std()
    assert len(ours.detections) == 2

    # as an Ultralytics checkpoint: Ultralytics predicts with it, kdet rebuilds it from the plan it carries
    exported = tmp_path / "ultralytics.pt"
    assert main(["export", str(pruned_path), "--format", "ultralytics", "--out", str(exported)]) == 0
    from ultralytics import YOLO

    image = (torch.rand(SIZE, SIZE, 3) * 255).to(torch.uint8).numpy()
    assert len(YOLO(str(exported)).predict(image, imgsz=SIZE, device="cpu", verbose=False)) == 1
    again, _ = load_detector(exported, log=lambda _: None)
    assert params(again) == params(pruned)


def test_ultralytics_taylor_pruning_trains():
    model = build_model(ModelConfig(family="ultralytics", config="yolo11n.yaml"), CLASSES, SIZE)
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    unpruned = params(model)
    prune_detector(model, SIZE, 0.5, method="taylor", batches=[(images, targets)], log=lambda _: None)
    assert params(model) < 0.5 * unpruned
    model.train()
    model(images, targets).loss.backward()


def test_an_unknown_ultralytics_block_is_named():
    from ultralytics.nn.tasks import yaml_model_load

    network = yaml_model_load("yolo11n.yaml")
    network["backbone"][-1] = [-1, 1, "PSA", [1024]]
    model = build_model(ModelConfig(family="ultralytics", config=network), CLASSES, SIZE)
    with pytest.raises(ValueError, match="Ultralytics block PSA"):
        prune_detector(model, SIZE, 0.5, log=lambda _: None)
