"""Ultralytics' native knowledge distillation as a peer to kdet, scored by kdet's evaluator on
kdet's test split.

What it measures: on one dataset, Ultralytics trains

* a teacher, ``yolo26s.yaml`` from scratch (seed 0 only, ``--teacher-epochs``);
* per seed, a baseline student, ``yolo26n.yaml`` from scratch without distillation;
* per seed, a distilled student, the same with Ultralytics' own distillation
  (``distill_model=<teacher best.pt>``, ``dis=6.0``: :mod:`ultralytics.nn.distill_model`,
  score-weighted L2 between projected student and teacher neck features);

with Ultralytics' own recipe (its default optimizer, schedule and augmentation), the same epochs,
image size, batch and seed for baseline and distilled. Every ``best.pt`` is then read by kdet as
a model of its ``ultralytics`` family (an Ultralytics checkpoint is a kdet checkpoint, see
:mod:`kdet.models.ultralytics`) and scored by kdet's evaluator (``kdet eval``'s code: COCO
AP@[.5:.95], AP50, AP75, per-class AP, and VOC mAP@0.5) on kdet's test split, the split kdet's
own runs are scored on. The training data is that same split exported once with kdet's converter
(what ``kdet data convert DATASET --to yolo --out OUT/data`` writes), so Ultralytics trains on
kdet's train split, selects ``best.pt`` on kdet's val split and never sees the test split.

Run from the repository root::

    python benchmarks/peer_ultralytics.py --dataset bccd --out runs/peer_bccd \\
        --seeds 0 1 2 --epochs 40 --teacher-epochs 40 --imgsz 320 --batch 16 --threads 1
    python benchmarks/peer_ultralytics.py --dataset benchmarks/data/construction-safety-500-s0 \\
        --out runs/peer_cs --seeds 0 --epochs 30 --teacher-epochs 40 --imgsz 320 --batch 16 --threads 1

On two cores the runs can be split between two processes sharing ``--out``: the command above in
one (it trains the teacher first), ``--only baseline`` with the same settings in the other (the
baselines need no teacher), later ``--only distilled --seeds ...`` once the teacher has finished.
Start the second process after the first has written ``data/`` (both would export it). A run
``--only`` writes no summary; the full command, run last, scores nothing twice and writes it.

``--dataset`` is ``bccd`` (kdet's bundled copy) or any dataset kdet reads (a folder or a YOLO
data.yaml, COCO, VOC); its splits are kdet's (the dataset's own, or kdet's seeded 80/10/10 split
with seed 0 when it has none). ``--fraction F`` trains on a fraction of the training split (smoke
tests only; validation and test splits stay whole).

What it writes, under ``--out``::

    data/                  kdet's YOLO export of the dataset (export.json says what it holds)
    teacher/               Ultralytics' run folder (weights/best.pt, weights/last.pt, results.csv)
    baseline-s<seed>/      plus, in each run folder: epochs.jsonl (wall time of every epoch),
    distill-s<seed>/       train.json (the run finished) and result.json (kdet's scores, the
                           wall time per epoch, the ultralytics, kdet and torch versions, the
                           git commit)
    summary.md             mean ± sd over seeds, per-seed ΔAP (distilled - baseline), the fraction
                           of the teacher-baseline gap closed, per-class AP; also printed

Resumable: run the same command again. A run with ``train.json`` (or whose ``last.pt`` Ultralytics
has already stripped at the end of training) is not trained again; a scored run (``result.json``)
is not scored again. An interrupted run is resumed with Ultralytics' ``resume=True`` from its
``weights/last.pt``; this works for distillation runs too: Ultralytics saves the student and the
projector without the teacher and rebuilds the teacher from the ``distill_model`` path recorded in
the checkpoint, so the teacher's ``best.pt`` must stay where it was. A run folder without a
resumable ``last.pt`` (interrupted in its first epoch) is restarted from scratch. Ultralytics does
not restore the random state on resume, so a resumed run is not bit-identical to an uninterrupted
one. A finished run trained with other settings than the command's stops the script (use another
``--out``). A run's kept record (``train.json`` and ``result.json``, what ``benchmarks/results/``
holds) copied back into its folder counts as finished and scored: the students of a teacher
trained again on another machine need not be trained again (the summary reads their scores).

Offline: nothing is downloaded. ``YOLO_OFFLINE=1`` is set before Ultralytics is imported (no pip
update check, no telemetry), models are built from their yaml (``pretrained=False``), the teacher
is a local file, ``amp=False`` skips the AMP check (on a GPU it would download ``yolo26n.pt``; on
the CPU, where everything here trains, it returns at once) and ``plots=False`` draws nothing. One
request is left that no Ultralytics setting turns off: ``check_det_dataset`` calls
``check_font("Arial.ttf")``, which, whatever ``YOLO_OFFLINE`` says, sends a request to GitHub and
downloads the font when it is not in Ultralytics' config folder (``YOLO_CONFIG_DIR``). Nothing is
drawn with ``plots=False``, so the script makes that lookup local-only
(:func:`keep_ultralytics_offline`); any ``Arial.ttf`` placed in ``YOLO_CONFIG_DIR`` would prevent
it as well. Ultralytics also resets torch's CPU threads to ``min(8, cpu_count - 1)`` when it selects
the CPU; the script makes that ``--threads``.

Licence: Ultralytics is AGPL-3.0 and a benchmark-only dependency here. kdet itself imports it
only when a model of its optional ``ultralytics`` family is used (``pip install kdet[ultralytics]``);
this script imports it to train and hands the checkpoints to kdet's loader, which reads them through
that family.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ["YOLO_OFFLINE"] = "1"  # before ultralytics is imported anywhere

import torch  # noqa: E402

import kdet  # noqa: E402
from kdet.data import read_dataset, remap_classes, resolve_data_path  # noqa: E402
from kdet.data.export import export_yolo  # noqa: E402
from kdet.engine.checkpoint import load_detector  # noqa: E402
from kdet.engine.evaluate import evaluate_model  # noqa: E402
from kdet.models.ultralytics import import_ultralytics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEACHER_YAML = "yolo26s.yaml"
STUDENT_YAML = "yolo26n.yaml"
TEST_SPLIT = "test"
# kdet eval's defaults: every detection down to score 0.001, as COCO AP wants
EVAL_SETTINGS = {"batch_size": 16, "score_thresh": 0.001, "nms_iou": 0.6}
# the train arguments a finished or interrupted run must share with the command to be reused
COMPARED_ARGS = ("model", "epochs", "imgsz", "batch", "seed", "fraction", "distill_model", "dis")


def log(message: str) -> None:
    print(f"[peer] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Ultralytics, offline and on the requested threads
# ---------------------------------------------------------------------------------------------
def keep_ultralytics_offline(threads: int) -> Any:
    """Import Ultralytics through kdet (``YOLO_OFFLINE``, PIL's own ``Image.open`` kept), make
    the dataset check's font lookup local-only and pin the CPU threads Ultralytics sets."""
    ultralytics = import_ultralytics()
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import USER_CONFIG_DIR
    from ultralytics.utils import torch_utils

    def local_font(font: str = "Arial.ttf") -> Path | None:
        file = USER_CONFIG_DIR / Path(font).name
        return file if file.exists() else None

    data_utils.check_font = local_font
    torch_utils.NUM_THREADS = threads  # select_device("cpu") calls torch.set_num_threads(NUM_THREADS)
    torch.set_num_threads(threads)
    return ultralytics


# ---------------------------------------------------------------------------------------------
# Data: kdet's splits, exported once with kdet's converter
# ---------------------------------------------------------------------------------------------
def dataset_source(name: str) -> str:
    """``bccd`` -> kdet's bundled copy; anything else is a path kdet reads."""
    return "bundled:bccd" if name in ("bccd", "bundled:bccd") else name


def export_dataset(source: str, out: Path) -> Path:
    """kdet's YOLO export of ``source`` in ``out/data`` (once); returns the data.yaml Ultralytics
    trains on. The export keeps kdet's splits and kdet's handling of defective labels."""
    folder = out / "data"
    marker = folder / "export.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded["source"] != source:
            raise SystemExit(f"{out} holds runs on {recorded['source']}, not {source}; use another --out")
        log(f"data: kdet's YOLO export of {source} is in {folder}")
        return folder / "data.yaml"
    index = read_dataset(resolve_data_path(source))
    if TEST_SPLIT not in index.splits or "val" not in index.splits:
        raise SystemExit(f"{source}: kdet reads splits {sorted(index.splits)}; this benchmark needs train, val and test")
    if folder.exists():
        shutil.rmtree(folder)  # an export interrupted before its marker
    export_yolo(index, folder)
    marker.write_text(json.dumps({
        "source": source,
        "root": str(index.root),
        "split_source": index.split_source,
        "splits": {name: len(records) for name, records in index.splits.items()},
        "class_names": index.class_names,
        "problems_handled": len(index.problems),
        "written_by": "kdet.data.export.export_yolo (kdet data convert --to yolo)",
    }, indent=1))
    log(f"data: exported {source} with kdet's converter to {folder} "
        f"({', '.join(f'{k} {len(v)}' for k, v in index.splits.items())})")
    return folder / "data.yaml"


# ---------------------------------------------------------------------------------------------
# Training, resumable
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    name: str           # teacher, baseline-s0, distill-s0 ...
    role: str           # teacher, baseline, distilled
    model_yaml: str
    seed: int
    epochs: int
    teacher: Path | None = None  # distilled runs: the teacher's best.pt

    def folder(self, out: Path) -> Path:
        return out / self.name


def train_args(run: Run, data_yaml: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Ultralytics ``train`` arguments of ``run``."""
    train = {
        "data": str(data_yaml.resolve()), "epochs": run.epochs, "imgsz": args.imgsz, "batch": args.batch,
        "seed": run.seed, "deterministic": True, "pretrained": False, "device": "cpu", "workers": 0,
        "amp": False, "plots": False, "val": True, "fraction": args.fraction,
        "project": str(out.resolve()), "name": run.name, "exist_ok": True, "verbose": True,
    }
    if run.teacher is not None:
        train.update(distill_model=str(run.teacher.resolve()), dis=args.dis)
    return train


def compare_settings(run: Run, recorded: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """Stop when a run found on disk was trained with other settings than the command's."""
    wanted = {**wanted, "model": run.model_yaml}
    different = {key: (recorded.get(key), wanted.get(key)) for key in COMPARED_ARGS
                 if key in wanted and str(recorded.get(key)) != str(wanted.get(key))}
    if different:
        detail = ", ".join(f"{key}: {old} on disk, {new} asked" for key, (old, new) in different.items())
        raise SystemExit(f"{where} was trained with other settings ({detail}); use another --out or remove that run")


def run_state(folder: Path) -> tuple[str, dict | None]:
    """``done``, ``kept`` (the run's records without its checkpoints, as ``benchmarks/results/``
    keeps them), ``resume`` (with the checkpoint's train args) or ``fresh``."""
    best, last = folder / "weights" / "best.pt", folder / "weights" / "last.pt"
    if (folder / "train.json").is_file() and best.is_file():
        return "done", None
    if (folder / "train.json").is_file() and (folder / "result.json").is_file() and not last.is_file():
        return "kept", None
    if last.is_file():
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=False)
        except Exception as error:  # a damaged file: restart the run
            log(f"{last} cannot be read ({error}); the run starts again")
            return "fresh", None
        if ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None:
            return "resume", ckpt.get("train_args") or {}
        if ckpt.get("epoch") == -1 and best.is_file():  # stripped by Ultralytics at the end of training
            return "done", None
    return "fresh", None


class EpochClock:
    """Ultralytics callbacks that append each epoch's wall time to ``epochs.jsonl``: training,
    validation and checkpointing together (``seconds``) and training alone (``train_seconds``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started: dict[int, float] = {}
        self.trained: dict[int, float] = {}

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.started[trainer.epoch] = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any) -> None:
        self.trained[trainer.epoch] = time.perf_counter()

    def on_fit_epoch_end(self, trainer: Any) -> None:
        start = self.started.pop(trainer.epoch, None)
        if start is None:  # Ultralytics' final validation of best.pt, not an epoch
            return
        now = time.perf_counter()
        record = {"epoch": trainer.epoch + 1, "seconds": round(now - start, 3),
                  "train_seconds": round(self.trained.pop(trainer.epoch, now) - start, 3),
                  "train_images": len(trainer.train_loader.dataset), "torch_threads": torch.get_num_threads()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def attach(self, model: Any) -> None:
        for event in ("on_train_epoch_start", "on_train_epoch_end", "on_fit_epoch_end"):
            model.add_callback(event, getattr(self, event))


def read_epochs(folder: Path) -> list[dict]:
    """Each epoch's record in ``epochs.jsonl``, the last one per epoch (an epoch redone after a
    resume replaces the earlier record)."""
    path = folder / "epochs.jsonl"
    if not path.is_file():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def train_run(run: Run, data_yaml: Path, out: Path, args: argparse.Namespace) -> Path:
    """Train ``run`` unless it is finished; resume it when interrupted. Returns its best.pt."""
    from ultralytics import YOLO

    folder = run.folder(out)
    best, last = folder / "weights" / "best.pt", folder / "weights" / "last.pt"
    wanted = train_args(run, data_yaml, out, args)
    state, recorded = run_state(folder)
    if state in ("done", "kept"):
        if (folder / "train.json").is_file():
            compare_settings(run, json.loads((folder / "train.json").read_text())["train_args"], wanted, folder)
        log(f"{run.name}: finished, skipped" + (" (its kept record: scores, no checkpoint)" if state == "kept" else ""))
        if state == "kept":
            return best
    else:
        if run.teacher is not None and not Path(run.teacher).is_file():
            raise SystemExit(f"{run.name}: its teacher {run.teacher} is not there (a kept record holds no checkpoint); "
                             f"move {Path(run.teacher).parent.parent} aside and run the script without --only to train the teacher")
        start = time.perf_counter()
        if state == "resume":
            compare_settings(run, {**recorded, "model": Path(str(recorded.get("model"))).name}, wanted, folder)
            log(f"{run.name}: resuming from {last}")
            model = YOLO(str(last))
            EpochClock(folder / "epochs.jsonl").attach(model)
            model.train(resume=True, device="cpu", workers=0, plots=False, val=True)
        else:
            if folder.exists():
                shutil.rmtree(folder)  # nothing resumable in it (Ultralytics would append to its results.csv)
            folder.mkdir(parents=True)
            log(f"{run.name}: training {run.model_yaml} for {run.epochs} epochs, seed {run.seed}"
                + (f", distilled from {run.teacher} (dis {args.dis})" if run.teacher else ""))
            model = YOLO(run.model_yaml)
            EpochClock(folder / "epochs.jsonl").attach(model)
            model.train(**wanted)
        log(f"{run.name}: trained in {time.perf_counter() - start:.1f} s (this session)")
    if not best.is_file():
        raise SystemExit(f"{run.name}: Ultralytics wrote no {best}")
    if not (folder / "train.json").is_file():
        saved = {key: value for key, value in wanted.items() if key not in ("project", "name", "exist_ok", "verbose")}
        (folder / "train.json").write_text(json.dumps({
            "run": run.name, "role": run.role, "train_args": {**saved, "model": run.model_yaml},
            "epochs": read_epochs(folder),
        }, indent=1))
    return best


# ---------------------------------------------------------------------------------------------
# Scoring with kdet's evaluator on kdet's test split
# ---------------------------------------------------------------------------------------------
def git_commit() -> dict[str, Any]:
    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def environment(ultralytics: Any, threads: int) -> dict[str, Any]:
    return {"ultralytics": ultralytics.__version__, "kdet": kdet.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "torch_threads": threads,
            "git": git_commit()}


def score_run(run: Run, best: Path, source: str, out: Path, env: dict[str, Any]) -> dict:
    """kdet's metrics of ``best`` on kdet's test split, written to the run's result.json."""
    folder = run.folder(out)
    result_path = folder / "result.json"
    if result_path.is_file() and (not best.is_file() or result_path.stat().st_mtime >= best.stat().st_mtime):
        log(f"{run.name}: scored, skipped")
        return json.loads(result_path.read_text())
    model, payload = load_detector(best, log=lambda _: None)
    index = read_dataset(resolve_data_path(source))
    records = remap_classes(index.split(TEST_SPLIT), index.class_names, model.class_names)
    start = time.perf_counter()
    metrics = evaluate_model(model, records, payload["input_size"], **EVAL_SETTINGS)
    eval_seconds = time.perf_counter() - start
    trained = json.loads((folder / "train.json").read_text())
    epochs = read_epochs(folder) or trained["epochs"]
    seconds = [e["seconds"] for e in epochs]
    coco = metrics["coco"]
    result = {
        "run": run.name, "role": run.role, "model": run.model_yaml, "seed": run.seed,
        "checkpoint": str(best), "teacher": str(run.teacher) if run.teacher else None,
        "dataset": source, "split": TEST_SPLIT, "input_size": payload["input_size"],
        "AP": coco["AP"], "AP50": coco["AP50"], "AP75": coco["AP75"],
        "per_class_AP": {name: values["AP"] for name, values in coco["per_class"].items()},
        "metrics": metrics, "eval_settings": EVAL_SETTINGS, "eval_seconds": round(eval_seconds, 2),
        "train_args": trained["train_args"],
        "epoch_seconds": seconds,
        "epoch_seconds_mean": round(statistics.fmean(seconds), 3) if seconds else None,
        "train_seconds_total": round(sum(seconds), 1),
        "epochs": epochs,
        "environment": env,
    }
    result_path.write_text(json.dumps(result, indent=1))
    log(f"{run.name}: kdet AP@[.5:.95] {coco['AP']:.3f}, AP50 {coco['AP50']:.3f}, AP75 {coco['AP75']:.3f} "
        f"on {len(records)} {TEST_SPLIT} images")
    return result


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def stat(values: list[float], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):.3f}"


