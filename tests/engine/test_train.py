import json
from pathlib import Path

import pytest
import torch
import yaml

from kdet.config import ConfigError, validate_config
from kdet.engine.checkpoint import half_precision, load_checkpoint, load_detector, save_atomic
from kdet.engine.trainer import train
from kdet.losses.yolo import YOLOv5Loss

from conftest import tiny_config_dict

quiet = lambda message: None  # noqa: E731


def test_run_directory_holds_everything(shapes_voc, tmp_path):
    out = tmp_path / "run"
    results = train(validate_config(tiny_config_dict(shapes_voc)), out, log=quiet, progress=False)
    for name in ("config.yaml", "problems.json", "metrics.jsonl", "last.pt", "best.pt", "results.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert all("val" in l and "loss_box" in l for l in lines)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert isinstance(resolved["model"]["anchors"], list)  # 'auto' was resolved
    assert results["split"] == "test" and results["profile"]["params"] > 0
    import kdet

    assert results["code"]["version"] == kdet.__version__
    assert Path(results["code"]["path"]) == Path(kdet.__file__).resolve().parent
    model, payload = load_detector(out / "best.pt")
    assert model.class_names == ["bar", "square"] and payload["input_size"] == 64

    # a fp16 copy loads back as fp32 and predicts (nearly) the same maps
    save_atomic(half_precision(load_checkpoint(out / "best.pt")), out / "half.pt")
    assert (out / "half.pt").stat().st_size < 0.6 * (out / "best.pt").stat().st_size
    half, _ = load_detector(out / "half.pt")
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(images).head[0].cls_logits, half(images).head[0].cls_logits
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.05)


def test_interrupted_run_resumes_to_identical_weights(shapes_voc, tmp_path, monkeypatch):
    config = validate_config(tiny_config_dict(shapes_voc, epochs=3))
    straight = tmp_path / "straight"
    train(config, straight, log=quiet, progress=False)

    # interrupt the second run at the start of epoch 3, after last.pt of epoch 2 is written
    import kdet.engine.trainer as trainer

    real_loader = trainer.epoch_loader

    def stop_at_epoch_3(dataset, cfg, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_loader(dataset, cfg, epoch)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(trainer, "epoch_loader", stop_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, resumed, log=quiet, progress=False)
    monkeypatch.setattr(trainer, "epoch_loader", real_loader)
    train(config, resumed, resume=True, log=quiet, progress=False)

    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]


def test_existing_run_and_changed_config_are_refused(shapes_voc, tmp_path):
    config = tiny_config_dict(shapes_voc, epochs=1)
    out = tmp_path / "run"
    train(validate_config(config), out, log=quiet, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(validate_config(config), out, log=quiet, progress=False)
    changed = {**config, "train": {**config["train"], "lr": 0.1}}
    with pytest.raises(ConfigError, match=r"train.lr: 0.005 -> 0.1"):
        train(validate_config(changed), out, resume=True, log=quiet, progress=False)
    with pytest.raises(FileNotFoundError, match="last.pt"):
        train(validate_config(config), tmp_path / "empty", resume=True, log=quiet, progress=False)


def test_non_finite_loss_names_epoch_step_and_terms(shapes_voc, tmp_path, monkeypatch):
    real = YOLOv5Loss.__call__

    def poisoned(self, head, targets):
        losses = real(self, head, targets)
        losses["obj"] = losses["obj"] * float("nan")
        return losses

    monkeypatch.setattr(YOLOv5Loss, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 0.*'obj': nan"):
        train(validate_config(tiny_config_dict(shapes_voc)), tmp_path / "run", log=quiet, progress=False)


def test_missing_split_is_a_config_error(shapes_voc, tmp_path):
    config = tiny_config_dict(shapes_voc)
    config["data"]["val_split"] = "valid"
    with pytest.raises(ConfigError, match=r"data.val_split.*'valid'.*\['test', 'train', 'val'\]"):
        train(validate_config(config), tmp_path / "run", log=quiet, progress=False)
