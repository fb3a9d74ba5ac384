"""Pascal VOC reader: clean layouts and one defect of each kind, with exact files and lines."""
from __future__ import annotations

import numpy as np
import pytest

from kdet.data import DataError, read_dataset

from tiny_trees import by_name, kinds, tree  # noqa: F401  (tree is a fixture)


def _devkit(tree, splits: dict[str, list[str]]) -> None:
    for name, ids in splits.items():
        tree.text(f"ImageSets/Main/{name}.txt", "".join(f"{i}\n" for i in ids))


def test_clean_devkit(tree):
    tree.image("JPEGImages/a.jpg")
    tree.voc_xml("Annotations/a.xml", [("dog", 1, 2, 10.5, 12.25), ("cat", 0, 0, 32, 24, 1)])
    tree.image("JPEGImages/b.jpg")
    tree.voc_xml("Annotations/b.xml", [("cat", 3, 3, 9, 9)])
    tree.image("JPEGImages/c.jpg")
    tree.voc_xml("Annotations/c.xml", [])
    _devkit(tree, {"train": ["a", "b"], "val": ["c"], "trainval": ["a", "b", "c"]})
    # per-class files (two columns) are not splits
    tree.text("ImageSets/Main/dog_train.txt", "a  1\nb -1\n")

    index = read_dataset(tree.root)

    assert index.format == "voc" and index.split_source == "dataset"
    assert index.class_names == ["cat", "dog"]  # sorted, not in order of appearance
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {
        "train": ["JPEGImages/a", "JPEGImages/b"], "val": ["JPEGImages/c"], "trainval": ["JPEGImages/a", "JPEGImages/b", "JPEGImages/c"],
    }
    assert index.problems == []
    a = by_name(index)["a.jpg"]
    assert (a.width, a.height) == (32, 24)
    np.testing.assert_allclose(a.boxes, [[1, 2, 10.5, 12.25], [0, 0, 32, 24]])
    assert a.labels.tolist() == [1, 0] and a.difficult.tolist() == [False, True]
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert len(by_name(index)["c.jpg"].labels) == 0
    # trainval shares the records of train and val
    assert index.splits["trainval"][0] is index.splits["train"][0]


def test_class_file_sets_order_and_unknown_class_is_dropped(tree):
    tree.text("classes.txt", "dog\ncat\nbird\n")
    tree.image("JPEGImages/a.jpg")
    tree.voc_xml("Annotations/a.xml", [("cat", 1, 1, 5, 5), ("horse", 1, 1, 5, 5), ("dog", 2, 2, 6, 6)])

    index = read_dataset(tree.root)

    assert index.class_names == ["dog", "cat", "bird"]
    assert by_name(index)["a.jpg"].labels.tolist() == [1, 0]
    assert kinds(index) == [
        ("unknown_class", "Annotations/a.xml", 19),  # the second <object>
        ("unused_class", "classes.txt", None),  # bird
    ]
    unknown = next(p for p in index.problems if p.kind == "unknown_class")
    assert "horse" in unknown.message and "object #2" in unknown.message and unknown.action == "box dropped"
    assert "bird" in next(p for p in index.problems if p.kind == "unused_class").message
    assert index.split_source == "seeded"  # no ImageSets


def test_every_defect_is_reported(tree):
    good = [("cat", 2, 2, 10, 10)]
    for stem in "abcdefgh":
        tree.image(f"JPEGImages/{stem}.jpg")
    tree.truncated_jpeg("JPEGImages/a.jpg")
    tree.voc_xml("Annotations/a.xml", good)
    tree.image("JPEGImages/b.jpg", fmt="PNG")  # a PNG named .jpg
    tree.voc_xml("Annotations/b.xml", good)
    tree.voc_xml("Annotations/c.xml", [
        ("cat", 20, 10, 40, 30),     # line 9: clipped to the 32x24 image
        ("cat", 40, 30, 50, 40),     # line 19: entirely outside
        ("cat", 5, 5, 5, 9),         # line 29: zero width
        ("cat", 2, 2, 8, 8),         # line 39: fine
        ("cat", 2, "x", 8, 8),       # line 49: not a number
    ])
    tree.voc_xml("Annotations/d.xml", good, size=(64, 48))  # wrong size
    tree.voc_xml("Annotations/e.xml", good)
    (tree.root / "JPEGImages/e.jpg").unlink()  # annotation without its image
    tree.text("Annotations/f.xml", "<annotation>\n<object>\n<name>cat</name>\n</annotation>\n")  # broken XML
    tree.voc_xml("Annotations/g.xml", good)
    # h has no XML; g is listed twice
    _devkit(tree, {"train": ["a", "b", "c", "d", "e", "f", "g", "h", "g"]})

    index = read_dataset(tree.root)

    assert kinds(index) == [
        ("box_clipped", "Annotations/c.xml", 9),
        ("box_outside", "Annotations/c.xml", 19),
        ("duplicate_image_id", "ImageSets/Main/train.txt", 9),
        ("extension_mismatch", "JPEGImages/b.jpg", None),
        ("malformed_annotation", "Annotations/c.xml", 49),
        ("malformed_annotation", "Annotations/f.xml", 4),
        ("missing_annotation", "ImageSets/Main/train.txt", 8),
        ("size_mismatch", "Annotations/d.xml", None),
        ("truncated_image", "JPEGImages/a.jpg", None),
        ("unreadable_image", "JPEGImages/e.jpg", None),
        ("zero_size_box", "Annotations/c.xml", 29),
    ]
    records = by_name(index)
    assert sorted(records) == ["b.jpg", "c.jpg", "d.jpg", "g.jpg"]
    assert [r.path.name for r in index.splits["train"]] == ["b.jpg", "c.jpg", "d.jpg", "g.jpg"]
    np.testing.assert_allclose(records["c.jpg"].boxes, [[20, 10, 32, 24], [2, 2, 8, 8]])
    assert (records["d.jpg"].width, records["d.jpg"].height) == (32, 24)  # the image's size wins
    actions = {p.kind: p.action for p in index.problems}
    assert actions["extension_mismatch"] == "read as PNG"
    assert actions["truncated_image"] == actions["unreadable_image"] == actions["missing_annotation"] == "image skipped"
    assert actions["zero_size_box"] == actions["box_outside"] == "box dropped"


