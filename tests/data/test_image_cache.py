"""The disk cache of letterboxed images (data.cache: disk): the same samples as decoding, shared
across datasets and seeds, invalidated by a changed source file or input size, written
atomically, and damaged entries made anew."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdet.data.pipeline as pipeline
from kdet.config import AugmentConfig, validate_config
from kdet.data import read_dataset
from kdet.data.image_cache import DiskImageCache, default_cache_dir
from kdet.data.pipeline import DetectionDataset

from conftest import make_shapes_voc, tiny_config_dict


@pytest.fixture
def voc(tmp_path) -> Path:
    return make_shapes_voc(tmp_path / "voc", images=6)


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The paths the pipeline decodes, in order."""
    seen: list = []
    real = pipeline.load_image

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(pipeline, "load_image", counting)
    return seen


def records(voc: Path):
    return read_dataset(voc).split("train")


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.img"))


def test_disk_cache_gives_the_decoded_samples_and_is_shared_across_datasets_and_seeds(voc, tmp_path, decodes):
    train = records(voc)
    augment = AugmentConfig(mosaic=0.5)
    plain = DetectionDataset(train, 64, augment=augment, cache="none", seed=3)
    decodes.clear()
    first = DetectionDataset(train, 64, augment=augment, cache="disk", cache_dir=tmp_path / "cache", seed=3)
    assert decodes == [] and first.cache_mode == "disk"  # nothing is decoded before it is used
    for epoch in (1, 2):
        for i in range(len(train)):
            a, b = plain.sample(i, epoch), first.sample(i, epoch)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert len(entries(tmp_path / "cache")) == len(train)
    expected = [plain.letterboxed(i)[0] for i in range(len(train))]
    decodes.clear()
    other_seed = DetectionDataset(train, 64, augment=augment, cache="disk", cache_dir=tmp_path / "cache", seed=4)
    for i in range(len(train)):
        other_seed.sample(i, 1)
        assert torch.equal(other_seed.letterboxed(i)[0], expected[i])
    assert decodes == []  # every image came from the disk
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_changed_source_file_or_input_size_is_decoded_again(voc, tmp_path, decodes):
    train = records(voc)[:2]
    cache = tmp_path / "cache"
    DetectionDataset(train, 64, cache="disk", cache_dir=cache).letterboxed(0)
    source = Path(train[0].path)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(source, quality=95)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later time, whatever the clock's resolution
    decodes.clear()
    image = DetectionDataset(train, 64, cache="disk", cache_dir=cache).letterboxed(0)[0]
    assert decodes == [source.name]
    assert torch.equal(image, pipeline.letterbox_image(pipeline.load_image(source), pipeline.Letterbox.fit(64, 64, 64)))
    assert len(entries(cache)) == 1  # the entry was rewritten, not added to
    decodes.clear()
    DetectionDataset(train, 96, cache="disk", cache_dir=cache).letterboxed(0)
    assert decodes == [source.name] and len(entries(cache)) == 2


def test_a_damaged_entry_is_made_anew(voc, tmp_path, decodes):
    train = records(voc)[:1]
    cache = DiskImageCache(tmp_path / "cache")
    dataset = DetectionDataset(train, 64, cache="disk", cache_dir=cache.root)
    image = dataset.letterboxed(0)[0]
    entry = cache.entry_path(Path(train[0].path).resolve(), 64)
    header = json.loads(entry.read_bytes()[12:].split(b"}", 1)[0] + b"}")
    assert header["size"] == 64 and header["bytes"] == Path(train[0].path).stat().st_size
    entry.write_bytes(entry.read_bytes()[:-100])  # truncated
    decodes.clear()
    assert torch.equal(dataset.letterboxed(0)[0], image) and len(decodes) == 1
    assert torch.equal(DetectionDataset(train, 64, cache="disk", cache_dir=cache.root).letterboxed(0)[0], image)
    assert len(decodes) == 1  # the rewritten entry is whole again


def test_cache_folder_default_and_an_unwritable_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kdet" / "images"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="data.cache_dir"):
        DiskImageCache(blocker / "cache")


def test_cache_images_stays_an_alias_of_cache():
    def data(**keys):
        return validate_config({"data": {"path": "x", **keys}}).data

    assert data().cache == "ram"
    assert data(cache_images=False).cache == "none" and data(cache_images=True).cache == "ram"
    assert data(cache="disk", cache_dir="/tmp/c").cache_dir == "/tmp/c"
    assert "cache_images" not in validate_config({"data": {"path": "x", "cache_images": False}}).model_dump()["data"]
    with pytest.raises(ValueError, match="keep data.cache only"):
        data(cache_images=False, cache="disk")


def test_training_with_the_disk_cache(shapes_voc, tmp_path):
    from kdet.engine.trainer import train

    config = tiny_config_dict(shapes_voc, epochs=1)
    config["data"].update(cache="disk", cache_dir=str(tmp_path / "cache"))
    train(validate_config(config), tmp_path / "run", log=lambda _: None, progress=False)
    # the 8 training and 2 validation images, stored while training and validating
    assert len(entries(tmp_path / "cache")) == 10
