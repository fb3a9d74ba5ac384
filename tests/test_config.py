from pathlib import Path

import pytest
import yaml

from kdet.config import ChainConfig, ConfigError, DistillConfig, load_config, load_student_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_valid_config_with_overrides(tmp_path):
    path = write(tmp_path, "data:\n  path: somewhere\nmodel:\n  size: n\n")
    config = load_config(path, ["train.epochs=3", "model.backbone=mobilenet_v2", "data.augment.scale=[1, 1]"])
    assert config.train.epochs == 3
    assert config.model.backbone == "mobilenet_v2"
    assert config.model.size == "n"
    assert config.data.augment.scale == (1.0, 1.0)


def test_misspelled_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "data:\n  path: x\nmodel:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}, line 4" in message
    assert "'model.backbon'" in message
    assert "Did you mean 'model.backbone'?" in message


def test_misspelled_override_is_attributed_to_set(tmp_path):
    path = write(tmp_path, "data:\n  path: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epoch=3"])
    assert "--set" in str(info.value)
    assert "Did you mean 'train.epochs'?" in str(info.value)


def test_bad_value_says_what_was_received(tmp_path):
    path = write(tmp_path, "data:\n  path: x\n  input_size: 300\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 3" in str(info.value)
    assert "multiple of 32" in str(info.value)
    assert "288" in str(info.value)


def test_missing_required_key_and_malformed_set(tmp_path):
    path = write(tmp_path, "model:\n  size: n\n")
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, "data:\n  path: x\n"), ["train.epochs"])


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_top_level_key_from_set_blames_set(tmp_path):
    path = write(tmp_path, "data:\n  path: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["trian.epochs=3"])
    message = str(info.value)
    assert "--set trian.epochs: unknown key 'trian'." in message and f"{path}:" not in message
    assert "Did you mean 'train'?" in message


def test_duplicate_key_is_an_error_with_both_lines(tmp_path):
    path = write(tmp_path, "data:\n  path: x\ntrain:\n  epochs: 3\n  lr: 0.01\n  epochs: 30\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}, line 6: key 'epochs' is written twice in the same mapping (first on line 4)" in str(info.value)
    # the same key in two different mappings is fine
    assert load_config(write(tmp_path, "data:\n  path: x\n  format: voc\neval:\n  batch_size: 2\ntrain:\n  batch_size: 4\n")).train.batch_size == 4


def test_train_on_invalid_yaml_or_duplicate_key_is_one_clear_line(tmp_path, capsys):
    from kdet.cli import main

    for text, expected in (("data: [unclosed\n", "not valid YAML"), ("data:\n  path: x\ndata:\n  path: y\n", "written twice")):
        path = write(tmp_path, text)
        assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"kdet train: error: {path}" in err and expected in err and "Traceback" not in err


def test_bad_value_from_set_blames_set_not_the_file_line_it_replaced(tmp_path):
    from kdet.config import DistillConfig

    path = write(tmp_path, "data:\n  path: x\ntrain:\n  epochs: 3\nteacher:\n  checkpoint: t.pt\ndistill:\n  terms:\n    - loss: kl\n      weight: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=many"])
    message = str(info.value)
    assert "--set train.epochs: train.epochs" in message and "line 4" not in message
    with pytest.raises(ConfigError) as info:
        load_config(path, ["distill.terms=[{loss: kl, weight: heavy}]"], schema=DistillConfig)
    message = str(info.value)
    assert "--set distill.terms: distill.terms.0.weight" in message and "line 9" not in message


def test_a_check_across_keys_names_the_key_and_its_line(tmp_path):
    path = write(tmp_path, "data:\n  path: x\ntrain:\n  epochs: 3\nteacher:\n  checkpoint: t.pt\ndistill:\n  start_epoch: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, schema=DistillConfig)
    assert f"{path}, line 8: distill.start_epoch: 5 is after the last epoch (train.epochs: 3)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["distill.start_epoch=2", "distill.stop_epoch=1"], schema=DistillConfig)
    assert "--set distill.stop_epoch: distill.stop_epoch: 1 is before distill.start_epoch: 2" in str(info.value)


BENCHMARK_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=[p.stem for p in BENCHMARK_CONFIGS])
def test_benchmark_configs_validate_against_the_schema_kdet_reads_them_with(path):
    """The benchmark scripts' configs stay valid as the schema changes: a chain config as kdet
    chain reads it, a distillation config (teacher, distill) as kdet distill does and its student
    alone as kdet train does, a training config as kdet train does."""
    raw = yaml.safe_load(path.read_text())
    if "chain" in raw:
        config = load_config(path, schema=ChainConfig)
    elif "teacher" in raw or "distill" in raw:
        assert isinstance(load_config(path, schema=DistillConfig), DistillConfig)
        config, dropped = load_student_config(path)
        assert dropped
    else:
        config, dropped = load_student_config(path)
        assert not dropped
    assert config.model.family in {"yolo", "fcos", "ultralytics"}
    assert config.data.path.startswith(("bundled:", "benchmarks/data/"))


def test_set_indexes_a_list_the_config_has(tmp_path):
    path = write(tmp_path, "data: {path: d}\nteacher: {checkpoint: t.pt}\ndistill:\n  terms:\n    - {loss: kl}\n    - {loss: fitnet}\n")
    config = load_config(path, ["distill.terms.1.weight=2.5"], schema=DistillConfig)
    assert [(t.loss, t.weight) for t in config.distill.terms] == [("kl", 1.0), ("fitnet", 2.5)]
    for bad in ("distill.terms.2.weight=1", "distill.terms.first.weight=1"):
        with pytest.raises(ConfigError) as info:
            load_config(path, [bad], schema=DistillConfig)
        assert f"--set {bad.split('=')[0]}: distill.terms is a list of 2 item(s); index it with 0 to 1" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["distill.terms.1.weight=heavy"], schema=DistillConfig)
    assert "--set distill.terms.1.weight: distill.terms.1.weight" in str(info.value) and "line" not in str(info.value)
