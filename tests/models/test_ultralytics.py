"""The Ultralytics family: YOLOv8/11/26 detect models built from the yamls Ultralytics ships
(nothing downloaded), read through kdet's interface with the same maps, losses and detections
as Ultralytics' own, Ultralytics checkpoints read as teachers, a distilled student saved as an
Ultralytics checkpoint that ``YOLO(...).predict``/``.val`` accept, cross-family pairs in
``kdet check``, and the core package working without ultralytics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

os.environ.setdefault("YOLO_OFFLINE", "1")
pytest.importorskip("ultralytics")
from kdet.models.ultralytics import import_ultralytics  # noqa: E402

import_ultralytics()  # as kdet imports it: PIL's own Image.open kept for the rest of the suite

from kdet.cli import main  # noqa: E402
from kdet.config import DistillSettings, ModelConfig, TermConfig  # noqa: E402
from kdet.distill.pairing import pair  # noqa: E402
from kdet.engine.checkpoint import load_detector  # noqa: E402
from kdet.engine.export import export_onnx  # noqa: E402
from kdet.models import build_model  # noqa: E402
from kdet.models.ultralytics import save_ultralytics_checkpoint  # noqa: E402

from conftest import tiny_config_dict  # noqa: E402

CLASSES = ["bar", "square"]
SIZE = 64
YAMLS = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]


def build(config: str = "yolo11n.yaml", classes=CLASSES):
    torch.manual_seed(0)
    return build_model(ModelConfig(family="ultralytics", config=config), list(classes), SIZE)


def batch():
    images = torch.full((2, 3, SIZE, SIZE), 0.1)
    images[0, :, 8:40, 12:44] = 0.9
    targets = [{"boxes": torch.tensor([[12.0, 8.0, 44.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


@pytest.mark.parametrize("config", YAMLS)
def test_maps_losses_and_detections_are_ultralytics_own(config):
    model = build(config).train()
    images, targets = batch()
    out = model(images, targets)
    assert [out.features[f"neck.p{i}"].stride for i in (3, 4, 5)] == [8, 16, 32]
    assert [out.features[f"backbone.c{i}"].stride for i in (3, 4, 5)] == [8, 16, 32]
    dfl = config != "yolo26n.yaml"
    for level in out.head:
        assert level.box_format == "ltrb_center" and level.num_anchors == 1 and level.score is None
        assert (level.box_dist is not None) == dfl and (level.box_dist is None or level.box_dist.shape[3] == 16)
    # the same maps as the Detect head's own training output (its one-to-many branch)
    theirs = model.net(images)
    theirs = theirs["one2many"] if "one2many" in theirs else theirs
    n = len(images)
    ours_scores = torch.cat([level.cls_logits[:, 0].reshape(n, len(CLASSES), -1) for level in out.head], -1)
    assert torch.allclose(ours_scores, theirs["scores"], atol=1e-5)
    # its own loss, per image
    batch_dict = {"batch_idx": torch.tensor([0.0]), "cls": torch.tensor([[1.0]]),
                  "bboxes": torch.tensor([[28.0, 24.0, 32.0, 32.0]]) / SIZE}
    expected, _ = model.criterion()(model.net(images), batch_dict)
    assert torch.allclose(out.loss, expected.sum() / n, rtol=1e-4)
    assert set(out.losses) == ({"box", "cls", "dfl"} if dfl else {"box", "cls", "l1"})
    out.loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if p.requires_grad and "one2one" not in name)
    model.eval()
    with torch.no_grad():
        detections = model(images, decode=True, score_thresh=0.0).detections
    assert len(detections) == 2 and all(len(d.boxes) for d in detections)
    assert torch.equal(model.pixel_mean.flatten(), torch.zeros(3)) and torch.equal(model.pixel_std.flatten(), torch.ones(3))


@pytest.mark.parametrize("config,one2one", [("yolo11n.yaml", False), ("yolo26n.yaml", False), ("yolo26n.yaml", True)])
def test_detections_are_those_of_ultralytics_own_inference(config, one2one):
    """kdet's detections are Ultralytics' own (its eval forward, then its NMS, or the one-to-one
    branch's top-k when the head is set end-to-end), boxes xyxy in input pixels."""
    from ultralytics.utils.nms import non_max_suppression

    model = build(config).eval()
    with torch.no_grad():  # sharper scores than a fresh head's, so that the ranking is well defined
        for conv in model.net.model[-1].cv3 + getattr(model.net.model[-1], "one2one_cv3", []):
            conv[-1].bias += torch.linspace(-2, 2, conv[-1].bias.numel())
    if one2one:
        model.net.end2end = True
    assert model.one_to_one_inference == one2one
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(images, decode=True, score_thresh=0.01, nms_iou=0.6, max_det=50).detections
        theirs, _ = model.net(images)
    theirs = non_max_suppression(theirs, 0.01, 0.6, multi_label=True, max_det=50, nc=len(CLASSES), end2end=one2one)
    for mine, their in zip(ours, theirs):
        assert len(mine.boxes) == len(their) > 0
        assert torch.allclose(mine.boxes, their[:, :4].clamp(0, SIZE), atol=1e-3)
        assert torch.allclose(mine.scores, their[:, 4], atol=1e-5) and torch.equal(mine.labels, their[:, 5].long())
        assert bool((mine.boxes[:, 2:] >= mine.boxes[:, :2]).all())  # xyxy, whatever the head's own format


def test_exports_to_onnx_matching_pytorch(tmp_path):
    model = build("yolo26n.yaml").eval()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, SIZE, tmp_path / "yolo26.onnx", verify_with=images[:1])
    assert report.max_box_diff <= 1e-2 and report.max_score_diff <= 1e-4


