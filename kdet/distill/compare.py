"""``kdet compare``: teacher, baseline student and distilled students side by side.

Runs are grouped by their config with the seed left out, so the seeds of one method become one
row with a mean and a spread (sample standard deviation). A distilled group is paired with the
baseline group that trained the same student on the same data and schedule without a teacher;
from the pair come the AP gain (paired by seed), the fraction of the teacher-student gap
closed, and the training time per epoch relative to the baseline. Teacher rows come from the
``teacher`` entry that ``kdet distill`` writes into ``results.json``.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import Config, ConfigError, DistillConfig, config_to_dict, validate_config
from .losses import DISTILL_LOSSES


@dataclass
class Run:
    path: Path
    config: dict
    results: dict

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def distilled(self) -> bool:
        return "distill" in self.config

    def group_key(self) -> str:
        config = {k: v for k, v in self.config.items() if k != "seed"}
        return json.dumps(config, sort_keys=True)

    def student_key(self) -> str:
        """The config without seed, teacher and distillation: what a baseline must share."""
        config = {k: v for k, v in self.config.items() if k not in ("seed", "teacher", "distill")}
        return json.dumps(config, sort_keys=True)


def run_teachers(results: dict) -> list[dict]:
    """The teachers a distillation run scored (``results.json``): its ``teacher``, or each of its
    ``teachers``."""
    if "teacher" in results:
        return [results["teacher"]]
    return list(results.get("teachers", []))


def teacher_label(teacher: dict | list | None) -> str | None:
    """A distillation config's teacher(s), as the comparison names them."""
    if isinstance(teacher, list):
        return ", ".join(str(t.get("checkpoint") or t.get("name")) for t in teacher)
    if (teacher or {}).get("self"):
        return f"self ({teacher['self']})"
    return (teacher or {}).get("checkpoint")


def collect_runs(paths: list[Path]) -> list[Run]:
    runs = []
    for path in paths:
        results, config = path / "results.json", path / "config.yaml"
        if not results.is_file() or not config.is_file():
            missing = "results.json" if not results.is_file() else "config.yaml"
            raise FileNotFoundError(f"{path}: no {missing}; give run directories of finished kdet train / kdet distill runs")
        runs.append(Run(path, _with_defaults(_read_saved(config, yaml.safe_load)), _read_saved(results, json.loads)))
    if not runs:
        raise ValueError("no run directories given")
    return runs


def _read_saved(path: Path, parse) -> dict:
    """A run's saved YAML or JSON file, or an error that names it."""
    try:
        return parse(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable ({error}); the run's file was damaged or edited: restore it, "
                         "or train the run again") from None


def _with_defaults(config: dict) -> dict:
    """The config with every default filled in, so runs saved before a key existed group with newer ones."""
    schema = DistillConfig if "distill" in config else Config
    try:
        return config_to_dict(validate_config(config, schema=schema))
    except ConfigError:
        return config


