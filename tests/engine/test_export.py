"""ONNX export and the speed bench: the exported graph gives PyTorch's boxes and scores,
postprocess gives PyTorch's detections (YOLO), the file carries its metadata, and `kdet export`
/ `kdet bench` work as a user runs them. Tiny untrained models at 64 px."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

from kdet.cli import main
from kdet.config import ModelConfig
from kdet.engine import export as export_module
from kdet.engine.checkpoint import model_payload, save_atomic
from kdet.engine.export import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ExportWrapper,
    Tolerance,
    export_onnx,
    ort_session,
    postprocess,
    read_metadata,
    run_session,
    weights_fingerprint,
)
from kdet.models import build_model

SIZE = 64
CONFIGS = {
    "yolo": ModelConfig(family="yolo", backbone="cspdarknet", size="p", anchors="default"),
    "fcos": ModelConfig(family="fcos", backbone="mobilenet_v3_small", size="p", fpn_channels=64),
}


# random images, standing in for a dataset: models are calibrated on them and tested on them
IMAGES = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def calibrate(model) -> None:
    """Make an untrained model behave like a trained one on :data:`IMAGES`: BatchNorm statistics
    from those images. Untrained, a model's features fade layer after layer and every location
    gets the same score; calibrated, its scores spread over orders of magnitude, so thresholds
    and NMS have work to do, and its activations stay in the range fp16 keeps precisely."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(IMAGES)
    model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``family -> (model, checkpoint path)``."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for index, (family, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(index)
        model = build_model(config, ["a", "b"], SIZE)
        calibrate(model)
        path = root / family / "best.pt"
        save_atomic(model_payload(model, config, SIZE), path)
        out[family] = (model, path)
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """``family -> (report, path)`` of a dynamic-batch fp32 export, verified on 3 images."""
    root = tmp_path_factory.mktemp("onnx")
    return {
        family: (report := export_onnx(model, SIZE, root / f"{family}.onnx", dynamic_batch=True, verify_with=images(3, 5)), report.path)
        for family, (model, _) in models.items()
    }


def images(n: int, start: int = 0) -> torch.Tensor:
    return IMAGES[start : start + n]


def assert_same_detections(ours, theirs, *, box_tol=1e-2, score_tol=1e-4):
    """Same detections, in any order (NMS may order near-equal scores either way)."""
    assert len(ours.boxes) == len(theirs.boxes)
    free = list(range(len(theirs.boxes)))
    for box, score, label in zip(ours.boxes, ours.scores, ours.labels):
        match = next(
            (j for j in free if theirs.labels[j] == label and (theirs.boxes[j] - box).abs().max() <= box_tol
             and abs(theirs.scores[j] - score) <= score_tol),
            None,
        )
        assert match is not None, f"no ONNX detection for {box.tolist()} {float(score):.4f} class {int(label)}"
        free.remove(match)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_onnx_outputs_match_pytorch_at_batch_1_and_3(family, models, exported):
    model, _ = models[family]
    report, path = exported[family]
    onnx.checker.check_model(str(path))
    assert report.max_box_diff <= FP32_TOLERANCE.boxes and report.max_score_diff <= FP32_TOLERANCE.scores
    session = ort_session(path, threads=1)
    assert session.get_inputs()[0].shape == ["batch", 3, SIZE, SIZE]
    wrapper = ExportWrapper(model, SIZE)
    for n in (1, 3):
        x = images(n)
        with torch.no_grad():
            boxes, scores = wrapper(x)
        ort_boxes, ort_scores = session.run(None, {"images": x.numpy()})
        assert ort_boxes.shape == (n, report.num_boxes, 4) and ort_scores.shape == (n, report.num_boxes, 2)
        assert np.abs(ort_boxes - boxes.numpy()).max() <= FP32_TOLERANCE.boxes
        assert np.abs(ort_scores - scores.numpy()).max() <= FP32_TOLERANCE.scores
        assert ort_boxes.min() >= 0 and ort_boxes.max() <= SIZE  # clipped to the image


