"""The teacher-output cache: deterministic sample replay, cached equals live outputs, hits and
misses, resumed builds, disk-space refusal, and distillation runs with the cache."""
from __future__ import annotations

import json
import random
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdet.cli import main
from kdet.config import ConfigError, DistillConfig, validate_config
from kdet.data.pipeline import DetectionDataset
from kdet.distill import cache as cache_module
from kdet.distill.cache import TeacherCacheError, prepare
from kdet.distill.distiller import check_pairing
from kdet.distill.run import distill
from kdet.engine.trainer import load_data, resolve_model_config
from kdet.models import build_model
from conftest import tiny_config_dict


def quiet(_: str) -> None:
    pass


def distill_config(data: Path, teacher: Path, *, epochs: int = 2, cache: dict | None = None) -> DistillConfig:
    config = tiny_config_dict(data, epochs=epochs)
    config["teacher"] = {"checkpoint": str(teacher)}
    config["distill"] = {"terms": [{"loss": "objectness_scaled", "weight": 1.0},
                                   {"loss": "fitnet", "student": "neck.p3", "weight": 0.5}]}
    if cache is not None:
        config["distill"]["cache"] = cache
    return validate_config(config, schema=DistillConfig)


def parts(config: DistillConfig):
    """The training set, the teacher and the pairing report a run of ``config`` makes."""
    index = load_data(config, quiet)
    student = build_model(resolve_model_config(config, index, quiet), index.class_names, config.data.input_size)
    teacher, report = check_pairing(config, student, index.class_names)
    dataset = DetectionDataset(index.split(config.data.train_split), config.data.input_size,
                               augment=config.data.augment, seed=config.seed)
    return dataset, teacher, report


def open_cache(config: DistillConfig, dataset, teacher, report, log=quiet):
    return prepare(config.distill.cache, teacher=teacher, report=report, dataset=dataset, epochs=config.train.epochs,
                   batch_size=3, workers=0, log=log)


def test_a_training_sample_depends_only_on_seed_epoch_and_index(shapes_voc):
    config = tiny_config_dict(shapes_voc)
    config["data"]["augment"]["mosaic"] = 1.0
    config = validate_config(config)
    index = load_data(config, quiet)
    dataset = DetectionDataset(index.split("train"), 64, augment=config.data.augment, seed=5)
    first, target, _ = dataset.sample(3, 2)
    random.seed(123)
    torch.manual_seed(123)
    again, target_again, _ = dataset.sample(3, 2)
    assert torch.equal(first, again) and torch.equal(target["boxes"], target_again["boxes"])
    dataset.set_epoch(2)
    assert torch.equal(dataset[3][0], first)
    assert not torch.equal(dataset.sample(3, 3)[0], first)  # another epoch, another augmentation
    other_seed = DetectionDataset(index.split("train"), 64, augment=config.data.augment, seed=6)
    assert not torch.equal(other_seed.sample(3, 2)[0], first)
    # sampling leaves the caller's generators as they were
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    dataset.sample(5, 1)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("fp16", 2e-3)])
def test_cached_outputs_equal_the_live_teacher(shapes_voc, teacher_checkpoint, tmp_path, dtype, tolerance):
    config = distill_config(shapes_voc, teacher_checkpoint, cache={"dir": str(tmp_path / "cache"), "dtype": dtype})
    dataset, teacher, report = parts(config)
    cached, stats = open_cache(config, dataset, teacher, report)
    assert stats["used"] and stats["built_entries"] == 2 * len(dataset) and stats["views"] == 2
    indices = [4, 0, 2]
    for epoch in (1, 2):
        images = torch.stack([dataset.sample(i, epoch)[0] for i in indices])
        with torch.no_grad():
            live = teacher(images)
        stored = cached.outputs(indices, epoch, torch.device("cpu"))
        assert len(stored.head) == len(live.head)
        for a, b in zip(stored.head, live.head):
            assert a.name == b.name and a.stride == b.stride
            for part in ("cls_logits", "box", "score"):
                torch.testing.assert_close(getattr(a, part), getattr(b, part), rtol=tolerance, atol=tolerance)
        (feature,) = [f.teacher for plan in report.terms for f in plan.features]
        assert set(stored.features) == {feature}
        torch.testing.assert_close(stored.features[feature].tensor, live.features[feature].tensor, rtol=tolerance, atol=tolerance)
        assert stored.features[feature].stride == live.features[feature].stride


def test_second_run_reuses_the_cache_and_another_teacher_gets_its_own(shapes_voc, teacher_checkpoint, tmp_path):
    config = distill_config(shapes_voc, teacher_checkpoint, cache={"dir": str(tmp_path / "cache")})
    dataset, teacher, report = parts(config)
    _, first = open_cache(config, dataset, teacher, report)
    _, second = open_cache(config, dataset, teacher, report)
    assert first["built_entries"] == 2 * len(dataset)
    assert second["built_entries"] == 0 and second["reused_entries"] == 2 * len(dataset)
    assert second["path"] == first["path"]
    # a longer run builds only the views it lacks
    longer = distill_config(shapes_voc, teacher_checkpoint, epochs=3, cache={"dir": str(tmp_path / "cache")})
    _, third = open_cache(longer, dataset, teacher, report)
    assert third["built_entries"] == len(dataset) and third["path"] == first["path"]
    # changed weights: a subdirectory of its own, the old one left alone and named in the log
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    lines: list[str] = []
    _, changed = open_cache(config, dataset, teacher, report, log=lines.append)
    assert changed["path"] != first["path"] and changed["built_entries"] == 2 * len(dataset)
    assert any("differs in teacher weights" in line for line in lines)
    assert Path(first["path"], "manifest.json").is_file()