def _stat(values: list[float | None], undefined: str = "no ground truth to measure it") -> dict:
    """Mean, sample sd and count over the defined values. A metric with no ground truth (a class
    with no box in the split) is ``None``: left out, as COCO leaves it out of its means; when every
    value is, ``{"mean": None, "sd": None, "n": 0, "undefined": undefined}``."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "sd": None, "n": 0, "undefined": undefined}
    return {"mean": statistics.fmean(defined), "sd": statistics.stdev(defined) if len(defined) > 1 else None, "n": len(defined)}


def model_name(model: dict) -> str:
    """``yolo cspdarknet-t``; ``yolo cspdarknet-t dfl`` for the DFL head (the anchor head, the
    default, is not named, so runs saved before ``model.head`` existed keep their names)."""
    head = " dfl" if model.get("head") == "dfl" else ""
    return f"{model['family']} {model['backbone']}-{model['size']}{head}"


def method_name(config: dict) -> str:
    distill = config.get("distill")
    if not distill:
        return "no KD"
    terms = [t for t in distill.get("terms", []) if t.get("enabled", True)]
    kinds = {"response": distill.get("response", True), "features": distill.get("features", True)}
    names = []
    for term in terms:
        feature = term["loss"] in DISTILL_LOSSES and DISTILL_LOSSES.get(term["loss"]).kind == "feature"
        if (feature and not kinds["features"]) or (not feature and not kinds["response"]):
            continue
        args = ", ".join(f"{k}={v}" for k, v in sorted((term.get("args") or {}).items()))
        where = f"({term.get('student', 'head')})" if feature else ""
        weight = term.get("weight", 1.0)
        weight = f"x{weight:g}" if isinstance(weight, (int, float)) else f"x {weight}"  # weight: auto
        names.append(f"{term['loss']}{where}" + (f" [{args}]" if args else "") + f" {weight}")
    text = " + ".join(names) or "labels only"
    if names and distill.get("assign", "own") != "own":
        text += f", assign: {distill['assign']}"
    if names and distill.get("schedule", "constant") != "constant":
        text += f", {distill['schedule']} decay to {distill.get('final_ratio', 0.0):g}"
    return text


def _metrics_row(results_list: list[dict]) -> dict:
    coco = [r["metrics"]["coco"] for r in results_list]
    voc = [r["metrics"]["voc"] for r in results_list]
    profile = results_list[0]["profile"]
    split = results_list[0].get("split", "test")

    def per_class(name: str) -> dict:
        return _stat([c["per_class"][name]["AP"] for c in coco], f"no box of {name} in the {split} split")

    return {
        "AP": _stat([c["AP"] for c in coco]),
        "AP50": _stat([c["AP50"] for c in coco]),
        "AP75": _stat([c["AP75"] for c in coco]),
        "VOC_mAP50": _stat([v["mAP50_all"] for v in voc]),
        "VOC_mAP50_11pt": _stat([v["mAP50_11pt"] for v in voc]),
        "per_class_AP": {name: per_class(name) for name in coco[0]["per_class"]},
        "params": profile["params"],
        "flops": profile["flops"],
        "latency_ms": _stat([r["profile"]["latency_ms_median"] for r in results_list]),
    }


def comparison_rows(runs: list[Run]) -> list[dict]:
    """One row per teacher, per baseline group and per distilled group (see the module docstring)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    teachers: dict[str, dict] = {}
    for run in runs:
        for teacher in run_teachers(run.results) if run.distilled else []:
            teachers.setdefault(str(teacher.get("checkpoint")), teacher)
    rows = []
    for name, teacher in teachers.items():
        rows.append({"role": "teacher", "name": name, "method": "", "seeds": [], "runs": [], **_metrics_row([teacher])})
    baselines = {}
    for members in groups.values():
        if not members[0].distilled:
            row = {"role": "baseline", "name": model_name(members[0].config["model"]), "method": "no KD",
                   "seeds": sorted(r.seed for r in members), "runs": [str(r.path) for r in members],
                   "epoch_time_s": _stat([_epoch_time(r) for r in members]), **_metrics_row([r.results for r in members])}
            baselines[members[0].student_key()] = (row, {r.seed: r for r in members})
            rows.append(row)
    for members in groups.values():
        if not members[0].distilled:
            continue
        first = members[0]
        row = {"role": "distilled", "name": model_name(first.config["model"]), "method": method_name(first.config),
               "teacher": teacher_label(first.config["teacher"]), "seeds": sorted(r.seed for r in members),
               "runs": [str(r.path) for r in members], "epoch_time_s": _stat([_epoch_time(r) for r in members]),
               **_metrics_row([r.results for r in members])}
        match = baselines.get(first.student_key())
        if match:
            base_row, by_seed = match
            paired = [(r, by_seed[r.seed]) for r in members if r.seed in by_seed
                      and r.results["metrics"]["coco"]["AP"] is not None and by_seed[r.seed].results["metrics"]["coco"]["AP"] is not None]
            if paired:
                row["delta_AP_paired"] = _stat([r.results["metrics"]["coco"]["AP"] - b.results["metrics"]["coco"]["AP"] for r, b in paired])
                row["paired_seeds"] = sorted(r.seed for r, _ in paired)
                base_ap = statistics.fmean(b.results["metrics"]["coco"]["AP"] for _, b in paired)
                mine = statistics.fmean(r.results["metrics"]["coco"]["AP"] for r, _ in paired)
                # several teachers: the gap to the best of them
                teacher_ap = max((ap for t in run_teachers(first.results) if (ap := t.get("metrics", {}).get("coco", {}).get("AP"))
                                  is not None), default=None)
                if teacher_ap is not None and teacher_ap > base_ap:
                    row["gap_closed"] = (mine - base_ap) / (teacher_ap - base_ap)
                row["epoch_time_ratio"] = row["epoch_time_s"]["mean"] / base_row["epoch_time_s"]["mean"]
        rows.append(row)
    return rows


def _epoch_time(run: Run) -> float:
    return run.results["train_time_s"] / max(1, run.results["epochs"])


def format_stat(stat: dict | None, digits: int = 3) -> str:
    """``mean ± sd`` of a row's statistic (``mean`` alone for one seed), ``-`` for none,
    ``undefined (why)`` for a metric with nothing to measure it on."""
    if not stat:
        return "-"
    if stat["mean"] is None:
        return f"undefined ({stat.get('undefined', 'no ground truth')})"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['sd']:.{digits}f}" if stat.get("sd") is not None else "")


def format_delta(row: dict) -> str:
    """The row's AP gain over its baseline, paired by seed, signed; ``-`` for none."""
    delta = row.get("delta_AP_paired")
    return (("+" if delta["mean"] >= 0 else "") + format_stat(delta)) if delta else "-"


def format_gap(row: dict) -> str:
    """The fraction of the teacher-student gap the row closed, as a percentage; ``-`` for none."""
    gap = row.get("gap_closed")
    return f"{gap:.0%}" if gap is not None else "-"


COLUMNS = ("role", "model", "method", "seeds", "AP@[.5:.95]", "AP50", "VOC mAP@0.5", "ΔAP vs baseline", "gap closed",
           "params", "GFLOPs", "latency ms", "epoch time")


def _cells(row: dict) -> list[str]:
    ratio = row.get("epoch_time_ratio")
    epoch = row.get("epoch_time_s")
    return [
        row["role"],
        row["name"],
        row["method"] + (f" (teacher {row['teacher']})" if row.get("teacher") and row["role"] == "distilled" else ""),
        ",".join(map(str, row["seeds"])) or "-",
        format_stat(row["AP"]),
        format_stat(row["AP50"]),
        format_stat(row["VOC_mAP50"]),
        format_delta(row),
        format_gap(row),
        f"{row['params'] / 1e6:.2f}M",
        f"{row['flops'] / 1e9:.2f}",
        format_stat(row["latency_ms"], 1),
        (f"{epoch['mean']:.1f}s" + (f" ({ratio:.2f}x)" if ratio else "")) if epoch else "-",
    ]


def render_comparison(rows: list[dict], console: Console) -> None:
    table = Table(title="Teacher, baseline and distilled students (test split; mean ± sd over seeds)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("role", "model", "method") else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in _cells(row)))  # method names hold [arguments]
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(file=console.file, width=max(console.width, 200), highlight=False)
    console.print(table)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)