def test_header_only_check_does_not_see_truncation(tree):
    tree.truncated_jpeg("JPEGImages/a.jpg")
    tree.voc_xml("Annotations/a.xml", [("cat", 2, 2, 10, 10)])
    # the only image is skipped, so its class ends up without boxes too
    assert [p.kind for p in read_dataset(tree.root).problems] == ["truncated_image", "unused_class"]
    index = read_dataset(tree.root, verify_images=False)
    assert index.problems == [] and list(by_name(index)) == ["a.jpg"]


def test_flat_folder_gets_a_seeded_split(tree):
    for k in range(10):
        tree.image(f"img{k}.jpg")
        tree.voc_xml(f"img{k}.xml", [("cat", 1, 1, 9, 9)])
    tree.image("lonely.png")  # no XML next to it

    index = read_dataset(tree.root, seed=3)

    assert index.split_source == "seeded"
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 8, "val": 1, "test": 1}
    assert kinds(index) == [("missing_annotation", "lonely.png", None)]
    again = read_dataset(tree.root, seed=3)
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {k: [r.image_id for r in v] for k, v in again.splits.items()}
    other = read_dataset(tree.root, seed=4, fractions=(0.5, 0.5, 0.0))
    assert {k: len(v) for k, v in other.splits.items()} == {"train": 5, "val": 5}


def test_split_folders_side_by_side(tree):
    for split in ("train", "valid"):
        tree.image(f"{split}/x.jpg")
        tree.voc_xml(f"{split}/x.xml", [("cat", 1, 1, 9, 9)])
    index = read_dataset(tree.root)
    assert index.split_source == "dataset"
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {"train": ["train/x"], "val": ["valid/x"]}


def test_bad_fractions_are_refused(tree):
    tree.image("a.jpg")
    tree.voc_xml("a.xml", [])
    with pytest.raises(DataError, match="summing to 1"):
        read_dataset(tree.root, fractions=(0.5, 0.2, 0.1))


def test_seeded_split_does_not_move_when_an_image_is_skipped(tree):
    for k in range(12):
        tree.image(f"img{k:02d}.jpg")
        tree.voc_xml(f"img{k:02d}.xml", [("cat", 1, 1, 9, 9)])
    tree.truncated_jpeg("img05.jpg")  # skipped only when images are verified

    verified = read_dataset(tree.root, seed=1)
    header_only = read_dataset(tree.root, seed=1, verify_images=False)

    assert [p.kind for p in verified.problems] == ["truncated_image"]
    for name, records in header_only.splits.items():
        expected = [r.image_id for r in records if r.image_id != "img05"]
        assert [r.image_id for r in verified.splits[name]] == expected


@pytest.mark.parametrize("ann_folder", ["annotations", "annots"])
def test_images_and_annotation_folders_side_by_side(tree, ann_folder):
    """The common GitHub layout: images/ + annotations/, <folder> says images. The annotation
    folder is a folder, not a split; images are found by the XML's name, <filename> or <path>."""
    for k in range(10):
        tree.image(f"images/img{k}.jpg")
        tree.voc_xml(f"{ann_folder}/img{k}.xml", [("cat", 1, 1, 9, 9)], folder="images")
    tree.image("images/photo.png")
    tree.voc_xml(f"{ann_folder}/renamed.xml", [("dog", 2, 2, 8, 8)], folder="images", filename="photo.png")  # by <filename>
    tree.image("images/shot.jpg")
    tree.voc_xml(f"{ann_folder}/other.xml", [("dog", 1, 1, 5, 5)], filename="stale.jpg",
                 path="C:\\Users\\someone\\data\\images\\shot.jpg")  # by the file name in <path>
    tree.image("images/lonely.jpg")  # no XML describes it

    index = read_dataset(tree.root)

    assert index.format == "voc" and index.split_source == "seeded"
    assert set(index.splits) == {"train", "val", "test"}
    records = by_name(index)
    assert len(records) == 12 and records["photo.png"].labels.tolist() == [1]
    assert records["shot.jpg"].labels.tolist() == [1] and records["img3.jpg"].image_id == "images/img3"
    assert kinds(index) == [("missing_annotation", "images/lonely.jpg", None)]
    assert f"{ann_folder}/lonely.xml" in index.problems[0].message


def test_annotation_folders_inside_split_folders(tree):
    for split in ("train", "valid"):
        tree.image(f"{split}/images/x.jpg")
        tree.voc_xml(f"{split}/annotations/x.xml", [("cat", 1, 1, 9, 9)], folder="images")
    index = read_dataset(tree.root)
    assert index.split_source == "dataset" and index.problems == []
    assert {k: [r.image_id for r in v] for k, v in index.splits.items()} == {"train": ["train/images/x"], "val": ["valid/images/x"]}
