"""Several teachers: routing terms to teachers, averaging response outputs, specialists trained
on different classes teaching one student every class, the cache per teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdet.cli import main
from kdet.config import DistillConfig, DistillSettings, ModelConfig, TeacherConfig, TermConfig, validate_config
from kdet.distill.compare import collect_runs, comparison_rows
from kdet.distill.distiller import Distiller
from kdet.distill.losses import ResponseLevel
from kdet.distill.pairing import response_level
from kdet.distill.run import distill
from kdet.distill.teachers import TeacherLink, average_levels, pair_teachers, teacher_reference
from kdet.engine.step import Batch
from kdet.engine.trainer import train
from kdet.models import build_model
from conftest import tiny_config_dict

SIZE = 64


def quiet(_: str) -> None:
    pass


def keep_one_class(source: Path, target: Path, name: str) -> Path:
    """A copy of a VOC dataset with the objects of class ``name`` only, as ``kdet data convert
    --classes`` writes it."""
    assert main(["data", "convert", str(source), "--to", "voc", "--out", str(target), "--classes", name]) == 0
    return target


@pytest.fixture(scope="module")
def specialists(shapes_voc, tmp_path_factory) -> dict[str, Path]:
    """Two size-t teachers, one trained on the bars of shapes_voc only, one on its squares only."""
    root = tmp_path_factory.mktemp("specialists")
    out = {}
    for name in ("bar", "square"):
        data = keep_one_class(shapes_voc, root / f"{name}_data", name)
        config = tiny_config_dict(data, epochs=1)
        config["model"]["size"] = "t"
        config["data"].update(val_split="train", test_split="train")  # the two val images may hold no object of the class
        train(validate_config(config), root / name, log=quiet, progress=False)
        out[name] = root / name / "best.pt"
    return out


def two_teachers(data: Path, teachers: dict[str, Path], terms: list[dict], **distill) -> dict:
    config = tiny_config_dict(data, epochs=1)
    config["teacher"] = [{"name": f"{name}s", "checkpoint": str(path)} for name, path in teachers.items()]
    config["distill"] = {"terms": terms, **distill}
    return config


def build(size: str, classes: list[str], seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(family="yolo", backbone="cspdarknet", size=size, anchors="default"), classes, SIZE)


def spec(model):
    return model.describe((SIZE, SIZE))


def test_teacher_reference_reads_a_name_and_a_feature():
    names = ["bars", "squares"]
    assert teacher_reference(None, names) == (None, None)
    assert teacher_reference("bars", names) == ("bars", None)
    assert teacher_reference("squares.neck.p4", names) == ("squares", "neck.p4")
    assert teacher_reference("neck.p4", names) == (None, "neck.p4")


def level(cls_probs: list[float], quality: float, box: list[float]) -> ResponseLevel:
    """A one-location, one-anchor level with these class probabilities, quality and box."""
    logits = torch.logit(torch.tensor(cls_probs)).view(1, 1, -1, 1, 1)
    return ResponseLevel(logits, torch.tensor(box).view(1, 1, 4, 1, 1), None, torch.tensor(quality).view(1, 1, 1, 1, 1), "ltrb")


def test_average_of_identical_teachers_is_the_teacher():
    one = level([0.2, 0.7], 0.6, [1.0, 2.0, 3.0, 4.0])
    mean = average_levels([one, one], [[0, 1], [0, 1]], [1.0, 3.0], 2)
    assert torch.allclose(mean.cls_logits, one.cls_logits, atol=1e-5)
    assert torch.allclose(mean.quality, one.quality) and torch.allclose(mean.box, one.box)
    assert mean.score is None and mean.box_space == "ltrb"


def test_average_of_specialists_takes_each_class_from_the_teacher_that_knows_it():
    bars = level([0.9], 0.8, [1.0, 1.0, 1.0, 1.0])  # knows class 0 only
    squares = level([0.3], 0.2, [3.0, 3.0, 3.0, 3.0])  # knows class 1 only
    mean = average_levels([bars, squares], [[0], [1]], [1.0, 1.0], 2)
    assert mean.cls_logits.sigmoid().flatten().tolist() == pytest.approx([0.9, 0.3])
    assert mean.quality.item() == pytest.approx(0.8)  # an object either specialist sees is an object
    # boxes weighted by each teacher's quality: 0.8 * 1 + 0.2 * 3 over 1.0
    assert mean.box.flatten().tolist() == pytest.approx([1.4] * 4, abs=1e-4)
    # two teachers of the same class: probabilities and qualities averaged with the weights
    mean = average_levels([level([0.9], 0.8, [1.0] * 4), level([0.3], 0.2, [1.0] * 4)], [[0], [0]], [1.0, 3.0], 1)
    assert mean.cls_logits.sigmoid().item() == pytest.approx(0.45)
    assert mean.quality.item() == pytest.approx(0.35)


def test_terms_are_routed_to_the_teachers_they_read():
    student = build("p", ["bar", "square"])
    bars, squares = build("t", ["bar"], 1), build("t", ["square"], 2)
    teachers = [(TeacherConfig(name="bars", checkpoint="x"), spec(bars), None),
                (TeacherConfig(name="squares", weight=2.0, checkpoint="y"), spec(squares), None)]
    settings = DistillSettings(terms=[TermConfig(loss="kl", args={"mode": "sigmoid"}), TermConfig(loss="objectness_scaled"),
                                      TermConfig(loss="fitnet", student="neck.p3", teacher="squares.neck.p3"),
                                      TermConfig(loss="l2_logits", teacher="bars")])
    pairing = pair_teachers(teachers, spec(student), settings)
    assert pairing.ok, pairing.all_errors()
    routes = {term.index: (list(term.plans), term.averaged) for term in pairing.terms}
    assert routes == {0: (["bars", "squares"], True), 1: (["bars", "squares"], True), 2: (["squares"], False), 3: (["bars"], False)}
    assert pairing.terms[0].classes == [0, 1] and pairing.terms[0].levels == [0, 1, 2]
    assert any("bar from bars; square from squares" in note for note in pairing.notes)
    assert "averaged over the teachers (weights: bars 1, squares 2)" in pairing.terms[0].plan.notes[0]
    # each teacher's report pairs only its own terms, under their own keys
    assert [plan.index for plan in pairing.reports["squares"].terms] == [0, 1, 2]
    assert pairing.reports["squares"].terms[2].features[0].teacher == "neck.p3"

    links = [TeacherLink("bars", bars, pairing.reports["bars"]), TeacherLink("squares", squares, pairing.reports["squares"], 2.0)]
    distiller = Distiller(student, links, pairing).train()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    targets = [{"boxes": torch.tensor([[8.0, 12.0, 40.0, 24.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 8.0, 44.0, 32.0]]), "labels": torch.tensor([1])}]
    total, losses = distiller(Batch.of(images, targets))
    assert {"kd0_kl", "kd1_objectness_scaled", "kd2_fitnet", "kd3_l2_logits"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    total.backward()
    assert all(p.grad is None for teacher in (bars, squares) for p in teacher.parameters())
    assert set(distiller.connectors) == {"term2_neck_p3"}

    # the averaged term by hand: the two teachers' levels combined, each class from its teacher
    distiller.eval()
    out, t_bars, t_squares = student(images), bars(images), squares(images)
    by_hand = []
    for s in range(3):
        t = average_levels([response_level(t_bars.head[s], "decoded", [0]), response_level(t_squares.head[s], "decoded", [0])],
                           [[0], [1]], [1.0, 2.0], 2)
        by_hand.append(t)
    from kdet.distill.losses import objectness_scaled

    expected = objectness_scaled([response_level(out.head[s], "decoded", None) for s in range(3)], by_hand)
    _, losses = distiller(Batch.of(images, targets))
    assert losses["kd1_objectness_scaled"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_what_several_teachers_cannot_do_is_refused_before_training():
    student = build("p", ["bar", "square"])
    teachers = [(TeacherConfig(name="bars", checkpoint="x"), spec(build("t", ["bar"])), None),
                (TeacherConfig(name="squares", checkpoint="y"), spec(build("t", ["square"])), None),
                (TeacherConfig(name="idle", checkpoint="z"), spec(build("t", ["bar"])), None)]
    settings = DistillSettings(terms=[TermConfig(loss="fitnet", student="neck.p3"), TermConfig(loss="l2_logits"),
                                      TermConfig(loss="kl", teacher="bars"), TermConfig(loss="pkd", student="neck", teacher="squares")],
                               assign="teacher")
    errors = pair_teachers(teachers, spec(student), settings).all_errors()
    assert any("distill.terms.0 (fitnet): a feature term reads one teacher's maps" in e and "NAME.FEATURE" in e for e in errors)
    assert any("distill.terms.1 (l2_logits): l2_logits compares raw head maps, which cannot be averaged" in e for e in errors)
    assert any("teacher(s) idle are read by no term" in e for e in errors)
    assert any("distill.assign: teacher reads one teacher" in e for e in errors)


def test_two_specialists_teach_one_student_every_class(shapes_voc, specialists, tmp_path, capsys):
    """Two teachers trained on different classes of shapes_voc (bars only, squares only) distil
    one student that learns both: averaged response terms and a feature term of one teacher,
    both teachers scored, the cache storing each teacher under its own fingerprint."""
    terms = [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}},
             {"loss": "kl", "weight": 1.0, "args": {"mode": "sigmoid"}},
             {"loss": "fitnet", "student": "neck.p3", "teacher": "squares", "weight": 0.5}]
    data = two_teachers(shapes_voc, specialists, terms, cache={"dir": str(tmp_path / "cache")})
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["check", str(path)]) == 0
    text = capsys.readouterr().out
    assert "teacher bars" in text and "distill.terms.0 (objectness_scaled) reads every teacher, averaged" in text
    assert "distill.terms.2 (fitnet) reads teacher squares" in text and "pairing: OK" in text

    out = tmp_path / "run"
    results = distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    assert [t["name"] for t in results["teachers"]] == ["bars", "squares"]
    assert results["teachers"][0]["checkpoint"] == str(specialists["bar"])
    assert list(results["teachers"][0]["metrics"]["coco"]["per_class"]) == ["bar", "square"]  # scored on the student's split
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_kd0_objectness_scaled", "loss_kd1_kl", "loss_kd2_fitnet"} <= set(record)
    pairing = json.loads((out / "pairing.json").read_text())
    assert pairing["ok"] and set(pairing["teachers"]) == {"bars", "squares"}
    assert pairing["teachers"]["squares"]["weight"] == 1.0
    cache = results["teacher_cache"]["teachers"]
    assert cache["bars"]["fingerprint"] != cache["squares"]["fingerprint"]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    # a second run reads both caches without running a teacher
    again = distill(validate_config(data, schema=DistillConfig), tmp_path / "again", log=quiet, progress=False)
    assert all(stats["built_entries"] == 0 for stats in again["teacher_cache"]["teachers"].values())

    # kdet compare: a row per teacher, the distilled row names both
    base = tiny_config_dict(shapes_voc, epochs=1)
    train(validate_config(base), tmp_path / "base", log=quiet, progress=False)
    rows = comparison_rows(collect_runs([tmp_path / "base", out]))
    assert [r["role"] for r in rows] == ["teacher", "teacher", "baseline", "distilled"]
    assert rows[-1]["teacher"] == f"{specialists['bar']}, {specialists['square']}" and "delta_AP_paired" in rows[-1]


def test_a_single_teacher_config_is_unchanged(shapes_voc, teacher_checkpoint, tmp_path):
    """The single-teacher form still loads, runs and records ``teacher`` as before; a term may name it."""
    config = tiny_config_dict(shapes_voc, epochs=1)
    config["teacher"] = {"checkpoint": str(teacher_checkpoint), "name": "big"}
    config["distill"] = {"terms": [{"loss": "fitnet", "student": "neck.p3", "teacher": "big.neck.p3"}]}
    results = distill(validate_config(config, schema=DistillConfig), tmp_path / "run", log=quiet, progress=False)
    assert results["teacher"]["checkpoint"] == str(teacher_checkpoint) and "teachers" not in results
    pairing = json.loads((tmp_path / "run" / "pairing.json").read_text())
    assert pairing["terms"][0]["features"][0]["teacher"] == "neck.p3"
