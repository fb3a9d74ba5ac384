"""COCO JSON reader: the three layouts, Roboflow's supercategory, and every defect kind."""
from __future__ import annotations

import numpy as np
import pytest

from kdet.data import DataError, read_dataset

from tiny_trees import by_name, kinds, tree  # noqa: F401  (tree is a fixture)

CATEGORIES = [{"id": 1, "name": "dog", "supercategory": "animal"}, {"id": 0, "name": "cat", "supercategory": "animal"}]


def _coco(images: list[tuple[int, str]], annotations: list[dict], categories=CATEGORIES, size=(32, 24)) -> dict:
    return {
        "images": [{"id": i, "file_name": f, "width": size[0], "height": size[1]} for i, f in images],
        "annotations": [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
        "categories": categories,
    }


def _element_line(path, key: str, k: int) -> int:
    """1-based line of the k-th element of the top-level array ``key`` in a file written with indent=1."""
    lines = path.read_text().splitlines()
    start = lines.index(f' "{key}": [')
    return [i + 1 for i in range(start + 1, len(lines)) if lines[i] == "  {"][k]


def test_single_json_xywh_to_xyxy_and_seeded_split(tree):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        tree.image(f"images/{name}")  # found through the images/ folder beside the json
    tree.json("labels.json", _coco(
        [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")],
        [{"image_id": 1, "category_id": 1, "bbox": [1.5, 2, 10, 5]}, {"image_id": 2, "category_id": 0, "bbox": [0, 0, 4, 4]}],
    ))

    index = read_dataset(tree.root)

    assert index.format == "coco" and index.split_source == "seeded"
    assert index.class_names == ["cat", "dog"]  # sorted by category id
    assert sum(len(v) for v in index.splits.values()) == 3
    a = by_name(index)["a.jpg"]
    np.testing.assert_allclose(a.boxes, [[1.5, 2, 11.5, 7]])
    assert a.labels.tolist() == [1]
    assert a.image_id == "images/a"
    assert index.problems == []


def test_roboflow_tree_drops_the_supercategory(tree):
    categories = [
        {"id": 0, "name": "cells", "supercategory": "none"},
        {"id": 1, "name": "Platelets", "supercategory": "cells"},
        {"id": 2, "name": "RBC", "supercategory": "cells"},
        {"id": 3, "name": "WBC", "supercategory": "cells"},
    ]
    for split in ("train", "valid", "test"):
        tree.image(f"{split}/{split}_0.jpg")
        # split files list categories in different orders: matched by name
        cats = categories if split != "test" else [dict(c, id={0: 0, 1: 3, 2: 1, 3: 2}[c["id"]]) for c in categories]
        rbc = next(c["id"] for c in cats if c["name"] == "RBC")
        tree.json(f"{split}/_annotations.coco.json", _coco([(0, f"{split}_0.jpg")], [{"image_id": 0, "category_id": rbc, "bbox": [1, 1, 5, 5]}], cats))

    index = read_dataset(tree.root)

    assert index.class_names == ["Platelets", "RBC", "WBC"]
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {
        "train": ["train/train_0"], "val": ["valid/valid_0"], "test": ["test/test_0"],
    }
    assert all(r.labels.tolist() == [1] for r in index.all_records())
    assert kinds(index) == [
        ("unused_class", "train/_annotations.coco.json", None),  # cells: dropped
        ("unused_class", "train/_annotations.coco.json", None),  # Platelets: kept
        ("unused_class", "train/_annotations.coco.json", None),  # WBC: kept
    ]
    actions = {p.message.split("'")[1]: p.action for p in index.problems}
    assert actions == {"cells": "dropped from the class list", "Platelets": "kept in the class list", "WBC": "kept in the class list"}


def test_split_files_that_disagree_are_an_error(tree):
    tree.image("train/a.jpg")
    tree.image("valid/a.jpg")
    tree.json("train/_annotations.coco.json", _coco([(0, "a.jpg")], []))
    tree.json("valid/_annotations.coco.json", _coco([(0, "a.jpg")], [], [{"id": 0, "name": "cat"}, {"id": 1, "name": "horse"}]))
    with pytest.raises(DataError, match="horse"):
        read_dataset(tree.root)


def test_instances_layout(tree):
    tree.image("train2017/000001.jpg")
    tree.image("val2017/000002.jpg")
    tree.json("annotations/instances_train2017.json", _coco([(1, "000001.jpg")], [{"image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4]}]))
    tree.json("annotations/instances_val2017.json", _coco([(2, "000002.jpg")], [{"image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 4]}]))

    index = read_dataset(tree.root)

    assert index.split_source == "dataset"
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {"train": ["train2017/000001"], "val": ["val2017/000002"]}
    assert index.problems == []
    # one file given directly: its split comes from its name
    alone = read_dataset(tree.root / "annotations/instances_val2017.json")
    assert list(alone.splits) == ["val"] and alone.root == tree.root


def test_every_defect_is_reported(tree):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        tree.image(name)
    tree.truncated_jpeg("c.jpg")
    tree.image("d.jpg", fmt="PNG")
    images = [(1, "a.jpg"), (2, "b.jpg"), (2, "b.jpg"), (3, "c.jpg"), (4, "d.jpg"), (5, "missing.jpg"), (6, "a.jpg")]
    annotations = [
        {"image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4]},       # 0 fine
        {"image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4], "iscrowd": 1},  # 1 crowd
        {"image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4]},       # 2 unknown category
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4]},          # 3 bad bbox
        {"image_id": 99, "category_id": 1, "bbox": [1, 1, 4, 4]},      # 4 unknown image
        {"image_id": 2, "category_id": 1, "bbox": [30, 20, 10, 10]},   # 5 clipped
        {"image_id": 2, "category_id": 1, "bbox": [40, 1, 4, 4]},      # 6 outside
        {"image_id": 2, "category_id": 1, "bbox": [3, 3, 0, 4]},       # 7 zero width
        {"image_id": 5, "category_id": 1, "bbox": [1, 1, 4, 4]},       # 8 on the missing image
        {"image_id": 6, "category_id": 1, "bbox": [1, 1, 4, 4]},       # 9 on the duplicate file
    ]
    train = tree.json("train.json", _coco(images, annotations, size=(32, 24)))
    tree.image("val/e.jpg", size=(16, 12))
    tree.json("val.json", _coco([(1, "val/e.jpg")], [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]))  # says 32x24

    index = read_dataset(tree.root)

    def ann(k: int) -> int:  # the line annotation #k starts on
        return _element_line(train, "annotations", k)

    assert kinds(index) == [
        ("box_clipped", "train.json", ann(5)),
        ("box_outside", "train.json", ann(6)),
        ("crowd_annotation", "train.json", ann(1)),
        ("duplicate_image_id", "train.json", _element_line(train, "images", 2)),  # image id 2 twice
        ("duplicate_image_id", "train.json", _element_line(train, "images", 6)),  # a.jpg twice
        ("extension_mismatch", "d.jpg", None),
        ("malformed_annotation", "train.json", ann(3)),
        ("malformed_annotation", "train.json", ann(4)),
        ("size_mismatch", "val.json", None),
        ("truncated_image", "c.jpg", None),
        ("unknown_class", "train.json", ann(2)),
        ("unreadable_image", "missing.jpg", None),
        ("zero_size_box", "train.json", ann(7)),
    ]
    assert train.read_text().splitlines()[ann(5)].strip() == '"id": 5,'  # the line really holds annotation #5
    assert list(index.splits) == ["train", "val"]
    records = by_name(index)
    assert sorted(records) == ["a.jpg", "b.jpg", "d.jpg", "e.jpg"]
    np.testing.assert_allclose(records["a.jpg"].boxes, [[1, 1, 5, 5]])
    np.testing.assert_allclose(records["b.jpg"].boxes, [[30, 20, 32, 24]])
    crowd = next(p for p in index.problems if p.kind == "crowd_annotation")
    assert crowd.action == "ignored" and "annotation #1" in crowd.message
    assert "1 annotation(s) are not used" in next(p.message for p in index.problems if "a.jpg" in p.message and p.kind == "duplicate_image_id")


def test_broken_json_is_reported_with_its_line(tree):
    tree.image("train/a.jpg")
    tree.json("train/_annotations.coco.json", _coco([(0, "a.jpg")], [{"image_id": 0, "category_id": 0, "bbox": [1, 1, 4, 4]}]))
    tree.text("valid/_annotations.coco.json", '{"images": [\n  {"id": 1,\n  oops\n]}')
    index = read_dataset(tree.root)
    assert kinds(index)[0] == ("malformed_annotation", "valid/_annotations.coco.json", 3)
    assert list(index.splits) == ["train"]


def test_problems_on_a_one_line_file_name_the_annotation(tree):
    import json

    tree.image("a.jpg")
    payload = _coco([(1, "a.jpg")], [{"image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4]}, {"image_id": 1, "category_id": 9, "bbox": [1, 1, 4, 4]}])
    tree.text("labels.json", json.dumps(payload))  # Roboflow writes it all on one line
    index = read_dataset(tree.root)
    unknown = [p for p in index.problems if p.kind == "unknown_class"]
    assert [(p.file, p.line) for p in unknown] == [("labels.json", None)]
    assert unknown[0].message.startswith("annotation #1:")


def test_truncated_split_file_loses_its_split_and_says_why(tree, capsys):
    from kdet.cli import main

    for split in ("train", "valid"):
        tree.image(f"{split}/a.jpg")
        tree.json(f"{split}/_annotations.coco.json", _coco([(0, "a.jpg")], [{"image_id": 0, "category_id": 0, "bbox": [1, 1, 4, 4]}]))
    valid = tree.root / "valid" / "_annotations.coco.json"
    valid.write_text(valid.read_text()[:60])  # cut short, as an interrupted download leaves it

    index = read_dataset(tree.root)

    assert list(index.splits) == ["train"] and list(index.lost_splits) == ["val"]
    assert "valid/_annotations.coco.json, line" in index.lost_splits["val"] and "cannot be read" in index.lost_splits["val"]
    lost = next(p for p in index.problems if p.kind == "split_lost")
    assert lost.file == "valid/_annotations.coco.json" and "'val'" in lost.message
    with pytest.raises(KeyError, match="split 'val' is lost: valid/_annotations.coco.json"):
        index.split("val")
    assert main(["data", "check", str(tree.root)]) == 1
    assert "error: split 'val' is lost" in capsys.readouterr().err
