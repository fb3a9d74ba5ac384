"""kdet chain: teacher-assistant chains and born-again generations, resumable, one table at the end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdet.cli import main
from kdet.config import ChainConfig, ConfigError, validate_config
from kdet.distill.chain import chain_runs, run_chain
from conftest import tiny_config_dict


def chain_dict(data: Path, teacher: Path, stages: list[dict], *, size: str = "p") -> dict:
    config = tiny_config_dict(data, epochs=1)
    config["model"]["size"] = size
    config["teacher"] = {"checkpoint": str(teacher)}
    config["distill"] = {"terms": [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}]}
    config["chain"] = stages
    return config


def test_chain_runs_pass_each_stage_student_to_the_next(shapes_voc, teacher_checkpoint, tmp_path):
    config = validate_config(chain_dict(shapes_voc, teacher_checkpoint, [{"name": "mid", "model": {"size": "t"}}, {}]),
                             schema=ChainConfig)
    runs = chain_runs(config, tmp_path)
    assert [(r.name, r.role) for r in runs] == [("baseline", "baseline"), ("direct", "direct"), ("1-mid", "assistant"),
                                               ("2-assistant2", "assistant"), ("chained", "chained")]
    teachers = [r.config.teacher.checkpoint for r in runs[1:]]
    assert teachers == [str(teacher_checkpoint), str(teacher_checkpoint), str(tmp_path / "1-mid" / "best.pt"),
                        str(tmp_path / "2-assistant2" / "best.pt")]
    assert [r.config.model.size for r in runs] == ["p", "p", "t", "p", "p"]
    assert all(r.config.seed == 0 and r.config.train == runs[0].config.train for r in runs)

    # born-again: stages of the student's own model after a teacher of that model; the first generation is the direct run
    born = validate_config(chain_dict(shapes_voc, teacher_checkpoint, [{}, {}], size="t"), schema=ChainConfig)
    runs = chain_runs(born, tmp_path)
    assert [(r.name, r.role) for r in runs] == [("baseline", "baseline"), ("1-assistant1", "direct"),
                                               ("2-assistant2", "assistant"), ("chained", "chained")]


def test_stage_keys_are_checked_when_the_config_loads(shapes_voc, teacher_checkpoint):
    with pytest.raises(ConfigError, match="chain.0.model: Value error, backbon: Extra inputs"):
        validate_config(chain_dict(shapes_voc, teacher_checkpoint, [{"model": {"backbon": "resnet18"}}]), schema=ChainConfig)
    with pytest.raises(ConfigError, match="chain"):
        validate_config(chain_dict(shapes_voc, teacher_checkpoint, []), schema=ChainConfig)


def test_a_stage_that_cannot_pair_is_refused_before_training(shapes_voc, teacher_checkpoint, tmp_path, capsys):
    data = chain_dict(shapes_voc, teacher_checkpoint, [{"name": "dfl", "model": {"size": "t", "head": "dfl"}}])
    data["distill"]["terms"] = [{"loss": "l2_logits"}]
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["chain", str(path), "--out", str(tmp_path / "out"), "--check"]) == 2
    captured = capsys.readouterr()
    assert "== 1-dfl (assistant)" in captured.out and "l2_logits compares raw head maps" in captured.out
    assert "run(s) 1-dfl, chained cannot be paired" in captured.err
    assert main(["chain", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_chain_trains_resumes_and_ends_with_one_table(shapes_voc, teacher_checkpoint, tmp_path, monkeypatch, capsys):
    config = validate_config(chain_dict(shapes_voc, teacher_checkpoint, [{"name": "mid", "model": {"size": "t"}}]), schema=ChainConfig)
    out = tmp_path / "chain"

    import kdet.engine.trainer as trainer

    real_finish = trainer.finish_run
    calls = {"n": 0}

    def stop_in_the_last_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # baseline, direct and the assistant finished; the chained run stops after its checkpoint
            raise KeyboardInterrupt
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(trainer, "finish_run", stop_in_the_last_run)
    with pytest.raises(KeyboardInterrupt):
        run_chain(config, out, log=lambda _: None, progress=False)
    assert (out / "1-mid" / "results.json").is_file() and (out / "chained" / "last.pt").is_file()
    assert not (out / "chained" / "results.json").exists()
    monkeypatch.setattr(trainer, "finish_run", real_finish)
    lines: list[str] = []
    rows = run_chain(config, out, log=lines.append, progress=False)
    assert "== baseline (baseline): finished, skipped" in lines and "== 1-mid (assistant): finished, skipped" in lines
    assert f"== chained (chained): resuming in {out / 'chained'}" in lines
    assert [r["role"] for r in rows] == ["teacher", "assistant", "baseline", "direct", "chained"]
    teacher, assistant, baseline, direct, chained = rows
    assert teacher["name"] == str(teacher_checkpoint) and assistant["name"] == "yolo cspdarknet-t"
    assert chained["teacher"] == str(out / "1-mid" / "best.pt") and "delta_AP_paired" in chained and "delta_AP_paired" in direct
    if teacher["AP"]["mean"] > baseline["AP"]["mean"]:
        expected = (chained["AP"]["mean"] - baseline["AP"]["mean"]) / (teacher["AP"]["mean"] - baseline["AP"]["mean"])
        assert chained["gap_closed"] == pytest.approx(expected)  # against the chain's teacher, not the assistant
    assert (out / "compare.md").read_text().count("\n") == 7
    assert [entry["run"] for entry in json.loads((out / "chain.json").read_text())] == ["baseline", "direct", "1-mid", "chained"]

    # the command: everything is finished, so it only prints the table
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain_dict(shapes_voc, teacher_checkpoint, [{"name": "mid", "model": {"size": "t"}}])))
    capsys.readouterr()
    assert main(["chain", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== chained (chained): finished, skipped" in printed and "assistant" in printed and "chained" in printed