def terms(*names):
    return DistillSettings(terms=[TermConfig(loss=name, **({"student": "neck"} if name == "pkd" else {})) for name in names])


class Spy:
    """Records the class probabilities and boxes an assigner is called with."""

    def __init__(self, assigner):
        self.assigner, self.calls = assigner, []

    def __call__(self, pd_scores, pd_bboxes, *args, **kwargs):
        self.calls.append((pd_scores.detach().clone(), pd_bboxes.detach().clone()))
        return self.assigner(pd_scores, pd_bboxes, *args, **kwargs)


def spied(model):
    criterion = model.criterion()
    many = getattr(criterion, "one2many", criterion)
    many.assigner = Spy(many.assigner)
    return many.assigner


@pytest.mark.parametrize("config", ["yolo11n.yaml", "yolo26n.yaml"])
def test_the_assignment_can_read_a_teachers_predictions(config):
    """distill.assign: teacher for an Ultralytics student: its one-to-many assignment reads the
    teacher's class probabilities and boxes, exactly those Ultralytics' own loss gives the
    teacher's assigner; the losses stay the student's."""
    images, targets = batch()
    student, teacher = build(config).train(), build(config).train()
    torch.manual_seed(1)
    for p in teacher.parameters():  # another model: same architecture, other weights
        p.data.add_(0.05 * torch.randn_like(p))
    own = student(images, targets)
    assert torch.allclose(student(images, targets, assign_from=own.head).loss, own.loss, rtol=1e-4)  # its own: unchanged
    teacher_spy = spied(teacher)
    taught = teacher(images, targets)
    student_spy = spied(student)
    distilled = student(images, targets, assign_from=taught.head)
    (scores, boxes), = teacher_spy.calls
    (read_scores, read_boxes), = student_spy.calls[:1]
    assert torch.allclose(read_scores, scores, atol=1e-5) and torch.allclose(read_boxes, boxes, atol=1e-3)
    assert not torch.allclose(distilled.loss, own.loss)
    criterion = student.criterion()
    assert getattr(criterion, "one2many", criterion).assigner is student_spy  # put back after the call
    distilled.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    settings = terms("soft_bce").model_copy(update={"assign": "teacher"})
    report = pair(teacher.describe((SIZE, SIZE)), student.describe((SIZE, SIZE)), settings)
    assert report.ok and any("distill.assign: teacher" in note for note in report.notes)


def test_cross_family_pairs_pair_like_any_other():
    from kdet.distill.distiller import Distiller
    from kdet.engine.step import Batch

    models = {"yolo11": build("yolo11n.yaml"), "yolo26": build("yolo26n.yaml"),
              "kdet_dfl": build_model(ModelConfig(family="yolo", size="p", head="dfl"), CLASSES, SIZE),
              "fcos": build_model(ModelConfig(family="fcos", backbone="mobilenet_v3_small", width=0.5), CLASSES, SIZE)}
    specs = {name: model.describe((SIZE, SIZE)) for name, model in models.items()}
    # a kdet YOLO (DFL head) teacher and an Ultralytics YOLO11 student share the box distributions;
    # ld reads the student's own (Ultralytics') task-aligned assignment
    report = pair(specs["kdet_dfl"], specs["yolo11"], terms("ld", "soft_bce", "kl", "pkd"))
    assert report.ok
    step = Distiller(models["yolo11"].train(), models["kdet_dfl"].eval(), report)
    loss, losses = step(Batch.of(*batch()))
    assert torch.isfinite(loss) and losses["kd0_ld"] > 0
    assert pair(specs["yolo11"], specs["kdet_dfl"], terms("ld", "objectness_scaled", "pkd")).ok
    assert pair(specs["fcos"], specs["yolo26"], terms("objectness_scaled", "kl", "pkd")).ok
    # YOLO11 teacher, YOLO26 student: YOLO26's head has no box distributions, so ld is refused, the rest pairs
    report = pair(specs["yolo11"], specs["yolo26"], terms("ld", "kl", "soft_bce", "pkd"))
    assert len(report.errors) == 1 and "ld distils box-edge distributions, which the student head does not have" in report.errors[0]


