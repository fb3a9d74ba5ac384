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


def test_resume_after_a_kill_during_a_checkpoint_write(shapes_voc, tmp_path):
    config = tiny_config_dict(shapes_voc, epochs=2)
    out = tmp_path / "run"
    train(validate_config(config), out, log=quiet, progress=False)
    # what kill -9 during epoch 3's last.pt write leaves: its metrics line, a temporary file
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines + [lines[-1].replace('"epoch": 2', '"epoch": 3')]) + "\n")
    (out / ".last.pt.k9x2ab.tmp").write_bytes(b"half a checkpoint")

    logged: list[str] = []
    config["train"]["epochs"] = 3
    train(validate_config(config), out, resume=True, log=logged.append, progress=False)

    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not list(out.glob(".*.tmp"))
    assert any("removed .last.pt.k9x2ab.tmp" in line for line in logged)
    assert any("metrics.jsonl: removed 1 record(s) written after the last checkpoint (epoch 2)" in line for line in logged)


def test_resume_from_a_damaged_last_pt_is_one_clear_error(shapes_voc, tmp_path, capsys):
    from kdet.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x80\x02 damaged")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(shapes_voc)))
    assert main(["train", str(config), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out / 'last.pt'} cannot be read" in err and "Traceback" not in err
    torch.save({"model": {}}, out / "last.pt")
    with pytest.raises(ValueError, match="not the training state kdet writes .it lacks config, model_config, optimizer"):
        train(validate_config(tiny_config_dict(shapes_voc)), out, resume=True, log=quiet, progress=False)


def test_exploding_loss_is_warned_and_a_healthy_one_is_not(shapes_voc, tmp_path):
    healthy: list[str] = []
    train(validate_config(tiny_config_dict(shapes_voc, epochs=1)), tmp_path / "ok", log=healthy.append, progress=False)
    assert not any("the loss is exploding" in line for line in healthy)

    exploding: list[str] = []
    config = tiny_config_dict(shapes_voc, epochs=1, lr=1000.0, batch_size=2, grad_clip=None, warmup_epochs=0)
    train(validate_config(config), tmp_path / "boom", log=exploding.append, progress=False)
    warnings = [line for line in exploding if "the loss is exploding" in line]
    assert len(warnings) == 1 and "lower train.lr" in warnings[0] and "epoch 1, step " in warnings[0]


def test_loss_watch_warns_once_per_order_of_growth():
    from types import SimpleNamespace

    from kdet.engine.watch import LossWatch

    logged: list[str] = []
    watch = LossWatch(logged.append)
    trainer = SimpleNamespace(epoch=1, iteration=0, optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]), loss=None)
    for loss in (2.0, 1.5, 150.0, 199.0, 250.0, 2e4, 1e12, 2e12):
        trainer.loss = torch.tensor(loss)
        watch.after_step(trainer)
    assert [line.split(" at ")[0] for line in logged] == [
        "warning: the loss is exploding: 250", "warning: the loss is exploding: 2e+04", "warning: the loss is exploding: 1e+12",
    ]


def test_model_weights_of_another_size_are_refused_unless_partial(shapes_voc, teacher_checkpoint, tmp_path):
    from kdet.config import ModelConfig
    from kdet.engine.setup import init_weights_from
    from kdet.models import build_model

    config = tiny_config_dict(shapes_voc)
    config["model"]["weights"] = str(teacher_checkpoint)  # size t; the model is size p
    with pytest.raises(ValueError, match=r"model.weights: .* does not fit the model: \d+ of the model's \d+ tensors .*"
                                         r"set model.partial_weights: true"):
        train(validate_config(config), tmp_path / "run", log=quiet, progress=False)
    model = build_model(ModelConfig(size="p", anchors="default"), ["bar", "square"], 64)
    logged: list[str] = []
    init_weights_from(model, str(teacher_checkpoint), logged.append, allow_partial=True)
    assert logged[-1].startswith("model.weights: loaded ") and "(partial load, model.partial_weights: true" in logged[-1]


def test_a_lost_split_is_named_with_its_cause_when_training(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "coco"
    for split in ("train", "valid"):
        (root / split).mkdir(parents=True)
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / split / "a.jpg")
        (root / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": "a.jpg", "width": 32, "height": 24}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": [1, 1, 8, 8]}],
            "categories": [{"id": 0, "name": "cell"}]}, indent=1))
    broken = root / "valid" / "_annotations.coco.json"
    broken.write_text(broken.read_text()[:50])  # a download cut short
    with pytest.raises(ConfigError, match=r"data.val_split: .*split 'val' is lost: valid/_annotations.coco.json, line \d+ cannot "
                                          r"be read: not valid JSON"):
        train(validate_config(tiny_config_dict(root)), tmp_path / "run", log=quiet, progress=False)


def test_a_validation_split_without_boxes_logs_an_undefined_ap(shapes_voc, tmp_path):
    """No box in the validation split: AP is undefined, said so in the log; training goes on."""
    import re
    import shutil

    data = tmp_path / "voc"
    shutil.copytree(shapes_voc, data)
    for stem in (data / "ImageSets" / "Main" / "val.txt").read_text().split():
        xml = data / "Annotations" / f"{stem}.xml"
        xml.write_text(re.sub(r"<object>.*?</object>", "", xml.read_text()))
    lines: list[str] = []
    train(validate_config(tiny_config_dict(data, epochs=1)), tmp_path / "run", log=lines.append, progress=False)
    assert any("val AP undefined" in line for line in lines)