def test_postprocess_of_onnx_outputs_gives_pytorch_detections_for_yolo(models, exported):
    model, _ = models["yolo"]
    x = images(3, 2)
    boxes, scores = run_session(ort_session(exported["yolo"][1], threads=1), x)
    for score_thresh in (float(np.median(scores)), 0.001):
        assert np.abs(scores - score_thresh).min() > 1e-6 * score_thresh  # none on the edge of the threshold
        with torch.no_grad():
            reference = model(x, decode=True, score_thresh=score_thresh, nms_iou=0.6, max_det=100).detections
        ours = postprocess(boxes, scores, score_thresh, 0.6, 100)
        assert len(ours) == 3 and all(len(d.boxes) > 0 for d in ours)
        for a, b in zip(reference, ours):
            assert_same_detections(a, b)


def test_postprocess_takes_one_image_and_refuses_bad_shapes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [30, 30, 40, 40]], np.float32)
    scores = np.array([[0.9, 0.1], [0.8, 0.0], [0.0, 0.7]], np.float32)
    (det,) = postprocess(boxes, scores, 0.5, 0.5, 10)
    assert det.labels.tolist() == [0, 1] and det.scores.tolist() == pytest.approx([0.9, 0.7])
    with pytest.raises(ValueError, match=r"boxes \[N, K, 4\]"):
        postprocess(boxes[None], scores[None, :2])


def test_metadata_describes_the_model(models, exported):
    model, _ = models["yolo"]
    meta = read_metadata(exported["yolo"][1])
    assert json.loads(meta["kdet.class_names"]) == ["a", "b"]
    assert meta["kdet.input_size"] == str(SIZE) and meta["kdet.family"] == "yolo"
    assert meta["kdet.version"] == __import__("kdet").__version__
    assert "xyxy" in meta["kdet.box_format"] and "NMS" in meta["kdet.nms"]
    assert meta["kdet.batch"] == "dynamic" and meta["kdet.precision"] == "fp32"
    assert meta["kdet.weights_sha256"] == weights_fingerprint(model)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fp16_export_is_half_the_size_and_close(family, models, exported, tmp_path):
    model, _ = models[family]
    x = images(2)
    report = export_onnx(model, SIZE, tmp_path / "half.onnx", dynamic_batch=True, fp16=True, verify_with=x)
    assert report.max_box_diff <= FP16_TOLERANCE.boxes and report.max_score_diff <= FP16_TOLERANCE.scores
    assert report.bytes < 0.6 * exported[family][0].bytes
    proto = onnx.load(str(report.path))
    onnx.checker.check_model(proto)
    weights = [t for t in proto.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    io_types = [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)]
    assert io_types == [onnx.TensorProto.FLOAT] * 3  # images in, boxes and scores out stay fp32
    assert read_metadata(report.path)["kdet.precision"].startswith("fp16")


def test_a_failed_check_leaves_nothing_behind(models, tmp_path, monkeypatch):
    model, _ = models["yolo"]
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", Tolerance(boxes=-1.0, scores=-1.0))
    with pytest.raises(ValueError, match="ONNX Runtime disagrees with PyTorch"):
        export_onnx(model, SIZE, tmp_path / "model.onnx", verify_with=images(1))
    assert list(tmp_path.iterdir()) == []


def test_kdet_export_writes_next_to_the_checkpoint(models, capsys):
    _, checkpoint = models["yolo"]
    assert main(["export", str(checkpoint), "--format", "onnx"]) == 0
    out = checkpoint.with_suffix(".onnx")
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "onnx.checker passed" in printed
    assert "4 random image(s): boxes max |diff|" in printed  # classes a, b are not BCCD's
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["best.onnx", "best.pt"]  # no temporary file left
    session = ort_session(out, threads=1)
    assert session.get_inputs()[0].shape == [1, 3, SIZE, SIZE]  # fixed batch by default
    assert run_session(session, images(2))[0].shape[0] == 2  # one image at a time


