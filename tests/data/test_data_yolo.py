"""YOLO txt reader: data.yaml and folder layouts, label-file defects with their line numbers."""
from __future__ import annotations

import numpy as np
import pytest

from kdet.data import DataError, read_dataset

from tiny_trees import by_name, kinds, tree  # noqa: F401  (tree is a fixture)


def test_clean_yaml_layout(tree):
    tree.image("images/train/a.jpg")
    tree.text("labels/train/a.txt", "1 0.5 0.5 0.25 0.5\n0 0.125 0.25 0.25 0.5\n")
    tree.image("images/train/b.jpg")
    tree.text("labels/train/b.txt", "")  # empty: an image with no objects, not a problem
    tree.image("images/val/c.png")
    tree.text("labels/val/c.txt", "0 0.5 0.5 1 1\n")
    tree.text("data.yaml", "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n")

    index = read_dataset(tree.root)

    assert index.format == "yolo" and index.split_source == "dataset"
    assert index.class_names == ["cat", "dog"]
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {
        "train": ["images/train/a", "images/train/b"], "val": ["images/val/c"],
    }
    records = by_name(index)
    np.testing.assert_allclose(records["a.jpg"].boxes, [[12, 6, 20, 18], [0, 0, 8, 12]])
    assert records["a.jpg"].labels.tolist() == [1, 0]
    assert len(records["b.jpg"].labels) == 0
    np.testing.assert_allclose(records["c.png"].boxes, [[0, 0, 32, 24]])
    assert index.problems == []


def test_every_defect_is_reported(tree):
    tree.image("images/train/a.jpg")
    tree.text("labels/train/a.txt", "\n".join([
        "0 0.5 0.5 0.25 0.5",          # 1 fine
        "0 0.5 0.5 0.25",              # 2 four fields
        "0 0.5 abc 0.25 0.5",          # 3 not a number
        "5 0.5 0.5 0.25 0.5",          # 4 class 5 of 2
        "1 0.1 0.1 0.5 0.1 0.5 0.5",   # 5 polygon of three points
        "",                            # 6 blank: harmless
        "1 0.9 0.9 0.5 0.5",           # 7 crosses the right and bottom edges
        "1 1.5 1.5 0.2 0.2",           # 8 outside
        "1 0.5 0.5 0 0.2",             # 9 zero width
        "0 0.5 0.5 0.25 0.5 0.9",      # 10 six fields (a prediction with its score?)
    ]) + "\n")
    tree.image("images/train/b.jpg")
    tree.text("labels/train/b.txt", "")  # empty: no objects, said explicitly
    tree.image("images/train/c.jpg")
    tree.text("labels/train/c.txt", "")
    tree.image("images/train/c.png")  # same id as c.jpg
    tree.truncated_jpeg("images/train/d.jpg")
    tree.image("images/train/e.jpg", fmt="PNG")
    tree.text("data.yaml", "train: images/train\nval: images/train\nnames: [cat, dog]\n")

    index = read_dataset(tree.root)

    assert kinds(index) == [
        ("box_clipped", "labels/train/a.txt", 7),
        ("box_outside", "labels/train/a.txt", 8),
        ("duplicate_image_id", "images/train/c.png", None),
        ("duplicate_image_id", "images/train/c.png", None),  # listed in train and in val
        ("extension_mismatch", "images/train/e.jpg", None),
        ("malformed_annotation", "labels/train/a.txt", 2),
        ("malformed_annotation", "labels/train/a.txt", 3),
        ("malformed_annotation", "labels/train/a.txt", 10),
        ("missing_label_file", "images/train/d.jpg", None),
        ("missing_label_file", "images/train/e.jpg", None),
        ("polygon_converted", "labels/train/a.txt", 5),
        ("truncated_image", "images/train/d.jpg", None),
        ("unknown_class", "labels/train/a.txt", 4),
        ("zero_size_box", "labels/train/a.txt", 9),
    ]
    records = by_name(index)
    assert sorted(records) == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]
    np.testing.assert_allclose(records["a.jpg"].boxes, [[12, 6, 20, 18], [3.2, 2.4, 16, 12], [20.8, 15.6, 32, 24]], atol=1e-4)
    assert records["a.jpg"].labels.tolist() == [0, 1, 1]
    assert len(records["b.jpg"].labels) == 0
    missing = next(p for p in index.problems if p.kind == "missing_label_file" and p.file == "images/train/e.jpg")
    assert "labels/train/e.txt" in missing.message and missing.action.startswith("kept as an image with no objects")
    assert "4" in next(p.message for p in index.problems if p.line == 2)  # says how many fields it got


