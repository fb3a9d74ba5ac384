"""``kdet predict`` on a folder with a corrupt image: it is skipped and named, the rest predicted."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from kdet.cli import main
from kdet.config import ModelConfig
from kdet.engine.checkpoint import model_payload, save_atomic
from kdet.models import build_model


def test_corrupt_image_is_skipped_reported_and_the_rest_predicted(tmp_path, capsys):
    config = ModelConfig(size="p", anchors="default")
    checkpoint = tmp_path / "best.pt"
    save_atomic(model_payload(build_model(config, ["cell"], 64), config, 64), checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "c.png"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / name)
    (images / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")

    assert main(["predict", str(checkpoint), str(images), "--out", str(tmp_path / "out"), "--score-thresh", "0.0"]) == 0

    listed = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [item["image"] for item in listed] == [str(images / "a.jpg"), str(images / "c.png")]
    err = capsys.readouterr().err
    assert f"kdet predict: skipped {images / 'b.jpg'}: cannot be read as an image" in err
    assert "1 of 3 image(s) skipped" in err
    # nothing readable at all: still a predictions.json, and exit code 1
    assert main(["predict", str(checkpoint), str(images / "b.jpg"), "--out", str(tmp_path / "none")]) == 1
    assert json.loads((tmp_path / "none" / "predictions.json").read_text()) == []
