"""Training in several processes (what torchrun starts), on the CPU with the gloo backend: the
batch sharding, a two-process run against a one-process run with the same global batch, resuming
with another number of processes, and distillation with the teacher cache built by rank 0."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdet.config import ConfigError, DistillConfig, validate_config
from kdet.engine.distributed import RankShare
from kdet.engine.setup import check_world
from kdet.engine.trainer import train

from conftest import tiny_config_dict

quiet = lambda message: None  # noqa: E731

LOSS_TOLERANCE = 0.05
"""Relative difference allowed between the epoch-1 loss of two processes with 2 images each and
of one process with the 4 images (1.7% measured): with two processes each BatchNorm layer
normalises over its process's 2 images, and the box and class losses average over each
process's own positives before the processes' gradients are averaged."""


def test_each_process_takes_its_slice_of_every_batch():
    batches = [[5, 1, 7, 3], [0, 2, 6, 4]]
    shares = [list(RankShare(batches, rank, 2)) for rank in range(2)]
    assert shares == [[[5, 1], [0, 2]], [[7, 3], [6, 4]]]
    assert list(RankShare(batches)) == batches and len(RankShare(batches, 1, 2)) == 2
    # a lone batch smaller than the batch size (a tiny training set) is split as evenly as it goes
    assert [list(RankShare([[9, 8, 7]], rank, 2)) for rank in range(2)] == [[[9]], [[8, 7]]]


def test_settings_several_processes_cannot_train_are_refused(shapes_voc):
    config = validate_config(tiny_config_dict(shapes_voc, batch_size=6))
    cpu = torch.device("cpu")
    check_world(config, 2, cpu, 8)
    with pytest.raises(ConfigError, match="batch_size 6 .* 4 processes.*multiple of 4"):
        check_world(config, 4, cpu, 8)
    with pytest.raises(ConfigError, match="2 image"):
        check_world(config, 3, cpu, 2)
    with pytest.raises(ConfigError, match="sync_bn.*CUDA"):
        check_world(validate_config(tiny_config_dict(shapes_voc, sync_bn=True)), 2, cpu, 8)
    check_world(validate_config(tiny_config_dict(shapes_voc, sync_bn=True)), 1, cpu, 8)  # nothing to synchronise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[dict]) -> None:
    """One of the processes torchrun would start: join the group, run ``jobs`` in order."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for job in jobs:
            if job["kind"] == "distill":
                from kdet.distill import cache
                from kdet.distill.distiller import Distiller
                from kdet.distill.run import distill

                real_build = cache.TeacherCache.build

                def build(self, *args, **kwargs):  # record what each process built
                    built = real_build(self, *args, **kwargs)
                    Path(job["out"], f"built-by-rank{rank}.json").write_text(json.dumps(built))
                    return built

                cache.TeacherCache.build = build
                real_weight, weights = Distiller.term_weight, []

                def term_weight(self, plan, value, detection_loss):  # record the weight each process trains with
                    weights.append(real_weight(self, plan, value, detection_loss))
                    return weights[-1]

                Distiller.term_weight = term_weight
                distill(DistillConfig.model_validate(job["config"]), job["out"], log=quiet, progress=False)
                cache.TeacherCache.build, Distiller.term_weight = real_build, real_weight
                Path(job["out"], f"weights-rank{rank}.json").write_text(json.dumps(weights))
            else:
                train(validate_config(job["config"]), job["out"], resume=job.get("resume", False), log=quiet, progress=False)
    finally:
        dist.destroy_process_group()


def run_processes(world: int, jobs: list[dict]) -> None:
    # forked rather than spawned: a fresh interpreter spends seconds importing torch and kdet
    # (DataLoader workers are forked from a process that has run torch the same way)
    mp.start_processes(_worker, args=(world, _free_port(), jobs), nprocs=world, join=True, start_method="fork")


def epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(shapes_voc, teacher_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """One process: ``one`` (1 epoch). Two processes (one spawn for all): ``two`` (1 epoch),
    ``one_then_two`` (a copy of ``one`` resumed to 2 epochs), ``distilled`` (1 epoch with the
    teacher cache). Then one process resumes ``two`` to 2 epochs (``two_then_one``)."""
    root = tmp_path_factory.mktemp("ddp")
    config = tiny_config_dict(shapes_voc, epochs=1)
    longer = tiny_config_dict(shapes_voc, epochs=2)
    train(validate_config(config), root / "one", log=quiet, progress=False)
    shutil.copytree(root / "one", root / "one_then_two")
    distill_config = {**config, "teacher": {"checkpoint": str(teacher_checkpoint)},
                      "distill": {"terms": [{"loss": "l2_logits", "weight": "auto"}], "cache": {"dir": str(root / "teacher_cache")}}}
    run_processes(2, [
        {"kind": "train", "config": config, "out": str(root / "two")},
        {"kind": "train", "config": longer, "out": str(root / "one_then_two"), "resume": True},
        {"kind": "distill", "config": distill_config, "out": str(root / "distilled")},
    ])
    shutil.copytree(root / "two", root / "two_then_one")
    train(validate_config(longer), root / "two_then_one", resume=True, log=quiet, progress=False)
    return {name: root / name for name in ("one", "two", "one_then_two", "two_then_one", "distilled")}


def test_two_processes_match_one_with_the_same_global_batch(runs):
    one, two = epochs(runs["one"])[0], epochs(runs["two"])[0]
    assert abs(two["loss"] - one["loss"]) <= LOSS_TOLERANCE * one["loss"], (one["loss"], two["loss"])
    assert two["lr"] == one["lr"]  # the same number of steps: the global batch is train.batch_size


def test_rank_zero_alone_writes_the_run(runs):
    run = runs["two"]
    assert len(epochs(run)) == 1  # one line per epoch, not one per process
    assert {p.name for p in run.iterdir()} == {"config.yaml", "problems.json", "metrics.jsonl", "last.pt", "best.pt", "results.json"}
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 1 and results["metrics"]["images"] == 2


def test_a_run_resumes_with_another_number_of_processes(runs):
    for name in ("one_then_two", "two_then_one"):
        history = epochs(runs[name])
        assert [r["epoch"] for r in history] == [1, 2], name
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
        assert json.loads((runs[name] / "results.json").read_text())["epochs"] == 2
    # the epoch each resumed run started from is the one it was given
    assert epochs(runs["one_then_two"])[0] == epochs(runs["one"])[0]
    assert epochs(runs["two_then_one"])[0] == epochs(runs["two"])[0]


def test_rank_zero_builds_the_teacher_cache_and_every_process_reads_it(runs):
    run = runs["distilled"]
    stats = json.loads((run / "teacher_cache.json").read_text())
    assert stats["used"] and stats["built_entries"] == 8  # 1 view x 8 training images
    assert json.loads((run / "built-by-rank0.json").read_text()) == 8
    assert json.loads((run / "built-by-rank1.json").read_text()) == 0
    assert [r["epoch"] for r in epochs(run)] == [1]
    assert "teacher" in json.loads((run / "results.json").read_text())


def test_weight_auto_is_the_same_in_every_process(runs):
    # each process measures the gradient ratio on its own images; the weight is their mean
    weights = [json.loads((runs["distilled"] / f"weights-rank{rank}.json").read_text()) for rank in range(2)]
    assert len(weights[0]) == 2 and weights[0][-1] > 0  # two steps (8 images, global batch 4)
    assert weights[0] == weights[1]


def _mean_worker(rank: int, world: int, port: int, cases: list[list], out: str) -> None:
    from kdet.engine.distributed import mean_of_present

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        Path(out, f"rank{rank}.json").write_text(json.dumps([mean_of_present(case[rank]) for case in cases]))
    finally:
        dist.destroy_process_group()


def test_mean_of_present_averages_over_the_processes_that_have_a_value(tmp_path):
    cases = [[1.0, 3.0], [None, 3.0], [None, None]]
    mp.start_processes(_mean_worker, args=(2, _free_port(), cases, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [2.0, 3.0, None]


def _cli_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    """A process as torchrun starts ``python -m kdet ...``: the rendezvous in the environment."""
    import os

    from kdet.cli import main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = main(argv)
    if code:
        raise SystemExit(code)


def test_kdet_train_under_torchrun_joins_the_processes_and_logs_once(shapes_voc, tmp_path, capfd):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(shapes_voc, epochs=1)))
    out = tmp_path / "run"
    mp.start_processes(_cli_worker, args=(2, _free_port(), ["train", str(config), "--out", str(out)]), nprocs=2, join=True,
                       start_method="fork")
    printed = capfd.readouterr().out
    assert printed.count("run directory:") == 1 and printed.count("epoch 1:") == 1
    assert "2 processes x 2 images per step" in printed
    assert len(epochs(out)) == 1 and (out / "results.json").is_file()


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    from kdet.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "bundled:bccd_teacher", "--data", "bundled:bccd"]) == 2
    assert "only kdet train and kdet distill run under torchrun" in capsys.readouterr().err
