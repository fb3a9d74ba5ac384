"""Unlabelled images: where they come from, which join each batch, the detection loss on the
labelled images only, pseudo-labels with feature-map NMS, the teacher cache on them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdet.cli import main
from kdet.config import ConfigError, DistillConfig, ModelConfig, validate_config
from kdet.data import DataError, read_dataset
from kdet.data.pipeline import DetectionDataset
from kdet.data.unlabelled import UnlabelledFeed, read_unlabelled
from kdet.distill.distiller import Distiller
from kdet.distill.pairing import pair
from kdet.distill.run import distill
from kdet.distill.unlabelled import feature_map_nms, merge_pseudo_labels, pseudo_labels, split_forward
from kdet.config import DistillSettings, TermConfig
from kdet.engine.step import Batch
from kdet.models import build_model
from kdet.structures import HeadLevel
from conftest import make_shapes_voc, tiny_config_dict

SIZE = 64


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def other_shapes(tmp_path_factory) -> Path:
    """Another shapes dataset (other images): unlabelled images for the runs on shapes_voc."""
    return make_shapes_voc(tmp_path_factory.mktemp("other") / "voc", images=10, seed=7)


def unlabelled_dict(data: Path, teacher: Path, unlabelled: Path, *, epochs: int = 1, **distill_settings) -> dict:
    config = tiny_config_dict(data, epochs=epochs)
    config["data"].update(unlabelled=str(unlabelled), unlabelled_ratio=0.5)
    config["teacher"] = {"checkpoint": str(teacher)}
    config["distill"] = {"terms": [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}},
                                   {"loss": "fitnet", "student": "neck.p3", "weight": 0.5}], **distill_settings}
    return config


def yolo(size: str, seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family="yolo", backbone="cspdarknet", size=size, anchors="default"), ["bar", "square"], SIZE)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def labelled_targets(n: int) -> list[dict]:
    return [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 20.0]]), "labels": torch.tensor([i % 2])} for i in range(n)]


def empty_targets(n: int) -> list[dict]:
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Where they come from and which join each batch
# ---------------------------------------------------------------------------------------------
def test_unlabelled_images_from_a_folder_or_a_dataset(shapes_voc, other_shapes, tmp_path):
    labelled = read_dataset(shapes_voc)
    lines: list[str] = []
    from_dataset = read_unlabelled(other_shapes, labelled, lines.append)
    assert len(from_dataset) == 10 and all(len(r.boxes) == 0 for r in from_dataset)  # labels ignored
    assert any("VOC dataset, labels ignored" in line for line in lines)

    folder = tmp_path / "photos" / "day1"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    lines.clear()
    from_folder = read_unlabelled(tmp_path / "photos", labelled, lines.append)
    assert sorted(r.image_id for r in from_folder) == ["day1/p0", "day1/p1", "day1/p2"]
    assert (from_folder[0].width, from_folder[0].height) == (50, 40)
    assert any("skipped" in line and "broken.jpg" in line for line in lines)

    # the labelled dataset's own images never come back as unlabelled ones, its test images least of all
    lines.clear()
    with pytest.raises(DataError, match="every one is in the labelled dataset"):
        read_unlabelled(shapes_voc, labelled, lines.append)
    assert any("2 of its test split" in line and "8 of its train split" in line for line in lines)


def test_each_step_gets_its_own_unlabelled_images(other_shapes):
    records = read_dataset(other_shapes).all_records()
    feed = UnlabelledFeed(DetectionDataset(records, SIZE, cache=False), 3, seed=5, offset=100)
    first, second = feed.order(1, 2), feed.order(2, 2)
    assert first == feed.order(1, 2) and len(first) == 6 and len(set(first)) == 6
    # epochs continue the passes over the set: 12 draws use every image once before any twice
    assert len(set(first + second[:4])) == 10
    chunks = list(feed.epoch(1, 1, 2))
    assert [c[2] for c in chunks] == [[100 + i for i in first[:3]], [100 + i for i in first[3:]]]
    assert all(c[0].shape == (3, 3, SIZE, SIZE) and all(len(t["boxes"]) == 0 for t in c[1]) for c in chunks)
    # two processes take the two parts of every chunk
    shares = [list(feed.epoch(1, 1, 2, rank=r, world=2)) for r in (0, 1)]
    assert [a[2] + b[2] for a, b in zip(*shares)] == [c[2] for c in chunks]


# ---------------------------------------------------------------------------------------------
# The detection loss on the labelled images only
# ---------------------------------------------------------------------------------------------
def test_a_mixed_batch_trains_the_detection_loss_on_labelled_images_only():
    student, teacher = yolo("p", 0).eval(), yolo("t", 1)
    x = images(4)
    batch = Batch(x, labelled_targets(2) + empty_targets(2), [0, 1, 10, 11], torch.tensor([True, True, False, False]))
    everything, own, on_unlabelled = split_forward(student, batch)
    alone = student(x[:2], labelled_targets(2))
    assert torch.allclose(own.loss, alone.loss) and on_unlabelled is None
    reference = student(x)  # eval mode: each image's outputs are its own
    for a, b in zip(everything.head, reference.head):
        assert torch.allclose(a.cls_logits, b.cls_logits, atol=1e-6)
    # any order of labelled and unlabelled images comes back in batch order
    shuffled = Batch(x[[2, 0, 3, 1]], [batch.targets[i] for i in (2, 0, 3, 1)], [10, 0, 11, 1], torch.tensor([False, True, False, True]))
    mixed, _, _ = split_forward(student, shuffled)
    assert torch.allclose(mixed.features["neck.p3"].tensor, reference.features["neck.p3"].tensor[[2, 0, 3, 1]], atol=1e-6)

    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), DistillSettings(terms=[TermConfig(loss="kl")]))
    step = Distiller(student, teacher, report).eval()
    _, losses = step(batch)
    assert losses["det_obj"].item() == pytest.approx(alone.losses["obj"].item(), rel=1e-6)
    _, labelled_only = step(Batch.of(x[:2], labelled_targets(2)))
    assert losses["kd0_kl"].item() != pytest.approx(labelled_only["kd0_kl"].item())  # the terms read every image


# ---------------------------------------------------------------------------------------------
# Pseudo-labels
# ---------------------------------------------------------------------------------------------
def test_feature_map_nms_keeps_one_cell_per_object_and_class():
    score = torch.zeros(1, 2, 4, 4)  # two anchors on a 4x4 level
    label = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    score[0, 0, 1, 1], score[0, 1, 1, 2] = 0.9, 0.8  # neighbours, same class, different anchors: one object
    score[0, 0, 2, 1], label[0, 0, 2, 1] = 0.7, 1  # a neighbour of another class: kept
    score[0, 1, 3, 3] = 0.6  # far away: kept
    keep = feature_map_nms(score, label, 2) & (score > 0)
    assert keep.nonzero().tolist() == [[0, 0, 1, 1], [0, 0, 2, 1], [0, 1, 3, 3]]


def test_pseudo_labels_decode_the_teachers_boxes_in_the_students_classes():
    logits = torch.full((1, 1, 2, 4, 4), -9.0)
    logits[0, 0, 1, 1, 2] = 4.0  # class 1 of the teacher at row 1, column 2
    logits[0, 0, 1, 1, 1] = 3.0  # its neighbour: suppressed by the feature-map NMS
    logits[0, 0, 0, 3, 0] = -1.0  # below the score
    box = torch.ones(1, 1, 4, 4, 4)  # one stride from the cell corner to every edge
    level = HeadLevel("p3", 8, logits, box, box_format="ltrb")
    (found,) = pseudo_labels([level], [0, 1], [1, 0], score=0.5, input_size=(32, 32))  # the teacher's classes reversed
    boxes, scores, labels = found
    assert boxes.tolist() == [[8.0, 0.0, 24.0, 16.0]] and labels.tolist() == [0]
    assert scores.item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    # two teachers finding the same object give one target
    merged = merge_pseudo_labels([[found], [(boxes + 0.5, scores - 0.1, labels)]], 0.6)
    assert merged[0]["boxes"].tolist() == [[8.0, 0.0, 24.0, 16.0]]


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def test_distillation_on_unlabelled_images_with_pseudo_labels(shapes_voc, teacher_checkpoint, other_shapes, tmp_path):
    data = unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes, pseudo_labels={"score": 0.01})
    lines: list[str] = []
    results = distill(validate_config(data, schema=DistillConfig), tmp_path / "run", log=lines.append, progress=False)
    assert results["unlabelled"] == {"path": str(other_shapes), "images": 10, "per_batch": 2}
    assert any("2 join each batch of 4" in line and "labelled images" in line for line in lines)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_det_obj", "loss_kd0_objectness_scaled", "loss_kd1_fitnet", "loss_pseudo_det_obj", "loss_pseudo_boxes"} <= set(record)

    with pytest.raises(ConfigError, match="set data.unlabelled"):
        no_images = unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes, pseudo_labels={})
        del no_images["data"]["unlabelled"]
        distill(validate_config(no_images, schema=DistillConfig), tmp_path / "never", log=quiet, progress=False)


def test_the_teacher_cache_covers_the_unlabelled_images(shapes_voc, teacher_checkpoint, other_shapes, tmp_path):
    """A run reading the cache (fp32) follows the live run, unlabelled images included; the
    unlabelled images get a cache of their own fingerprint, reused by the next run."""
    live = distill(validate_config(unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes, epochs=2), schema=DistillConfig),
                   tmp_path / "live", log=quiet, progress=False)
    data = unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes, epochs=2, cache={"dir": str(tmp_path / "cache"), "dtype": "fp32"})
    cached = distill(validate_config(data, schema=DistillConfig), tmp_path / "cached", log=quiet, progress=False)
    stats = cached["teacher_cache"]
    assert stats["built_entries"] == 2 * 8 and stats["unlabelled"]["built_entries"] == 2 * 10
    assert stats["fingerprint"] != stats["unlabelled"]["fingerprint"]
    records = [[json.loads(line) for line in Path(tmp_path, run, "metrics.jsonl").read_text().splitlines()] for run in ("live", "cached")]
    for (a, b), rel in zip(zip(*records), (1e-4, 1e-2)):
        for key in a:
            if key.startswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), key
    assert cached["metrics"]["coco"]["AP"] == pytest.approx(live["metrics"]["coco"]["AP"], abs=0.02)
    again = distill(validate_config(data, schema=DistillConfig), tmp_path / "again", log=quiet, progress=False)
    assert again["teacher_cache"]["unlabelled"]["built_entries"] == 0
    # kdet cache builds both without training
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump({**data, "distill": {**data["distill"], "cache": {"dir": str(tmp_path / "cache2")}}}))
    assert main(["cache", str(path), "--json"]) == 0
    assert len([p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]) == 2


def test_unlabelled_run_resumes_exactly_and_pairs_with_its_baseline(shapes_voc, teacher_checkpoint, other_shapes, tmp_path, monkeypatch):
    config = validate_config(unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes, epochs=2), schema=DistillConfig)
    straight = tmp_path / "straight"
    distill(config, straight, log=quiet, progress=False)

    import kdet.engine.trainer as trainer

    real_loader = trainer.epoch_loader

    def stop_at_epoch_2(*args, **kwargs):
        if args[2] == 2:
            raise KeyboardInterrupt
        return real_loader(*args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(trainer, "epoch_loader", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        distill(config, resumed, log=quiet, progress=False)
    monkeypatch.setattr(trainer, "epoch_loader", real_loader)
    distill(config, resumed, resume=True, log=quiet, progress=False)
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(resumed / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(value, b[key]) for key, value in a.items())

    # kdet train on the same config trains the baseline on the labelled images, and compare pairs them
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes, epochs=2)))
    assert main(["train", str(path), "--out", str(tmp_path / "base")]) == 0
    from kdet.distill.compare import collect_runs, comparison_rows

    rows = comparison_rows(collect_runs([tmp_path / "base", straight]))
    assert [r["role"] for r in rows] == ["teacher", "baseline", "distilled"] and "delta_AP_paired" in rows[-1]


def _distil_in_process(rank: int, world: int, port: int, config: dict, out: str) -> None:
    """One of two processes torchrun would start, distilling ``config`` into ``out``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        distill(DistillConfig.model_validate(config), out, log=quiet, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_unlabelled_images_of_every_step(shapes_voc, teacher_checkpoint, other_shapes, tmp_path):
    """Under torchrun each process takes its part of a step's unlabelled images as of its
    labelled ones: two processes follow one (up to each process's own BatchNorm statistics)."""
    import socket

    import torch.multiprocessing as mp

    config = unlabelled_dict(shapes_voc, teacher_checkpoint, other_shapes)
    distill(validate_config(config, schema=DistillConfig), tmp_path / "one", log=quiet, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_distil_in_process, args=(2, port, config, str(tmp_path / "two")), nprocs=2, join=True, start_method="fork")
    one, two = (json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two"))
    for key in ("loss", "loss_kd0_objectness_scaled", "loss_kd1_fitnet"):
        assert two[key] == pytest.approx(one[key], rel=0.08), key  # 2 to 3% measured