def test_list_files_and_roboflow_paths(tree):
    tree.image("train/images/a.jpg")
    tree.text("train/labels/a.txt", "0 0.5 0.5 0.5 0.5\n")
    tree.image("valid/images/b.jpg")
    tree.text("valid/labels/b.txt", "0 0.5 0.5 0.5 0.5\n")
    tree.text("val.txt", "./valid/images/b.jpg\nvalid/images/b.jpg\n")
    # Roboflow writes ../train/images although the YAML sits in the dataset folder
    tree.text("data.yaml", "train: ../train/images\nval: val.txt\nnc: 1\nnames: ['cell']\nroboflow:\n  workspace: w\n")

    index = read_dataset(tree.root / "data.yaml")

    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {"train": ["train/images/a"], "val": ["valid/images/b"]}
    assert kinds(index) == [("duplicate_image_id", "val.txt", 2)]


def test_folder_layout_with_classes_txt(tree):
    tree.image("images/train/a.jpg")
    tree.text("labels/train/a.txt", "0 0.5 0.5 0.5 0.5\n")
    tree.image("images/valid/b.jpg")
    tree.text("labels/valid/b.txt", "")
    tree.text("classes.txt", "cell\nother\n")

    index = read_dataset(tree.root)

    assert index.class_names == ["cell", "other"]
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 1, "val": 1}
    assert kinds(index) == [("unused_class", "classes.txt", None)]


def test_folder_without_class_names_is_an_error(tree):
    tree.image("images/a.jpg")
    tree.text("labels/a.txt", "0 0.5 0.5 0.5 0.5\n")
    with pytest.raises(DataError, match="classes.txt"):
        read_dataset(tree.root)


def test_yaml_without_names_is_an_error(tree):
    tree.image("images/a.jpg")
    tree.text("data.yaml", "train: images\n")
    with pytest.raises(DataError, match="no 'names'") as err:
        read_dataset(tree.root)
    assert "data.yaml" in str(err.value)


def test_yaml_pointing_nowhere_is_an_error(tree):
    tree.text("data.yaml", "train: images/train\nnames: [a]\n")
    with pytest.raises(DataError, match="images/train does not exist"):
        read_dataset(tree.root)


def test_missing_label_file_is_reported_and_empty_one_is_not(tree):
    tree.image("images/train/a.jpg")
    tree.text("labels/train/a.txt", "0 0.5 0.5 0.5 0.5\n")
    tree.image("images/train/empty.jpg")
    tree.text("labels/train/empty.txt", "\n")
    tree.image("images/train/lost.jpg")  # its label file is missing
    tree.text("data.yaml", "train: images/train\nval: images/train\nnames: [cell]\n")

    index = read_dataset(tree.root)

    records = by_name(index)
    assert len(records["empty.jpg"].labels) == 0 and len(records["lost.jpg"].labels) == 0  # both kept, as Ultralytics does
    assert kinds(index) == [("missing_label_file", "images/train/lost.jpg", None)]
    assert "labels/train/lost.txt" in index.problems[0].message


def test_test_folder_the_yaml_does_not_name_is_reported(tree):
    for split in ("train", "valid", "test"):
        tree.image(f"{split}/images/{split}.jpg")
        tree.text(f"{split}/labels/{split}.txt", "0 0.5 0.5 0.5 0.5\n")
    tree.text("data.yaml", "train: ../train/images\nval: ../valid/images\nnames: [cell]\n")

    index = read_dataset(tree.root)

    assert set(index.splits) == {"train", "val"}
    assert kinds(index) == [("unlisted_split_folder", "data.yaml", None)]
    problem = index.problems[0]
    assert "test/ holds 1 image(s)" in problem.message and "no 'test' entry" in problem.message
    assert "`test: test/images`" in problem.action
    # the line it suggests reads the folder
    tree.text("data.yaml", "train: ../train/images\nval: ../valid/images\ntest: test/images\nnames: [cell]\n")
    again = read_dataset(tree.root)
    assert again.problems == [] and [r.image_id for r in again.splits["test"]] == ["test/images/test"]
