"""`kdet data check`: the summary dict and its rendering; the bundled BCCD copy."""
from __future__ import annotations

import io
import json

from rich.console import Console

from kdet.data import bundled_bccd_path, read_dataset
from kdet.data.check import SHOWN_PER_KIND, render_summary, summarize

from tiny_trees import tree  # noqa: F401  (a fixture)


def _render(summary: dict) -> str:
    buffer = io.StringIO()
    render_summary(summary, Console(file=buffer, width=200, color_system=None))
    return buffer.getvalue()


def test_summary_counts_and_problems(tree):
    tree.text("classes.txt", "cat\ndog\nbird\n")
    tree.image("a.jpg")
    tree.voc_xml("a.xml", [("cat", 0, 0, 10, 20), ("cat", 0, 0, 4, 6), ("dog", 2, 2, 2, 8)])  # dog: zero width
    tree.image("b.jpg", size=(16, 12))
    tree.voc_xml("b.xml", [("[red]x", 1, 1, 3, 3)], size=(16, 12))  # a name that looks like rich markup
    tree.image("c.jpg")
    tree.voc_xml("c.xml", [])

    summary = summarize(read_dataset(tree.root))

    json.dumps(summary)  # plain JSON types only
    assert summary["format"] == "voc" and summary["split_source"] == "seeded"
    assert summary["images"] == 3 and summary["boxes"] == 2 and summary["images_without_boxes"] == 2
    assert summary["classes"] == {"cat": 2, "dog": 0, "bird": 0}
    assert sum(s["images"] for s in summary["splits"].values()) == 3
    assert summary["image_sizes"] == [{"width": 32, "height": 24, "count": 2}, {"width": 16, "height": 12, "count": 1}]
    assert summary["box_sizes"] == {"width": {"min": 4.0, "median": 7.0, "max": 10.0}, "height": {"min": 6.0, "median": 13.0, "max": 20.0}}
    assert summary["problem_counts"] == {"unused_class": 2, "zero_size_box": 1, "unknown_class": 1}
    zero = next(p for p in summary["problems"] if p["kind"] == "zero_size_box")
    assert (zero["file"], zero["line"], zero["action"]) == ("a.xml", 29, "box dropped")

    text = _render(summary)
    assert "a.xml:29" in text and "zero_size_box (1)" in text and "[red]x" in text
    assert "dog" in text and "16x12 (1)" in text


def test_render_shows_the_first_problems_of_each_kind(tree):
    tree.image("images/a.jpg")
    tree.text("labels/a.txt", "".join("0 0.5 0.5 0.1\n" for _ in range(SHOWN_PER_KIND + 5)))
    tree.text("classes.txt", "cell\n")
    summary = summarize(read_dataset(tree.root))
    assert summary["problem_counts"]["malformed_annotation"] == SHOWN_PER_KIND + 5
    assert len(summary["problems"]) == SHOWN_PER_KIND + 6  # + cell unused: everything in the dict
    text = _render(summary)
    assert f"labels/a.txt:{SHOWN_PER_KIND}" in text and f"labels/a.txt:{SHOWN_PER_KIND + 1} " not in text
    assert "... and 5 more malformed_annotation" in text


def test_clean_dataset_says_so(tree):
    tree.image("a.jpg")
    tree.voc_xml("a.xml", [("cat", 1, 1, 5, 5)])
    assert "No problems found." in _render(summarize(read_dataset(tree.root)))


def test_bundled_bccd():
    root = bundled_bccd_path()
    assert (root / "LICENSE").is_file() and "Shenggan/BCCD_Dataset" in (root / "SOURCE.md").read_text()

    index = read_dataset("bundled:bccd")

    assert index.format == "voc" and index.split_source == "dataset"
    assert sorted(index.class_names) == ["Platelets", "RBC", "WBC"]
    assert {k: len(v) for k, v in index.splits.items() if k != "trainval"} == {"train": 205, "val": 87, "test": 72}
    assert len(index.all_records()) == 364
    assert {(r.width, r.height) for r in index.all_records()} == {(320, 240)}
    zero = [p for p in index.problems if p.kind == "zero_size_box"]
    assert sorted(p.file for p in zero) == ["Annotations/BloodImage_00338.xml", "Annotations/BloodImage_00343.xml"]
    assert [p.kind for p in index.problems] == ["zero_size_box", "zero_size_box"]
    summary = summarize(index)
    assert summary["classes"] == {"Platelets": 361, "RBC": 4153, "WBC": 372}  # 4155 RBC less the two zero-size


def test_nothing_usable_left_exits_non_zero(tree, capsys):
    from kdet.cli import main

    tree.image("images/a.jpg")
    tree.voc_xml("annotations/a.xml", [("cat", 1, 1, 5, 5)])
    tree.truncated_jpeg("images/a.jpg")
    tree.voc_xml("annotations/b.xml", [("cat", 1, 1, 5, 5)])  # its image does not exist

    assert main(["data", "check", str(tree.root), "--json"]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["images"] == 0 and summary["errors"] and "no usable image" in captured.err


def test_a_split_whose_images_are_all_skipped_is_lost(tree, capsys):
    from kdet.cli import main

    for stem in ("a", "b", "c"):
        tree.image(f"JPEGImages/{stem}.jpg")
        tree.voc_xml(f"Annotations/{stem}.xml", [("cat", 1, 1, 5, 5)])
    tree.truncated_jpeg("JPEGImages/c.jpg")
    tree.text("ImageSets/Main/train.txt", "a\nb\n")
    tree.text("ImageSets/Main/val.txt", "c\n")

    index = read_dataset(tree.root)

    assert list(index.splits) == ["train"] and "none of its 1 image(s) could be used" in index.lost_splits["val"]
    lost = next(p for p in index.problems if p.kind == "split_lost")
    assert lost.file == "ImageSets/Main/val.txt"
    assert main(["data", "check", str(tree.root)]) == 1
    assert "split 'val' is lost" in capsys.readouterr().err
    # a clean dataset exits 0
    tree.image("JPEGImages/c.jpg")
    assert main(["data", "check", str(tree.root)]) == 0


def test_rare_class_is_warned_with_its_splits(tree):
    for stem in ("a", "b", "c", "d"):
        tree.image(f"JPEGImages/{stem}.jpg")
    tree.voc_xml("Annotations/a.xml", [("cell", 1, 1, 5, 5), ("stray", 6, 6, 9, 9)])
    tree.voc_xml("Annotations/b.xml", [("cell", 1, 1, 5, 5)])
    tree.voc_xml("Annotations/c.xml", [("cell", 1, 1, 5, 5)])
    tree.voc_xml("Annotations/d.xml", [("cell", 1, 1, 5, 5)])
    tree.text("ImageSets/Main/train.txt", "a\nb\n")
    tree.text("ImageSets/Main/val.txt", "c\n")
    tree.text("ImageSets/Main/test.txt", "d\n")

    summary = summarize(read_dataset(tree.root))

    assert [(w["class"], w["boxes"], w["splits"]) for w in summary["warnings"]] == [("stray", 1, {"train": 1})]
    message = summary["warnings"][0]["message"]
    assert "too few to learn it or to score it" in message and "no box in the test split" in message
    assert "warning: class 'stray' has 1 box(es) (train: 1)" in _render(summary)
    assert summary["errors"] == []
