"""VOC -> COCO / YOLO / VOC exports read back to the same boxes, labels, classes and splits."""
from __future__ import annotations

import numpy as np
import pytest

from kdet.cli import main
from kdet.data import DataError, detect_format, keep_classes, read_dataset
from kdet.data.export import export_coco, export_voc, export_yolo

from tiny_trees import tree  # noqa: F401  (a fixture)


@pytest.fixture
def voc_source(tree):
    """Float coordinates, a difficult box, an image without boxes, an overlapping trainval
    split, two images with the same file name in different folders, and a class order
    that is not alphabetical."""
    tree.text("classes.txt", "zebra\nant\n")
    tree.image("JPEGImages/a.jpg")
    tree.voc_xml("Annotations/a.xml", [("zebra", 1.25, 2.5, 20.75, 13.125), ("ant", 3, 4, 31, 23, 1)])
    tree.image("JPEGImages/b.jpg")
    tree.voc_xml("Annotations/b.xml", [("ant", 0.5, 0.5, 7.3, 9.9)])
    tree.image("JPEGImages/c.jpg")
    tree.voc_xml("Annotations/c.xml", [])
    for name, ids in {"train": ["a", "b"], "val": ["c"], "trainval": ["a", "b", "c"]}.items():
        tree.text(f"ImageSets/Main/{name}.txt", "".join(f"{i}\n" for i in ids))
    return read_dataset(tree.root)


def _by_stem(index):
    return {r.path.stem: r for r in index.all_records()}


@pytest.mark.parametrize("export, tolerance, keeps_difficult", [
    (export_coco, 1e-3, True),
    (export_yolo, 1e-2, False),
    (export_voc, 1e-6, True),
])
@pytest.mark.parametrize("copy_images", [True, False])
def test_round_trip(voc_source, tmp_path, export, tolerance, keeps_difficult, copy_images):
    out = export(voc_source, tmp_path / "out", copy_images=copy_images)
    back = read_dataset(out)

    assert back.format == detect_format(out) == export.__name__.removeprefix("export_")
    assert back.problems == []
    assert back.class_names == voc_source.class_names == ["zebra", "ant"]
    assert back.split_source == "dataset"
    expected = {k: sorted(r.path.stem for r in v) for k, v in voc_source.splits.items()}
    if export is export_coco:  # COCO cannot share images between split folders: trainval is left out
        del expected["trainval"]
    assert {k: sorted(r.path.stem for r in v) for k, v in back.splits.items()} == expected
    source, copy = _by_stem(voc_source), _by_stem(back)
    assert source.keys() == copy.keys()
    for stem, record in source.items():
        np.testing.assert_allclose(copy[stem].boxes, record.boxes, atol=tolerance, rtol=0)
        assert copy[stem].labels.tolist() == record.labels.tolist()
        assert (copy[stem].width, copy[stem].height) == (record.width, record.height)
        if keeps_difficult:
            assert copy[stem].difficult.tolist() == record.difficult.tolist()
    image = next(out.rglob("a.jpg"))
    assert image.is_symlink() == (not copy_images)


def test_layouts_on_disk(voc_source, tmp_path):
    coco = export_coco(voc_source, tmp_path / "coco")
    assert sorted(p.name for p in coco.iterdir()) == ["train", "valid"]
    assert (coco / "valid" / "_annotations.coco.json").is_file() and (coco / "valid" / "c.jpg").is_file()
    yolo = export_yolo(voc_source, tmp_path / "yolo")
    assert (yolo / "data.yaml").is_file() and (yolo / "labels" / "train" / "a.txt").is_file()
    assert (yolo / "labels" / "val" / "c.txt").read_text() == ""  # no boxes: an empty label file, not a missing one
    # trainval is listed, not copied a second time
    assert sorted(p.name for p in (yolo / "images").iterdir()) == ["train", "val"]
    assert (yolo / "trainval.txt").read_text().split() == ["./images/train/a.jpg", "./images/train/b.jpg", "./images/val/c.jpg"]
    voc = export_voc(voc_source, tmp_path / "voc")
    assert (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split() == ["a", "b", "c"]


def test_clashing_file_names_are_made_unique(tree, tmp_path):
    for folder in ("x", "y"):
        tree.image(f"{folder}/same.jpg")
        tree.voc_xml(f"{folder}/same.xml", [("cat", 1, 1, 5, 5)])
    index = read_dataset(tree.root)
    back = read_dataset(export_yolo(index, tmp_path / "out"))
    assert sorted(r.path.name for r in back.all_records()) == ["x__same.jpg", "y__same.jpg"]
    assert back.problems == []


def test_keep_classes_keeps_every_image_and_counts_the_boxes_removed(voc_source):
    kept, removed = keep_classes(voc_source, ["ant"])
    assert kept.class_names == ["ant"]
    assert removed == {"zebra": 1}  # image a is in train and trainval: its zebra counts once
    assert {k: len(v) for k, v in kept.splits.items()} == {k: len(v) for k, v in voc_source.splits.items()}
    records = _by_stem(kept)
    assert records["a"].labels.tolist() == [0] and records["a"].difficult.tolist() == [True]
    np.testing.assert_allclose(records["a"].boxes, [[3, 4, 31, 23]])
    assert records["b"].labels.tolist() == [0]
    assert len(records["c"].boxes) == 0
    assert voc_source.class_names == ["zebra", "ant"] and len(_by_stem(voc_source)["a"].boxes) == 2  # source untouched


def test_keep_classes_refuses_a_class_the_dataset_does_not_have(voc_source):
    with pytest.raises(DataError, match=r"\['helmet'\] are not classes of .*\['zebra', 'ant'\]"):
        keep_classes(voc_source, ["ant", "helmet"])
    with pytest.raises(DataError, match="once"):
        keep_classes(voc_source, ["ant", "ant"])


def test_convert_with_classes_writes_a_specialists_copy(voc_source, tmp_path, capsys):
    assert main(["data", "convert", str(voc_source.root), "--to", "yolo", "--out", str(tmp_path / "ants"),
                 "--classes", "ant"]) == 0
    assert "boxes removed: zebra 1" in capsys.readouterr().out
    back = read_dataset(tmp_path / "ants")
    assert back.class_names == ["ant"]
    assert sorted(r.path.stem for r in back.all_records()) == ["a", "b", "c"]
    assert sum(len(r.boxes) for r in back.all_records()) == 2
