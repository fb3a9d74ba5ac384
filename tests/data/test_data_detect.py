"""Format detection, whole-dataset errors, and the small helpers of kdet.data."""
from __future__ import annotations

import numpy as np
import pytest

from kdet.data import DataError, bundled_bccd_path, detect_format, read_dataset, remap_classes, resolve_data_path
from kdet.structures import ImageRecord

from tiny_trees import tree  # noqa: F401  (a fixture)


@pytest.mark.parametrize("layout, expected", [
    ({"Annotations/a.xml": "xml", "JPEGImages/a.jpg": "img"}, "voc"),
    ({"a.xml": "xml", "a.jpg": "img"}, "voc"),
    ({"train/a.xml": "xml", "train/a.jpg": "img"}, "voc"),
    ({"train/_annotations.coco.json": "{}", "train/a.jpg": "img"}, "coco"),
    ({"annotations/instances_val2017.json": "{}", "val2017/a.jpg": "img"}, "coco"),
    ({"labels.json": "{}", "a.jpg": "img"}, "coco"),
    ({"data.yaml": "names: [a]\ntrain: images\n", "images/a.jpg": "img"}, "yolo"),
    ({"dataset.yaml": "names: [a]\n", "images/a.jpg": "img"}, "yolo"),
    ({"images/a.jpg": "img", "labels/a.txt": "", "classes.txt": "a\n"}, "yolo"),
])
def test_detect_format(tree, layout, expected):
    for rel, content in layout.items():
        if content == "img":
            tree.image(rel)
        else:
            tree.text(rel, content)
    assert detect_format(tree.root) == expected


def test_detect_format_on_files(tree):
    assert detect_format(tree.text("x.json", "{}")) == "coco"
    assert detect_format(tree.text("x.yaml", "names: [a]\n")) == "yolo"
    with pytest.raises(DataError, match="COCO .json or a YOLO .yaml"):
        detect_format(tree.text("x.csv", ""))


def test_empty_folder_says_what_was_looked_for(tree):
    tree.root.mkdir(parents=True)
    with pytest.raises(DataError) as err:
        read_dataset(tree.root)
    message = str(err.value)
    for looked_for in ("data.yaml", "Annotations/", "_annotations.coco.json", "images/ + labels/"):
        assert looked_for in message


def test_missing_path_and_unknown_format(tree):
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tree.root / "nope")
    tree.image("a.jpg")
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        read_dataset(tree.root, "csv")
    with pytest.raises(DataError, match="no VOC XML annotations"):
        read_dataset(tree.root, "voc")
    assert issubclass(DataError, ValueError)


def test_bundled_paths():
    assert resolve_data_path("bundled:bccd") == bundled_bccd_path()
    assert (bundled_bccd_path() / "Annotations").is_dir()
    with pytest.raises(DataError, match="bundled:bccd"):
        resolve_data_path("bundled:coco")


def test_remap_classes_by_name(tmp_path):
    record = ImageRecord("a", tmp_path / "a.jpg", 32, 24, np.zeros((2, 4)), np.array([0, 1]))
    (out,) = remap_classes([record], ["cat", "dog"], ["dog", "bird", "cat"])
    assert out.labels.tolist() == [2, 0] and record.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="dog"):
        remap_classes([record], ["cat", "dog"], ["cat"])