def test_an_interrupted_build_resumes_where_it_stopped(shapes_voc, teacher_checkpoint, tmp_path, monkeypatch):
    config = distill_config(shapes_voc, teacher_checkpoint, cache={"dir": str(tmp_path / "cache")})
    dataset, teacher, report = parts(config)
    calls = {"n": 0}
    real_forward = type(teacher).forward

    def fail_on_second_batch(self, *args, **kwargs):
        if args and args[0].shape[0] == 3:  # the build's batches, not the one-image probe
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(teacher), "forward", fail_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        open_cache(config, dataset, teacher, report)
    monkeypatch.setattr(type(teacher), "forward", real_forward)
    _, stats = open_cache(config, dataset, teacher, report)
    assert stats["built_entries"] == 2 * len(dataset) - 3  # the first batch of three was kept
    assert not list(Path(stats["path"]).rglob("*.tmp"))


def test_a_cache_the_disk_cannot_hold_is_refused_with_ways_to_need_less(shapes_voc, teacher_checkpoint, tmp_path, monkeypatch):
    config = distill_config(shapes_voc, teacher_checkpoint, epochs=8, cache={"dir": str(tmp_path / "cache"), "dtype": "fp32"})
    dataset, teacher, report = parts(config)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(TeacherCacheError) as error:
        open_cache(config, dataset, teacher, report)
    message = str(error.value)
    assert "needs" in message and "8 view(s)" in message
    assert "distill.cache.views=2" in message and "distill.cache.dtype=fp16" in message and "feature maps" in message
    assert not list((tmp_path / "cache").rglob("*.npy"))  # refused before anything was written


def test_only_the_views_of_epochs_that_distil_are_built(shapes_voc, teacher_checkpoint, tmp_path):
    config = distill_config(shapes_voc, teacher_checkpoint, epochs=4, cache={"dir": str(tmp_path / "cache")})
    dataset, teacher, report = parts(config)
    cached, stats = prepare(config.distill.cache, teacher=teacher, report=report, dataset=dataset, epochs=4, batch_size=3,
                            workers=0, log=quiet, distilled=(3, 4))  # distill.start_epoch: 3
    assert stats["views"] == 2 and stats["built_entries"] == 2 * len(dataset)
    assert cached.outputs([0], 3, torch.device("cpu")).head  # the epochs that distil read their views
    replayed = distill_config(shapes_voc, teacher_checkpoint, epochs=4, cache={"dir": str(tmp_path / "other"), "views": 2})
    _, stats = prepare(replayed.distill.cache, teacher=teacher, report=report, dataset=dataset, epochs=4, batch_size=3,
                       workers=0, log=quiet, distilled=(2, 2))  # start_epoch 2, stop_epoch 2: view 2 only
    assert stats["views"] == 1 and stats["built_entries"] == len(dataset)


def test_fewer_views_than_epochs_replay_them_in_turn(shapes_voc, teacher_checkpoint, tmp_path):
    config = distill_config(shapes_voc, teacher_checkpoint, epochs=5, cache={"dir": str(tmp_path / "cache"), "views": 2})
    dataset, teacher, report = parts(config)
    cached, stats = open_cache(config, dataset, teacher, report)
    assert stats["views"] == 2 and stats["built_entries"] == 2 * len(dataset)
    assert [cached.data_epoch(e) for e in range(1, 6)] == [1, 2, 1, 2, 1]


def test_distillation_with_the_cache_follows_the_live_run(shapes_voc, teacher_checkpoint, tmp_path):
    live = distill(distill_config(shapes_voc, teacher_checkpoint), tmp_path / "live", log=quiet, progress=False)
    config = distill_config(shapes_voc, teacher_checkpoint, cache={"dir": str(tmp_path / "cache"), "dtype": "fp32"})
    cached = distill(config, tmp_path / "cached", log=quiet, progress=False)
    assert cached["teacher_cache"]["used"] and cached["teacher_cache"]["built_entries"] > 0
    # the same batches and the same teacher outputs up to the rounding of the teacher's batches:
    # epoch 1 agrees to about 1e-6; the updates then amplify the rounding a little
    records = [[json.loads(line) for line in Path(tmp_path, run, "metrics.jsonl").read_text().splitlines()]
               for run in ("live", "cached")]
    for (a, b), rel in zip(zip(*records), (1e-4, 1e-2)):
        for key in a:
            if key.startswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), key
    assert cached["metrics"]["coco"]["AP"] == pytest.approx(live["metrics"]["coco"]["AP"], abs=0.02)
    again = distill(config, tmp_path / "again", log=quiet, progress=False)
    assert again["teacher_cache"]["built_entries"] == 0
    record = json.loads(Path(tmp_path, "again", "teacher_cache.json").read_text())
    assert record["reused_entries"] == cached["teacher_cache"]["built_entries"]


def test_cache_settings_without_a_directory_are_refused(shapes_voc, teacher_checkpoint, tmp_path):
    config = distill_config(shapes_voc, teacher_checkpoint, cache={"views": 2})
    with pytest.raises(ConfigError, match="--teacher-cache DIR"):
        distill(config, tmp_path / "run", log=quiet, progress=False)


def test_cache_command_builds_without_training(shapes_voc, teacher_checkpoint, tmp_path, capsys):
    data = tiny_config_dict(shapes_voc, epochs=2)
    data["teacher"] = {"checkpoint": str(teacher_checkpoint)}
    data["distill"] = {"terms": [{"loss": "kl", "weight": 1.0}]}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["cache", str(path), "--teacher-cache", str(tmp_path / "cache"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["used"] and list(stats["groups"]) == ["head"] and stats["bytes"] > 0
    assert np.load(Path(stats["path"], "head", "view0002.done.npy")).all()
    assert not (tmp_path / "runs").exists()
