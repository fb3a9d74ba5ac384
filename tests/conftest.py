"""Fixtures shared across the suite: a tiny synthetic VOC dataset that a model can learn."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("bar", "square")


def make_shapes_voc(root: Path, *, images: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Red squares and green bars on a dark background, VOC layout with train/val/test splits."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    stems = []
    for i in range(images):
        pixels = np.full((size, size, 3), 20, np.uint8)
        objects = []
        for _ in range(rng.integers(1, 3)):
            kind = CLASSES[rng.integers(0, 2)]
            w = int(rng.integers(12, 24))
            h = w if kind == "square" else max(4, w // 3)
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y : y + h, x : x + w] = (230, 30, 30) if kind == "square" else (30, 220, 30)
            objects.append((kind, x, y, x + w, y + h))
        stem = f"img{i:03d}"
        stems.append(stem)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        body = "".join(
            f"<object><name>{k}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for k, x1, y1, x2, y2 in objects
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size>{body}</annotation>"
        )
    n_train = images - 4
    splits = {"train": stems[:n_train], "val": stems[n_train : n_train + 2], "test": stems[n_train + 2 :]}
    for name, members in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(members) + "\n")
    return root


@pytest.fixture(scope="session")
def shapes_voc(tmp_path_factory) -> Path:
    return make_shapes_voc(tmp_path_factory.mktemp("shapes") / "voc")


def tiny_config_dict(data_path: Path, **train) -> dict:
    """A config that trains in seconds on :func:`make_shapes_voc` data."""
    return {
        "seed": 0,
        "data": {"path": str(data_path), "input_size": 64, "workers": 0,
                 "augment": {"mosaic": 0.5, "vflip": 0.5}},
        "model": {"family": "yolo", "backbone": "cspdarknet", "size": "p", "anchors": "auto"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.005, "warmup_epochs": 0.5, "threads": 1, **train},
        "eval": {"batch_size": 4},
    }


@pytest.fixture(scope="session")
def teacher_checkpoint(shapes_voc, tmp_path_factory) -> Path:
    """A size-t detector trained for one epoch on :func:`shapes_voc`: a teacher for the size-p
    students of :func:`tiny_config_dict`."""
    from kdet.config import validate_config
    from kdet.engine.trainer import train

    config = tiny_config_dict(shapes_voc, epochs=1)
    config["model"]["size"] = "t"
    out = tmp_path_factory.mktemp("teacher")
    train(validate_config(config), out, log=lambda _: None, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="session")
def dfl_teacher_checkpoint(shapes_voc, tmp_path_factory) -> Path:
    """As :func:`teacher_checkpoint`, with the anchor-free DFL head."""
    from kdet.config import validate_config
    from kdet.engine.trainer import train

    config = tiny_config_dict(shapes_voc, epochs=1)
    config["model"].update(size="t", head="dfl")
    out = tmp_path_factory.mktemp("dfl_teacher")
    train(validate_config(config), out, log=lambda _: None, progress=False)
    return out / "best.pt"


def interrupt_then_resume(run, config, out: Path, monkeypatch, *, at_epoch: int = 2) -> None:
    """``run(config, out)`` (train or distill) stopped as epoch ``at_epoch`` starts, as a kill
    between epochs would stop it, then continued with ``resume=True``."""
    import kdet.engine.trainer as trainer

    real_loader = trainer.epoch_loader

    def stop(dataset, cfg, epoch):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return real_loader(dataset, cfg, epoch)

    monkeypatch.setattr(trainer, "epoch_loader", stop)
    with pytest.raises(KeyboardInterrupt):
        run(config, out, log=lambda _: None, progress=False)
    monkeypatch.setattr(trainer, "epoch_loader", real_loader)
    run(config, out, resume=True, log=lambda _: None, progress=False)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from several threads; one keeps timings steady on shared CPUs."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def two_box_batch(size: int = 64):
    """Two images of size 64 or more, one bright box each (classes 0 and 1)."""
    import torch

    images = torch.full((2, 3, size, size), 0.1)
    images[0, :, 8:40, 12:44] = 0.9
    images[1, :, 20:36, 4:60] = 0.9
    targets = [{"boxes": torch.tensor([[12.0, 8.0, 44.0, 40.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[4.0, 20.0, 60.0, 36.0]]), "labels": torch.tensor([1])}]
    return images, targets


def kd_terms(*names, **fields):
    """Distillation settings with these losses (feature losses on the neck), default weights."""
    from kdet.config import DistillSettings, TermConfig
    from kdet.distill.losses import DISTILL_LOSSES

    def on_neck(name: str) -> dict:
        return {"student": "neck"} if DISTILL_LOSSES.get(name).kind == "feature" else {}

    return DistillSettings(terms=[TermConfig(loss=name, **on_neck(name), **fields) for name in names])


def distil_one_step(teacher, student, settings, size: int = 64) -> dict:
    """Pair ``teacher`` and ``student`` (it must pair), take one distillation step on
    :func:`two_box_batch` and check that the student, and never the frozen teacher, gets
    gradients; the step's losses."""
    import torch

    from kdet.distill.distiller import Distiller
    from kdet.distill.pairing import pair
    from kdet.engine.step import Batch

    report = pair(teacher.describe((size, size)), student.describe((size, size)), settings)
    assert report.ok, report.errors
    step = Distiller(student, teacher.eval(), report).train()
    loss, losses = step(Batch.of(*two_box_batch(size)))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    return losses
