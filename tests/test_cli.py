"""The `kdet` command as a user runs it: exit codes, outputs, and error messages."""
import json

import pytest
import yaml

from kdet.cli import main

from conftest import tiny_config_dict


@pytest.fixture(scope="module")
def trained_run(shapes_voc, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(shapes_voc, epochs=1)))
    out = root / "run"
    assert main(["train", str(config), "--out", str(out), "--set", "train.epochs=1"]) == 0
    return out


def test_train_writes_run_and_eval_reports_metrics(trained_run, shapes_voc, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained_run / "best.pt"), "--data", str(shapes_voc), "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["coco"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert set(metrics["voc"]) >= {"mAP50_11pt", "mAP50_all", "per_class"}
    assert set(metrics["coco"]["per_class"]) == {"bar", "square"}


def test_predict_draws_images_and_lists_detections(trained_run, shapes_voc, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(trained_run / "best.pt"), str(shapes_voc / "JPEGImages"), "--out", str(out), "--score-thresh", "0.0"]) == 0
    listed = json.loads((out / "predictions.json").read_text())
    assert len(listed) == 12
    assert (out / "img000.jpg").is_file()
    assert all(set(d) == {"box_xyxy", "score", "label"} for item in listed for d in item["detections"])


def test_data_check_json(shapes_voc, capsys):
    assert main(["data", "check", str(shapes_voc), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12 and set(summary["classes"]) == {"bar", "square"}
    assert summary["problems"] == []


def test_profile_of_checkpoint_and_config(trained_run, capsys):
    assert main(["profile", str(trained_run / "best.pt"), "--runs", "2", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["params"] > 0 and profile["flops"] > 0 and profile["latency_ms_median"] > 0


def test_profile_of_a_recipe_name_sizes_its_model_and_a_distill_recipe_its_student(capsys):
    sizes = {}
    for name, size in [("bccd_student", "t"), ("bccd_teacher", "s"), ("bccd_distill", "t")]:
        assert main(["profile", name, "--runs", "1", "--threads", "1", "--json", "--input-size", "64"]) == 0
        sizes[name] = json.loads(capsys.readouterr().out)["params"]
    assert sizes["bccd_distill"] == sizes["bccd_student"] < sizes["bccd_teacher"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["data", "check", "/no/such/folder"], "does not exist"),
        (["eval", "/no/such.pt", "--data", "x"], "not found"),
        (["train", "no_such_recipe"], "no config file 'no_such_recipe'"),
    ],
)
def test_errors_are_one_clear_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_misspelled_config_key_exit_code_and_message(shapes_voc, tmp_path, capsys):
    config = tiny_config_dict(shapes_voc)
    config["train"]["epochz"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "Did you mean 'train.epochs'?" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", str(bad), "--data", "x"]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err