def test_kdet_export_out_and_opset(models, tmp_path, capsys):
    _, checkpoint = models["fcos"]
    out = tmp_path / "sub" / "fcos11.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--opset", "11", "--dynamic-batch"]) == 0
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 11
    assert "dynamic batch" in capsys.readouterr().out


def _results(capsys) -> dict:
    report = json.loads(capsys.readouterr().out)
    for r in report["results"]:
        assert math.isfinite(r["latency_ms_median"]) and r["latency_ms_median"] > 0
        assert math.isfinite(r["latency_ms_iqr"]) and r["latency_ms_iqr"] >= 0
        assert r["images_per_s"] > 0 and r["params"] > 0 and r["runs"] == 3
    return report


def test_kdet_bench_checkpoint(models, capsys):
    _, checkpoint = models["yolo"]
    threads = torch.get_num_threads()
    assert main(["bench", str(checkpoint), "--runs", "3", "--warmup", "1", "--threads", "1", "--batch", "2", "--json"]) == 0
    report = _results(capsys)
    assert [r["backend"] for r in report["results"]] == ["pytorch", "onnxruntime"]
    assert report["batch"] == 2 and report["threads"] == 1 and report["input_size"] == SIZE
    assert all(r["flops"] > 0 for r in report["results"])
    assert torch.get_num_threads() == threads  # restored


def test_kdet_bench_onnx_alone_and_with_its_checkpoint(models, exported, capsys):
    path = exported["yolo"][1]
    assert main(["bench", str(path), "--runs", "3", "--warmup", "1", "--threads", "1", "--batch", "3", "--json"]) == 0
    (alone,) = _results(capsys)["results"]
    assert alone["backend"] == "onnxruntime" and alone["flops"] is None and alone["batch"] == 3
    assert main(["bench", str(path), "--runs", "3", "--warmup", "1", "--threads", "1"]) == 0
    assert "FLOPs -," in capsys.readouterr().out
    _, checkpoint = models["yolo"]
    argv = ["bench", str(path), "--checkpoint", str(checkpoint), "--runs", "3", "--warmup", "1", "--threads", "1", "--json"]
    assert main(argv) == 0
    both = _results(capsys)["results"]
    assert [r["backend"] for r in both] == ["pytorch", "onnxruntime"] and both[0]["flops"] == both[1]["flops"] > 0
    argv[3] = str(models["fcos"][1])
    assert main(argv) == 2
    assert "was not exported from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["export", "/no/such/best.pt"], "/no/such/best.pt not found"),
        (["bench", "/no/such/best.pt", "--runs", "3"], "/no/such/best.pt not found"),
        (["bench", "/no/such/model.onnx", "--runs", "3"], "/no/such/model.onnx not found"),
        (["export", "bundled:nothing"], "no bundled checkpoint 'bundled:nothing'"),
    ],
)
def test_missing_files_are_one_clear_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_refusals_are_one_clear_line(models, tmp_path, capsys):
    _, checkpoint = models["yolo"]
    assert main(["export", str(checkpoint), "--opset", "5"]) == 2
    assert "--opset 5 is not supported" in capsys.readouterr().err
    fixed = tmp_path / "fixed.onnx"
    export_onnx(models["yolo"][0], SIZE, fixed)
    assert main(["bench", str(fixed), "--batch", "2", "--runs", "3"]) == 2
    assert "fixed batch of 1" in capsys.readouterr().err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert main(["bench", str(broken), "--runs", "3"]) == 2
    assert "cannot be read as an ONNX model" in capsys.readouterr().err


def test_out_naming_an_existing_folder(models, tmp_path, capsys, monkeypatch):
    model, checkpoint = models["yolo"]
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder; give the ONNX file to write"):
        export_onnx(model, SIZE, folder)
    # refused before any export work is done
    monkeypatch.setattr(export_module, "ExportWrapper", lambda *a, **k: pytest.fail("exported before checking --out"))
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(model, SIZE, folder)
    monkeypatch.undo()
    # kdet export --out FOLDER writes the default name into it
    assert main(["export", str(checkpoint), "--out", str(folder)]) == 0
    assert f"wrote {folder / 'best.onnx'}" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["best.onnx"]
