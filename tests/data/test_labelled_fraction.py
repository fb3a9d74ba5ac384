"""data.labelled_fraction: a seeded part of the training split keeps its labels, the rest can be
the unlabelled images of kdet distill (data.unlabelled: train_rest)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdet.cli import main
from kdet.config import ConfigError, DistillConfig, load_config, validate_config
from kdet.data import read_dataset
from kdet.data.labelled import keep_labelled, labelled_count, labelled_order, split_labelled
from kdet.data.unlabelled import read_unlabelled
from kdet.distill.run import check, distill
from kdet.distill.setup import unlabelled_feed
from kdet.engine.setup import load_data
from kdet.engine.trainer import train
from kdet.structures import ImageRecord
from conftest import make_shapes_voc, tiny_config_dict


def quiet(_: str) -> None:
    pass


def records(n: int) -> list[ImageRecord]:
    return [ImageRecord(f"img{i:04d}", Path(f"/data/img{i:04d}.jpg"), 32, 24) for i in range(n)]


@pytest.fixture(scope="module")
def shapes_24(tmp_path_factory) -> Path:
    """24 images: 20 train, 2 val, 2 test."""
    return make_shapes_voc(tmp_path_factory.mktemp("shapes24") / "voc", images=24, seed=3)


def distill_dict(data: Path, **data_keys) -> dict:
    config = tiny_config_dict(data, epochs=1)
    config["data"].update(data_keys)
    config["teacher"] = {"self": "ema"}
    config["distill"] = {"terms": [{"loss": "kl", "weight": 1.0, "args": {"mode": "sigmoid"}}]}
    return config


# ---------------------------------------------------------------------------------------------
# The seeded choice
# ---------------------------------------------------------------------------------------------
def test_the_subset_has_its_size_and_is_the_same_every_time():
    data = records(205)
    kept, rest = split_labelled(data, 0.1, 0)
    assert len(kept) == 20 and len(rest) == 185  # round(20.5) == 20
    assert {r.image_id for r in kept} | {r.image_id for r in rest} == {r.image_id for r in data}
    assert not {r.image_id for r in kept} & {r.image_id for r in rest}
    assert [r.image_id for r in split_labelled(data, 0.1, 0)[0]] == [r.image_id for r in kept]
    # kept in the split's order, and independent of the order the records come in
    assert [r.image_id for r in kept] == sorted(r.image_id for r in kept)
    assert {r.image_id for r in split_labelled(data[::-1], 0.1, 0)[0]} == {r.image_id for r in kept}
    assert labelled_count(205, 0.25) == 51 and labelled_count(3, 0.01) == 1 and labelled_count(7, 1.0) == 7
    # the order rests on SHA-256 of (seed, id) alone: the same on every machine and library version
    assert labelled_order(list("abcdef"), 0) == ["f", "d", "c", "e", "a", "b"]
    assert labelled_order(list("abcdef"), 1) == ["a", "e", "b", "c", "d", "f"]


def test_a_smaller_fraction_is_part_of_a_larger_one_and_seeds_differ():
    data = records(205)
    ids = {f: {r.image_id for r in split_labelled(data, f, 0)[0]} for f in (0.1, 0.25, 0.5)}
    assert ids[0.1] < ids[0.25] < ids[0.5]
    other = {r.image_id for r in split_labelled(data, 0.1, 1)[0]}
    assert len(other) == 20 and other != ids[0.1]


def test_only_the_training_split_is_reduced(shapes_24):
    full = read_dataset(shapes_24)
    config = tiny_config_dict(shapes_24)
    config["data"].update(labelled_fraction=0.25, labelled_seed=4)
    lines: list[str] = []
    index = load_data(validate_config(config), lines.append)
    assert len(index.split("train")) == 5 and len(index.withheld["train"]) == 15
    assert any(line.startswith("data.labelled_fraction 0.25 (seed 4): 5 of 20 training images keep their labels")
               for line in lines)
    for split in ("val", "test"):
        assert [r.image_id for r in index.split(split)] == [r.image_id for r in full.split(split)]
    assert keep_labelled(full, "train", 1.0, 0) is full
    with pytest.raises(ConfigError, match="also data.val_split"):
        config = tiny_config_dict(shapes_24)
        config["data"].update(labelled_fraction=0.5, val_split="train")
        load_data(validate_config(config), quiet)


# ---------------------------------------------------------------------------------------------
# The rest as unlabelled images
# ---------------------------------------------------------------------------------------------
def test_train_rest_is_the_rest_of_the_training_split_and_nothing_else(shapes_24):
    config = validate_config(distill_dict(shapes_24, labelled_fraction=0.25, unlabelled="train_rest"), schema=DistillConfig)
    index = load_data(config, quiet)
    full = read_dataset(shapes_24)
    labelled = {r.image_id for r in index.split("train")}
    rest = {r.image_id for r in full.split("train")} - labelled
    feed = unlabelled_feed(config, index, 5, quiet)
    assert {r.image_id for r in feed.dataset.records} == rest and len(rest) == 15
    assert all(len(r.boxes) == 0 for r in feed.dataset.records)  # labels ignored
    # the same dataset given as data.unlabelled: the same images, val and test left out
    lines: list[str] = []
    same = read_unlabelled(shapes_24, index, lines.append)
    assert [(r.image_id, r.path) for r in same] == [(r.image_id, r.path) for r in feed.dataset.records]
    assert any("2 of its test split" in line and "5 of its train split" in line and "2 of its val split" in line for line in lines)


def test_distillation_with_train_rest(shapes_24, tmp_path):
    config = validate_config(distill_dict(shapes_24, labelled_fraction=0.25, unlabelled="train_rest"), schema=DistillConfig)
    results = distill(config, tmp_path / "run", log=quiet, progress=False)
    assert results["unlabelled"]["images"] == 15 and results["labelled"]["images"] == 5


def test_train_rest_needs_a_fraction(shapes_24, tmp_path):
    with pytest.raises(ConfigError, match=r"data.unlabelled: .*train_rest needs data.labelled_fraction < 1"):
        validate_config(distill_dict(shapes_24, unlabelled="train_rest"), schema=DistillConfig)
    # a fraction that keeps every image (rounded) leaves nothing
    config = validate_config(distill_dict(shapes_24, labelled_fraction=0.99, unlabelled="train_rest"), schema=DistillConfig)
    with pytest.raises(ConfigError, match="keeps all 20 training images"):
        check(config, log=quiet)


# ---------------------------------------------------------------------------------------------
# Config, commands and a run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_a_config_error(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "x", "labelled_fraction": value}}))
    with pytest.raises(ConfigError, match=r"line \d+: data.labelled_fraction"):
        load_config(path)
    assert load_config(path, ["data.labelled_fraction=1"]).data.labelled_fraction == 1


def test_data_check_and_check_show_the_fraction(shapes_24, tmp_path, capsys):
    assert main(["data", "check", str(shapes_24), "--labelled-fraction", "0.1"]) == 0
    assert "2 of the 20 images of split 'train' keep their labels" in " ".join(capsys.readouterr().out.split())
    assert main(["data", "check", str(shapes_24), "--labelled-fraction", "0.1", "--labelled-seed", "2", "--json"]) == 0
    labelled = json.loads(capsys.readouterr().out)["labelled"]
    assert labelled["images"] == 2 and labelled["of"] == 20 and labelled["seed"] == 2 and len(labelled["image_ids"]) == 2
    with pytest.raises(SystemExit):
        main(["data", "check", str(shapes_24), "--labelled-fraction", "0"])
    capsys.readouterr()

    report = check(validate_config(distill_dict(shapes_24, labelled_fraction=0.1, unlabelled="train_rest"), schema=DistillConfig),
                   log=quiet)
    assert any(note.startswith("data.labelled_fraction 0.1 (seed 0): 2 of 20") for note in report.notes)


def test_a_run_trains_on_the_labelled_part_and_records_it(shapes_24, tmp_path):
    config = tiny_config_dict(shapes_24, epochs=1)
    config["data"].update(labelled_fraction=0.25, labelled_seed=1)
    lines: list[str] = []
    results = train(validate_config(config), tmp_path / "run", log=lines.append, progress=False)
    assert any("5 train / 2 val images" in line for line in lines)
    recorded = json.loads((tmp_path / "run" / "labelled.json").read_text())
    index = load_data(validate_config(config), quiet)
    assert recorded["image_ids"] == sorted(r.image_id for r in index.split("train")) and recorded["of"] == 20
    assert results["labelled"] == {k: v for k, v in recorded.items() if k != "image_ids"}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["labelled_fraction"], saved["labelled_seed"]) == (0.25, 1)