def gap_closed(distilled: float, baseline: float, teacher: float | None) -> str:
    """(distilled - baseline) / (teacher - baseline); ``-`` unless the teacher leads by at least
    0.001 AP (the precision the tables show)."""
    if teacher is None or teacher - baseline < 1e-3:
        return "-"
    return f"{(distilled - baseline) / (teacher - baseline):.0%}"


def ultralytics_val_ap(folder: Path) -> float | None:
    """Ultralytics' own validation mAP@[.5:.95] of the run's best epoch (its ``results.csv``; its
    fitness, which picks ``best.pt``, is that mAP), on kdet's validation split."""
    import csv

    path = folder / "results.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = [{key.strip(): value for key, value in row.items()} for row in csv.DictReader(handle)]
    values = [float(row["metrics/mAP50-95(B)"]) for row in rows if row.get("metrics/mAP50-95(B)")]
    return max(values) if values else None


def summarize(teacher: dict, baselines: dict[int, dict], distilled: dict[int, dict], args: argparse.Namespace,
              env: dict[str, Any], data_info: dict[str, Any]) -> str:
    seeds = sorted(set(baselines) & set(distilled))
    teacher_ap = teacher["AP"]
    rows: list[list[str]] = []

    def seconds(results: list[dict]) -> str:
        values = [r["epoch_seconds_mean"] for r in results if r["epoch_seconds_mean"] is not None]
        return f"{statistics.fmean(values):.1f}" if values else "-"

    def own_val(results: list[dict]) -> str:
        values = [ultralytics_val_ap(Path(args.out) / r["run"]) for r in results]
        return stat([v for v in values if v is not None])

    rows.append([f"teacher {TEACHER_YAML}", "0", f"{teacher['AP']:.3f}", f"{teacher['AP50']:.3f}",
                 f"{teacher['AP75']:.3f}", own_val([teacher]), "-", "-", "-", "-", "-", seconds([teacher])])
    for label, runs in ((f"baseline {STUDENT_YAML}", baselines), (f"distilled {STUDENT_YAML} (dis {args.dis:g})", distilled)):
        cells = [label, ",".join(str(s) for s in sorted(runs))]
        cells += [stat([runs[s][k] for s in sorted(runs)]) for k in ("AP", "AP50", "AP75")]
        cells.append(own_val([runs[s] for s in sorted(runs)]))
        if runs is distilled and seeds:
            gains = {k: [distilled[s][k] - baselines[s][k] for s in seeds] for k in ("AP", "AP50", "AP75")}
            cells += [stat(gains[k], signed=True) for k in ("AP", "AP50", "AP75")]
            cells.append(", ".join(f"{g:+.3f}" for g in gains["AP"]))
            cells.append(gap_closed(statistics.fmean(distilled[s]["AP"] for s in seeds),
                                    statistics.fmean(baselines[s]["AP"] for s in seeds), teacher_ap))
        else:
            cells += ["-"] * 5
        cells.append(seconds(list(runs.values())))
        rows.append(cells)
    header = ["model", "seeds", "AP@[.5:.95]", "AP50", "AP75", "Ultralytics' val mAP", "ΔAP", "ΔAP50", "ΔAP75",
              "ΔAP per seed", "gap closed", "s/epoch"]
    lines = [
        "# Ultralytics' native distillation, scored by kdet on kdet's test split",
        "",
        f"dataset {args.dataset} ({data_info['root']}): kdet's splits "
        f"({', '.join(f'{k} {v}' for k, v in data_info['splits'].items())}), scored on {TEST_SPLIT}; "
        f"classes {', '.join(data_info['class_names'])}.",
        f"Ultralytics {env['ultralytics']}, kdet {env['kdet']}, torch {env['torch']}, commit "
        f"{(env['git']['commit'] or 'unknown')[:12]}{' (dirty)' if env['git']['dirty'] else ''}; "
        f"from scratch, imgsz {args.imgsz}, batch {args.batch}, student {args.epochs} epochs, teacher "
        f"{args.teacher_epochs} epochs (seed 0), fraction {args.fraction:g}, CPU, {args.threads} thread(s).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
        "mean ± sample sd over seeds; AP@[.5:.95], AP50, AP75: kdet's evaluator on the test split; Ultralytics' val "
        "mAP: its own validator's mAP@[.5:.95] of the best epoch on kdet's validation split (what picked best.pt); "
        "ΔAP: distilled minus the baseline of the same seed; gap closed = "
        "(distilled - baseline) / (teacher - baseline) on the means over paired seeds; s/epoch: wall time of an "
        "epoch (training, validation, checkpoint), mean over epochs and seeds.",
        "",
    ]
    if seeds:
        lines += ["| seed | baseline AP | distilled AP | ΔAP | ΔAP50 | ΔAP75 | gap closed |", "|---|---|---|---|---|---|---|"]
        for s in seeds:
            b, d = baselines[s], distilled[s]
            lines.append(f"| {s} | {b['AP']:.3f} | {d['AP']:.3f} | {d['AP'] - b['AP']:+.3f} | {d['AP50'] - b['AP50']:+.3f} | "
                         f"{d['AP75'] - b['AP75']:+.3f} | {gap_closed(d['AP'], b['AP'], teacher_ap)} |")
        lines.append("")
    classes = list(teacher["per_class_AP"])

    def per_class(name: str, results: list[dict]) -> str:
        values = [[r["per_class_AP"][c] for r in results if r["per_class_AP"][c] is not None] for c in classes]
        return f"| {name} | " + " | ".join(f"{statistics.fmean(v):.3f}" if v else "-" for v in values) + " |"

    lines += ["AP@[.5:.95] per class (mean over seeds)", "",
              "| model | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1),
              per_class("teacher", [teacher]), per_class("baseline", list(baselines.values())),
              per_class("distilled", list(distilled.values())), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="bccd", help="bccd (kdet's bundled copy) or a dataset path kdet reads")
    parser.add_argument("--out", required=True, help="folder of the runs and the summary (reused to resume)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default 0 1 2)")
    parser.add_argument("--epochs", type=int, default=40, help="student epochs (default 40)")
    parser.add_argument("--teacher-epochs", type=int, default=40, help="teacher epochs (default 40)")
    parser.add_argument("--imgsz", type=int, default=320, help="image size (default 320)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--dis", type=float, default=6.0, help="Ultralytics' distillation loss weight (default 6.0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of the training split (smoke tests; default 1.0)")
    parser.add_argument("--only", choices=("baseline", "distilled"),
                        help="train and score only these students (a second process can train the baselines while "
                             "the first trains the teacher; `distilled` needs the teacher's run finished); "
                             "no summary is written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ultralytics = keep_ultralytics_offline(args.threads)
    env = environment(ultralytics, args.threads)
    source = dataset_source(args.dataset)
    data_yaml = export_dataset(source, out)
    data_info = json.loads((data_yaml.parent / "export.json").read_text())

    teacher_run = Run("teacher", "teacher", TEACHER_YAML, 0, args.teacher_epochs)
    teacher_best = out / teacher_run.name / "weights" / "best.pt"
    if args.only == "distilled" and not (out / teacher_run.name / "train.json").exists():
        raise SystemExit(f"--only distilled: the teacher's run {out / teacher_run.name} has not finished; "
                         "run the script without --only first (it trains the teacher)")
    if args.only is None:
        teacher_best = train_run(teacher_run, data_yaml, out, args)
        teacher = score_run(teacher_run, teacher_best, source, out, env)
    baselines: dict[int, dict] = {}
    distilled: dict[int, dict] = {}
    for seed in args.seeds:
        for run, table in ((Run(f"baseline-s{seed}", "baseline", STUDENT_YAML, seed, args.epochs), baselines),
                           (Run(f"distill-s{seed}", "distilled", STUDENT_YAML, seed, args.epochs, teacher_best), distilled)):
            if args.only is not None and run.role != args.only:
                continue
            best = train_run(run, data_yaml, out, args)
            table[seed] = score_run(run, best, source, out, env)
    if args.only is not None:
        print(f"--only {args.only}: {len(args.seeds)} run(s) done; run without --only for the summary")
        return 0

    summary = summarize(teacher, baselines, distilled, args, env, data_info)
    (out / "summary.md").write_text(summary + "\n", encoding="utf-8")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
