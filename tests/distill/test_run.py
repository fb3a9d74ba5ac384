"""Distillation runs end to end on tiny data: kdet check, kdet distill (and its resume), kdet compare."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdet.cli import main
from kdet.config import ConfigError, DistillConfig, load_config, validate_config
from kdet.demo import demo_configs
from kdet.distill.compare import collect_runs, comparison_rows, markdown_table
from kdet.distill.recipe import with_default_recipe
from kdet.distill.run import distill
from kdet.engine.trainer import train
from conftest import interrupt_then_resume, tiny_config_dict


def quiet(_: str) -> None:
    pass


def distill_dict(data: Path, teacher: Path, *, epochs: int = 1, terms: list | None = None) -> dict:
    config = tiny_config_dict(data, epochs=epochs)
    config["teacher"] = {"checkpoint": str(teacher)}
    config["distill"] = {"terms": terms or [
        {"loss": "objectness_scaled", "weight": 1.0},
        {"loss": "fitnet", "student": "neck.p3", "weight": 0.5},
    ]}
    return config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_one_epoch_distillation_end_to_end(shapes_voc, teacher_checkpoint, tmp_path, capsys):
    config = write_yaml(tmp_path / "kd.yaml", distill_dict(shapes_voc, teacher_checkpoint))
    out = tmp_path / "run"
    assert main(["distill", str(config), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1
    assert results["teacher"]["checkpoint"] == str(teacher_checkpoint)
    assert results["teacher"]["profile"]["params"] > results["profile"]["params"]  # t teacher, p student
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_det_box", "loss_det_obj", "loss_det_cls", "loss_kd0_objectness_scaled", "loss_kd1_fitnet"} <= set(record)
    pairing = json.loads((out / "pairing.json").read_text())
    assert pairing["ok"] and [t["loss"] for t in pairing["terms"]] == ["objectness_scaled", "fitnet"]
    # best.pt is the student alone, loadable by every other command
    capsys.readouterr()
    assert main(["eval", str(out / "best.pt"), "--data", str(shapes_voc), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coco"]["AP"] == pytest.approx(results["metrics"]["coco"]["AP"])


def test_distillation_resumes_to_identical_weights(shapes_voc, teacher_checkpoint, tmp_path, monkeypatch):
    config = validate_config(distill_dict(shapes_voc, teacher_checkpoint, epochs=2), schema=DistillConfig)
    straight = tmp_path / "straight"
    distill(config, straight, log=quiet, progress=False)

    resumed = tmp_path / "resumed"
    interrupt_then_resume(distill, config, resumed, monkeypatch)

    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["objective"].keys() == b["objective"].keys() and a["objective"]
    for key, value in a["objective"].items():
        assert torch.equal(value, b["objective"][key]), key
    assert not any(key.startswith("teacher") for key in a["objective"])  # the teacher is never saved with the run


def test_changed_distillation_config_is_refused_on_resume(shapes_voc, teacher_checkpoint, tmp_path):
    data = distill_dict(shapes_voc, teacher_checkpoint)
    out = tmp_path / "run"
    distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    data["distill"]["terms"][0]["weight"] = 2.0
    with pytest.raises(ConfigError, match="distill.terms"):
        distill(validate_config(data, schema=DistillConfig), out, resume=True, log=quiet, progress=False)


def test_check_command_reports_ok_and_refuses_mismatch(shapes_voc, teacher_checkpoint, tmp_path, capsys):
    good = write_yaml(tmp_path / "good.yaml", distill_dict(shapes_voc, teacher_checkpoint))
    assert main(["check", str(good)]) == 0
    text = capsys.readouterr().out
    assert "pairing: OK" in text and "converter" in text

    bad = write_yaml(tmp_path / "bad.yaml", distill_dict(shapes_voc, teacher_checkpoint, terms=[
        {"loss": "fitnet", "student": "neck.p3", "teacher": "neck.p4"}]))
    assert main(["check", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and "resample: true" in report["errors"][0]
    # kdet distill refuses it before training, with the same explanation
    assert main(["distill", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "resample: true" in capsys.readouterr().err
    assert not (tmp_path / "never" / "last.pt").exists()


def test_distillation_config_errors_name_file_line_and_key(shapes_voc, teacher_checkpoint, tmp_path):
    data = distill_dict(shapes_voc, teacher_checkpoint)
    data["distill"]["terms"][1]["wieght"] = 0.5
    path = write_yaml(tmp_path / "typo.yaml", data)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "wieght" in text)
    with pytest.raises(ConfigError, match=rf"typo.yaml, line {line}: unknown key 'distill.terms.1.wieght'. Did you mean 'distill.terms.1.weight'"):
        load_config(path, schema=DistillConfig)
    with pytest.raises(ConfigError, match="teacher"):
        validate_config(tiny_config_dict(shapes_voc), schema=DistillConfig)  # no teacher at all


def test_switches_turn_feature_terms_off(shapes_voc, teacher_checkpoint, tmp_path):
    data = distill_dict(shapes_voc, teacher_checkpoint)
    data["distill"]["features"] = False
    out = tmp_path / "run"
    distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss_kd0_objectness_scaled" in record and "loss_kd1_fitnet" not in record


def test_compare_pairs_distilled_runs_with_their_baseline(shapes_voc, teacher_checkpoint, tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        base = tiny_config_dict(shapes_voc, epochs=1)
        base["seed"] = seed
        train(validate_config(base), tmp_path / f"base{seed}", log=quiet, progress=False)
        kd = distill_dict(shapes_voc, teacher_checkpoint, terms=[{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}])
        kd["seed"] = seed
        distill(validate_config(kd, schema=DistillConfig), tmp_path / f"kd{seed}", log=quiet, progress=False)
        runs += [tmp_path / f"base{seed}", tmp_path / f"kd{seed}"]
    # A run written before a config key existed still groups with newer runs: defaults are filled in.
    saved = yaml.safe_load((tmp_path / "kd1" / "config.yaml").read_text())
    del saved["distill"]["schedule"]
    (tmp_path / "kd1" / "config.yaml").write_text(yaml.safe_dump(saved))
    rows = comparison_rows(collect_runs(runs))
    assert [r["role"] for r in rows] == ["teacher", "baseline", "distilled"]
    teacher, baseline, distilled = rows
    assert baseline["seeds"] == distilled["seeds"] == [0, 1]
    assert distilled["paired_seeds"] == [0, 1]
    base_aps = [json.loads((tmp_path / f"base{s}" / "results.json").read_text())["metrics"]["coco"]["AP"] for s in (0, 1)]
    kd_aps = [json.loads((tmp_path / f"kd{s}" / "results.json").read_text())["metrics"]["coco"]["AP"] for s in (0, 1)]
    assert distilled["delta_AP_paired"]["mean"] == pytest.approx(sum(k - b for k, b in zip(kd_aps, base_aps)) / 2)
    assert baseline["AP"]["mean"] == pytest.approx(sum(base_aps) / 2)
    if teacher["AP"]["mean"] > baseline["AP"]["mean"]:
        expected = (sum(kd_aps) / 2 - sum(base_aps) / 2) / (teacher["AP"]["mean"] - sum(base_aps) / 2)
        assert distilled["gap_closed"] == pytest.approx(expected)
    assert distilled["epoch_time_ratio"] > 0
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "objectness_scaled [box_weight=0.05] x1" in table
    assert main(["compare", *map(str, runs)]) == 0
    printed = capsys.readouterr().out
    assert "distilled" in printed and "[box_weight=0.05]" in printed  # not swallowed as console markup


def test_compare_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="results.json"):
        collect_runs([tmp_path / "run"])


def test_demo_pairs_baseline_and_distilled_student():
    baseline, distilled = demo_configs(epochs=3)
    assert isinstance(distilled, DistillConfig) and not isinstance(baseline, DistillConfig)
    for key in ("seed", "data", "model", "train", "eval"):
        assert getattr(baseline, key) == getattr(distilled, key), key
    assert baseline.train.epochs == 3 and distilled.teacher.checkpoint == "bundled:bccd_teacher_dfl"
    assert not distilled.distill.terms  # kdet distill fills in the default recipe
    from kdet.distill.recipe import default_recipe, teacher_model_config

    assert default_recipe(teacher_model_config(distilled.teacher), distilled.model).name == "ld_soft_labels"


def test_train_on_a_distillation_config_trains_the_baseline(shapes_voc, teacher_checkpoint, tmp_path):
    config = write_yaml(tmp_path / "kd.yaml", distill_dict(shapes_voc, teacher_checkpoint))
    assert main(["train", str(config), "--out", str(tmp_path / "base")]) == 0
    saved = yaml.safe_load((tmp_path / "base" / "config.yaml").read_text())
    assert "teacher" not in saved and "distill" not in saved
    assert saved["model"]["size"] == "p"


def test_teacher_from_a_model_config_and_a_state_dict(tmp_path):
    from kdet.config import ModelConfig, TeacherConfig
    from kdet.distill.distiller import load_teacher
    from kdet.models import build_model

    config = ModelConfig(family="fcos", backbone="resnet18", fpn_channels=64)
    torch.manual_seed(1)
    original = build_model(config, ["a", "b"], 64).eval()
    torch.save(original.state_dict(), tmp_path / "fcos.pt")
    teacher, trained_size = load_teacher(TeacherConfig(model=config, weights=str(tmp_path / "fcos.pt"), input_size=96), ["a", "b"], 64)
    assert trained_size == 96 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher(images).head[0].cls_logits, original(images).head[0].cls_logits)
    with pytest.raises(ConfigError, match="teacher.weights"):
        load_teacher(TeacherConfig(model=config), ["a", "b"], 64)
    with pytest.raises(ConfigError, match="not both"):
        load_teacher(TeacherConfig(model=config, checkpoint="x.pt"), ["a", "b"], 64)
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "missing.pt")), ["a", "b"], 64)


@pytest.mark.parametrize("schedule, middle", [("constant", 1.0), ("linear", 0.6), ("cosine", 0.6)])
def test_term_weight_schedules(schedule, middle):
    from kdet.distill.distiller import Distiller

    distiller = Distiller.__new__(Distiller)  # the schedule needs no teacher
    distiller.schedule, distiller.final_ratio = schedule, 0.2
    values = []
    for progress in (0.0, 0.5, 1.0):
        distiller.progress = progress
        values.append(distiller.weight_factor())
    assert values[0] == pytest.approx(1.0)
    assert values[1] == pytest.approx(middle)  # halfway: 0.2 + 0.8 * 0.5 for both decays
    assert values[2] == pytest.approx(1.0 if schedule == "constant" else 0.2)


def test_decaying_schedule_is_applied_during_training(shapes_voc, teacher_checkpoint, tmp_path):
    data = distill_dict(shapes_voc, teacher_checkpoint, epochs=3)
    data["distill"]["schedule"] = "linear"
    out = tmp_path / "run"
    distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    factors = [json.loads(line)["loss_kd_weight_factor"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert factors[0] > factors[1] > factors[2] > 0
    assert factors[0] <= 1.0


def test_zero_weight_distillation_reproduces_the_baseline_exactly(shapes_voc, teacher_checkpoint, tmp_path):
    """Baseline and distilled runs are paired: same initial weights, batches and augmentation
    draws; with every term weighted 0 the student is bit-identical to the baseline."""
    base = tiny_config_dict(shapes_voc, epochs=2)
    train(validate_config(base), tmp_path / "base", log=quiet, progress=False)
    kd = distill_dict(shapes_voc, teacher_checkpoint, epochs=2, terms=[{"loss": "objectness_scaled", "weight": 0.0}])
    distill(validate_config(kd, schema=DistillConfig), tmp_path / "kd", log=quiet, progress=False)
    a = torch.load(tmp_path / "base" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "kd" / "last.pt", weights_only=False)["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def term_for(name: str) -> dict:
    """A term of every registered loss: response losses on the head, feature losses on every neck level."""
    from kdet.distill.losses import DISTILL_LOSSES

    entry = DISTILL_LOSSES.get(name)
    return {"loss": name, "weight": 1.0} if entry.kind == "response" else {"loss": name, "student": "neck", "weight": "auto"}


@pytest.mark.parametrize("name", __import__("kdet.distill.losses", fromlist=["DISTILL_LOSSES"]).DISTILL_LOSSES.names())
def test_every_loss_distils_one_epoch_end_to_end(name, shapes_voc, teacher_checkpoint, dfl_teacher_checkpoint, tmp_path):
    """Each registered loss through kdet distill: the term is logged, finite, and its trainable
    parts (connectors, loss modules, auto weight) are saved with the run. Losses on box
    distributions distil a DFL teacher into a DFL student, the others an anchor-head pair."""
    import math

    from kdet.distill.losses import DISTILL_LOSSES

    dfl = DISTILL_LOSSES.get(name).needs_box_dist
    data = distill_dict(shapes_voc, dfl_teacher_checkpoint if dfl else teacher_checkpoint, terms=[term_for(name)])
    if dfl:
        data["model"]["head"] = "dfl"
    data["distill"]["auto"] = {"steps": 1}
    out = tmp_path / "run"
    distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record[f"loss_kd0_{name}"])
    saved = torch.load(out / "last.pt", weights_only=False)["objective"]
    if term_for(name)["weight"] == "auto":
        assert saved["auto_weight.0"][0] > 0


def test_student_assigns_from_the_teacher(shapes_voc, dfl_teacher_checkpoint, teacher_checkpoint, tmp_path, capsys):
    """distill.assign: teacher (PP-YOLOE+'s recipe with soft_bce): a DFL student takes its positives
    from the teacher's predictions; an anchor-head student or teacher is refused before training."""
    data = distill_dict(shapes_voc, dfl_teacher_checkpoint, terms=[{"loss": "soft_bce", "weight": 1.0}])
    data["model"]["head"] = "dfl"
    data["distill"]["assign"] = "teacher"
    out = tmp_path / "run"
    distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    pairing = json.loads((out / "pairing.json").read_text())
    assert any("come from the teacher's scores" in note for note in pairing["notes"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_det_cls", "loss_det_box", "loss_det_dfl", "loss_kd0_soft_bce"} <= set(record)

    # the assignment really is the teacher's: the student's loss equals its loss with assign_from
    from kdet.distill.distiller import Distiller, check_pairing, load_teacher
    from kdet.engine.checkpoint import load_detector
    from kdet.engine.step import Batch

    config = validate_config(data, schema=DistillConfig)
    student, _ = load_detector(out / "best.pt")
    teacher = load_teacher(config.teacher, student.class_names, 64)
    _, report = check_pairing(config, student, student.class_names, teacher=teacher)
    step = Distiller(student, teacher[0], report, hard_weight=1.0, assign="teacher").eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    _, losses = step(Batch.of(images, targets))
    expected = student(images, targets, assign_from=teacher[0](images).head).losses
    assert torch.allclose(losses["det_cls"], expected["cls"]) and torch.allclose(losses["det_box"], expected["box"])

    anchor = distill_dict(shapes_voc, teacher_checkpoint, terms=[{"loss": "soft_bce"}])
    anchor["distill"]["assign"] = "teacher"
    path = write_yaml(tmp_path / "anchor.yaml", anchor)
    capsys.readouterr()
    assert main(["check", str(path)]) == 1
    assert "distill.assign: teacher needs a student whose task-aligned assignment reads predictions" in capsys.readouterr().out


def test_a_config_without_terms_gets_the_default_recipe(shapes_voc, teacher_checkpoint, dfl_teacher_checkpoint, tmp_path, capsys):
    data = distill_dict(shapes_voc, teacher_checkpoint)
    data["distill"] = {}
    path = write_yaml(tmp_path / "kd.yaml", data)
    assert main(["check", str(path)]) == 0
    text = capsys.readouterr().out
    assert "default recipe objectness_scaled" in text and "pairing: OK" in text
    out = tmp_path / "run"
    distill(validate_config(data, schema=DistillConfig), out, log=quiet, progress=False)
    recorded = yaml.safe_load((out / "config.yaml").read_text())["distill"]
    assert recorded["terms"] == [{**recorded["terms"][0], "loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss_kd0_objectness_scaled" in record
    # resuming the run re-derives the same terms, so the configs agree
    distill(validate_config({**data, "train": {**data["train"], "epochs": 2}}, schema=DistillConfig), out, resume=True,
            log=quiet, progress=False)

    # a DFL teacher with an anchor student compares scores and decoded boxes the same way
    mixed = distill_dict(shapes_voc, dfl_teacher_checkpoint)
    mixed["distill"] = {}
    assert main(["check", str(write_yaml(tmp_path / "mixed.yaml", mixed))]) == 0
    assert "default recipe objectness_scaled" in capsys.readouterr().out

    # DFL heads on both sides get LD and soft labels, with the teacher's assignment
    dfl = distill_dict(shapes_voc, dfl_teacher_checkpoint)
    dfl["distill"] = {}
    dfl["model"]["head"] = "dfl"
    assert main(["check", str(write_yaml(tmp_path / "dfl.yaml", dfl))]) == 0
    text = capsys.readouterr().out
    assert "default recipe ld_soft_labels" in text and "distill.assign: teacher" in text and "pairing: OK" in text
    out = tmp_path / "dfl_run"
    distill(validate_config(dfl, schema=DistillConfig), out, log=quiet, progress=False)
    recorded = yaml.safe_load((out / "config.yaml").read_text())["distill"]
    assert [t["loss"] for t in recorded["terms"]] == ["ld", "soft_bce"] and {t["weight"] for t in recorded["terms"]} == {"auto"}
    assert recorded["assign"] == "teacher" and recorded["auto"]["fraction"] == 0.5
    assert set(json.loads((out / "auto_weights.json").read_text())) >= {"distill.terms.0", "distill.terms.1"}

    # a setting the config gives itself is kept
    own = {**dfl, "distill": {"assign": "own"}}
    config, recipe = with_default_recipe(validate_config(own, schema=DistillConfig), log=quiet)
    assert recipe.name == "ld_soft_labels" and config.distill.assign == "own" and config.distill.auto.fraction == 0.5


def test_a_two_stage_pair_gets_pkd():
    from kdet.config import ModelConfig
    from kdet.distill.recipe import default_recipe

    recipe = default_recipe(ModelConfig(family="faster_rcnn", backbone="resnet18"), ModelConfig(family="yolo"))
    assert recipe.name == "pkd" and recipe.terms[0]["weight"] == "auto" and recipe.settings == {"auto": {"fraction": 1.0}}