def test_ultralytics_checkpoint_is_a_teacher_and_the_distilled_student_an_ultralytics_checkpoint(shapes_voc, tmp_path, capsys):
    from ultralytics import YOLO

    from kdet.data import read_dataset
    from kdet.data.export import export_yolo

    # an Ultralytics checkpoint (as `yolo train` leaves one) is read as a kdet detector and teaches
    teacher = build("yolo11n.yaml")
    teacher_path = save_ultralytics_checkpoint(teacher, tmp_path / "teacher.pt", SIZE)
    loaded, payload = load_detector(teacher_path, log=lambda _: None)
    assert loaded.family == "ultralytics" and loaded.class_names == CLASSES and payload["input_size"] == SIZE
    images, _ = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(images).head[0].cls_logits, teacher.eval()(images).head[0].cls_logits, atol=1e-5)

    config = tiny_config_dict(shapes_voc, epochs=1)
    config["data"]["augment"] = {"mosaic": 0.0}
    config["model"] = {"family": "ultralytics", "config": "yolo26n.yaml"}
    config["teacher"] = {"checkpoint": str(teacher_path)}
    config["distill"] = {"terms": [{"loss": "kl", "args": {"mode": "sigmoid"}}, {"loss": "pkd", "student": "neck"}]}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0
    assert "teacher: ultralytics" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["distill", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["teacher"]["checkpoint"] == str(teacher_path)
    student_path = out / "ultralytics.pt"
    assert student_path.is_file() and "Ultralytics checkpoint" in capsys.readouterr().out

    data = export_yolo(read_dataset(shapes_voc), tmp_path / "yolo")
    student = YOLO(str(student_path))
    predictions = student.predict(str(tmp_path / "yolo" / "images" / "test"), imgsz=SIZE, device="cpu", verbose=False)
    assert len(predictions) == 2 and predictions[0].names == {0: "bar", 1: "square"}
    metrics = student.val(data=str(data), imgsz=SIZE, batch=2, device="cpu", plots=False, verbose=False, workers=0,
                          project=str(tmp_path / "val"))
    assert metrics.names == {0: "bar", 1: "square"}  # Ultralytics' val read the checkpoint with its classes
    # the student as kdet reads it, and kdet export --format ultralytics writes the same file
    assert main(["export", str(out / "best.pt"), "--format", "ultralytics", "--out", str(tmp_path / "again.pt")]) == 0
    assert load_detector(tmp_path / "again.pt", log=lambda _: None)[0].class_names == CLASSES


def test_kdet_trains_a_model_from_an_ultralytics_checkpoint(shapes_voc, tmp_path):
    from kdet.config import validate_config
    from kdet.engine.trainer import train

    start = save_ultralytics_checkpoint(build("yolov8n.yaml"), tmp_path / "start.pt", SIZE)
    config = tiny_config_dict(shapes_voc, epochs=1)
    config["model"] = {"family": "ultralytics", "weights": str(start)}
    logged = []
    train(validate_config(config), tmp_path / "run", log=logged.append, progress=False)
    assert any(line.startswith("model: ultralytics/start.pt, ") for line in logged)  # named by its source, not by kdet's backbone fields
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["config"]
    assert recorded["backbone"] and recorded["nc"] == 2  # the checkpoint's architecture, recorded with the run
    other = save_ultralytics_checkpoint(build("yolov8n.yaml", classes=["a", "b", "c"]), tmp_path / "other.pt", SIZE)
    config["model"]["weights"] = str(other)
    with pytest.raises(ValueError, match="does not fit the model"):
        train(validate_config(config), tmp_path / "run2", log=lambda _: None, progress=False)


def test_core_never_imports_ultralytics_and_says_how_to_install_it(monkeypatch):
    code = ("import sys, kdet.cli, kdet.models, kdet.distill.run, kdet.engine.export, kdet.report.build; "
            "assert 'ultralytics' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from PIL import Image

    assert Image.open.__module__ == "PIL.Image"  # Ultralytics' replacement of PIL's open is undone
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(ValueError, match=r"pip install 'kdet\[ultralytics\]'"):
        build()


def test_default_recipe_for_ultralytics_pairs(tmp_path):
    """Two Ultralytics models get soft labels with the teacher's assignment, plus ld where both
    heads have box distributions of the same bins; the teacher may be an Ultralytics checkpoint."""
    from kdet.distill.recipe import default_recipe

    def model(config):
        return ModelConfig(family="ultralytics", config=config)

    yolo26 = default_recipe(model("yolo26s.yaml"), model("yolo26n.yaml"))
    assert yolo26.name == "soft_labels_assign" and [t["loss"] for t in yolo26.terms] == ["soft_bce"]
    assert yolo26.settings == {"auto": {"fraction": 0.5}, "assign": "teacher"}
    yolo11 = default_recipe(model("yolo11s.yaml"), model("yolo11n.yaml"))
    assert yolo11.name == "ld_soft_labels" and [t["loss"] for t in yolo11.terms] == ["ld", "soft_bce"]
    assert default_recipe(model("yolo11s.yaml"), model("yolo26n.yaml")).name == "soft_labels_assign"  # ld needs both
    checkpoint = save_ultralytics_checkpoint(build("yolov8n.yaml"), tmp_path / "teacher.pt", SIZE)
    assert default_recipe(ModelConfig(family="ultralytics", weights=str(checkpoint)), model("yolov8n.yaml")).name == "ld_soft_labels"
    assert default_recipe(ModelConfig(family="yolo", head="dfl"), model("yolo11n.yaml")).name == "objectness_scaled"
