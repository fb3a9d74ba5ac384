"""EXIF orientation: images stored turned with an orientation tag are read upright, as annotation
tools and Ultralytics show them, in the readers, the training pipeline, predict and the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from kdet.data import read_dataset
from kdet.data.common import UPRIGHT_TRANSPOSE
from kdet.data.pipeline import load_image

from tiny_trees import by_name, kinds, tree  # noqa: F401  (tree is a fixture)

UPRIGHT_W, UPRIGHT_H = 24, 32
SQUARE = (4, 18, 12, 28)  # xyxy of the red square on the upright image


def _upright_pixels() -> np.ndarray:
    pixels = np.full((UPRIGHT_H, UPRIGHT_W, 3), 20, np.uint8)
    x1, y1, x2, y2 = SQUARE
    pixels[y1:y2, x1:x2] = (230, 30, 30)
    return pixels


def _save_turned(path: Path, orientation: int) -> Path:
    """Store the upright image turned so that its EXIF ``orientation`` shows it upright again."""
    inverse = UPRIGHT_TRANSPOSE[{6: 8, 8: 6}.get(orientation, orientation)]
    stored = Image.fromarray(_upright_pixels()).transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif, format="PNG")
    return path


@pytest.mark.parametrize("orientation", range(2, 9))
def test_loader_turns_every_orientation_as_pil_does(tmp_path, orientation):
    path = _save_turned(tmp_path / "a.png", orientation)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    loaded = load_image(path).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(loaded, expected)
    np.testing.assert_array_equal(loaded, _upright_pixels())


def test_yolo_labels_land_on_the_upright_pixels_and_the_tag_is_reported(tree):
    path = _save_turned(tree.root / "images" / "train" / "a.png", 6)
    x1, y1, x2, y2 = SQUARE
    cx, cy, w, h = (x1 + x2) / 2 / UPRIGHT_W, (y1 + y2) / 2 / UPRIGHT_H, (x2 - x1) / UPRIGHT_W, (y2 - y1) / UPRIGHT_H
    tree.text("labels/train/a.txt", f"0 {cx} {cy} {w} {h}\n")
    tree.text("data.yaml", "train: images/train\nval: images/train\nnames: [square]\n")

    index = read_dataset(tree.root)

    record = by_name(index)["a.png"]
    assert (record.width, record.height) == (UPRIGHT_W, UPRIGHT_H)
    np.testing.assert_allclose(record.boxes, [SQUARE], atol=1e-4)
    image = load_image(path)  # uint8 [3, H, W]
    assert tuple(image.shape) == (3, UPRIGHT_H, UPRIGHT_W)
    inside = image[:, y1:y2, x1:x2].float().mean(dim=(1, 2))
    assert inside[0] > 200 and inside[1] < 60  # the box holds the red square
    assert kinds(index) == [("exif_orientation", "images/train/a.png", None)]
    problem = index.problems[0]
    assert "orientation 6" in problem.message and "stored as 32x24, upright 24x32" in problem.message


def test_voc_size_is_compared_upright(tree):
    _save_turned(tree.root / "JPEGImages" / "a.png", 6)
    tree.voc_xml("Annotations/a.xml", [("square", *SQUARE)], size=(UPRIGHT_W, UPRIGHT_H), filename="a.png")
    _save_turned(tree.root / "JPEGImages" / "b.png", 8)
    tree.voc_xml("Annotations/b.xml", [("square", *SQUARE)], size=(UPRIGHT_H, UPRIGHT_W), filename="b.png")  # the stored size

    index = read_dataset(tree.root)

    assert kinds(index) == [
        ("exif_orientation", "JPEGImages/a.png", None),
        ("exif_orientation", "JPEGImages/b.png", None),
        ("size_mismatch", "Annotations/b.xml", None),
    ]
    mismatch = index.problems[-1]
    assert "before the EXIF orientation" in mismatch.message
    np.testing.assert_allclose(by_name(index)["a.png"].boxes, [SQUARE])


def test_predict_and_report_draw_on_the_upright_image(tmp_path):
    from kdet.config import ModelConfig
    from kdet.engine.predict import predict_images
    from kdet.models import build_model
    from kdet.report.plots import draw_boxes
    from kdet.structures import ImageRecord

    path = _save_turned(tmp_path / "in" / "a.png", 5)
    model = build_model(ModelConfig(size="p", anchors="default"), ["square"], 64)
    results, skipped = predict_images(model, [path], 64, tmp_path / "out", score_thresh=0.0)
    assert skipped == []
    assert (results[0]["width"], results[0]["height"]) == (UPRIGHT_W, UPRIGHT_H)
    with Image.open(tmp_path / "out" / "a.png") as drawn:
        assert drawn.size == (UPRIGHT_W, UPRIGHT_H)

    record = ImageRecord("a", path, UPRIGHT_W, UPRIGHT_H, np.array([SQUARE], np.float32), np.array([0]))
    assert draw_boxes(record, record.boxes, record.labels).shape == (UPRIGHT_H, UPRIGHT_W, 3)
