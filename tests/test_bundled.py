"""What kdet ships: the BCCD copy and the BCCD teachers trained on it."""
import pytest

from kdet.data import read_dataset
from kdet.engine.checkpoint import load_detector
from kdet.engine.evaluate import evaluate_model
from kdet.bundled import BUNDLED_MODELS


@pytest.mark.parametrize("name, head", [("bccd_teacher", "anchor"), ("bccd_teacher_dfl", "dfl")])
def test_bundled_teacher_detects_blood_cells(name, head):
    model, payload = load_detector(f"bundled:{name}")
    assert BUNDLED_MODELS[name].stat().st_size < 20e6
    assert model.head_kind == head
    assert model.class_names == ["Platelets", "RBC", "WBC"]
    assert sum(p.numel() for p in model.parameters()) >= 4_000_000
    records = read_dataset("bundled:bccd").split("test")[:12]
    metrics = evaluate_model(model, records, payload["input_size"], batch_size=4)
    # BENCHMARKS.md reports the full test split; 12 images are enough to catch a broken
    # checkpoint, reader or decoder (an untrained model scores near 0)
    assert metrics["coco"]["AP50"] > 0.6
