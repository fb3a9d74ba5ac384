"""Markdown tables of distillation arms against their baseline, paired by seed.

    python benchmarks/paired.py OUT_DIR BASELINE ARM [ARM ...]

reads OUT_DIR/<name>-s<seed>/results.json (and config.yaml for the seed) and prints, per arm:
AP@[.5:.95], AP50, AP75 and VOC mAP@0.5 (mean ± sample sd over seeds), the gain over the
baseline of the same seed (mean ± sd, and per seed), and the fraction of the teacher-student gap
closed on the means; then AP@[.5:.95] per class. `kdet compare` gives the same AP, AP50, VOC,
ΔAP and gap figures; this adds AP75, AP50 gains, per-seed gains and the per-class table, and
then the validation AP@[.5:.95] at every validated epoch (metrics.jsonl), mean over seeds, and
last the training time per epoch against the baseline's (teacher cached or live). The epoch at
which each arm reaches its baseline's best validation AP is benchmarks/screen.py's.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml


def load(out: Path, name: str) -> dict[int, dict]:
    runs = {}
    for run in sorted(out.glob(f"{name}-s[0-9]*")):
        if run.is_dir() and (run / "results.json").is_file():
            seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
            runs[seed] = json.loads((run / "results.json").read_text())
    if not runs:
        raise SystemExit(f"no finished runs {out}/{name}-s<seed>/")
    return runs


def stat(values: list[float], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):.3f}"


def main(out: Path, baseline_name: str, arms: list[str]) -> None:
    baseline = load(out, baseline_name)
    teachers: dict[str, list[float]] = {}  # arm -> its teacher's test AP per paired seed
    rows, per_class = [], []
    for name in [baseline_name, *arms]:
        runs = load(out, name)
        seeds = sorted(runs)
        coco = {s: runs[s]["metrics"]["coco"] for s in seeds}
        cells = [name, ",".join(map(str, seeds))]
        cells += [stat([coco[s][k] for s in seeds]) for k in ("AP", "AP50", "AP75")]
        cells.append(stat([runs[s]["metrics"]["voc"]["mAP50_all"] for s in seeds]))
        paired = [s for s in seeds if s in baseline]
        if name == baseline_name or not paired:
            cells += ["-"] * 5
        else:
            gains = {k: [coco[s][k] - baseline[s]["metrics"]["coco"][k] for s in paired] for k in ("AP", "AP50", "AP75")}
            cells += [stat(gains[k], signed=True) for k in ("AP", "AP50", "AP75")]
            cells.append(", ".join(f"{g:+.3f}" for g in gains["AP"]))
            base_mean = statistics.fmean(baseline[s]["metrics"]["coco"]["AP"] for s in paired)
            arm_mean = statistics.fmean(coco[s]["AP"] for s in paired)
            found = [runs[s].get("teacher", {}).get("metrics", {}).get("coco", {}).get("AP") for s in paired]
            teacher = statistics.fmean(found) if None not in found else None
            if teacher is not None:
                teachers[name] = found
            cells.append(f"{(arm_mean - base_mean) / (teacher - base_mean):.0%}" if teacher and teacher > base_mean else "-")
        rows.append(cells)
        classes = list(coco[seeds[0]]["per_class"])
        per_class.append([name] + [f"{statistics.fmean(coco[s]['per_class'][c]['AP'] for s in seeds):.3f}" for c in classes])
    header = ["arm", "seeds", "AP@[.5:.95]", "AP50", "AP75", "VOC mAP@0.5", "ΔAP", "ΔAP50", "ΔAP75", "ΔAP per seed", "gap closed"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    if teachers:
        # one teacher for every seed (a fixed checkpoint), or one per seed (a born-again arm's own baseline)
        said = [f"{name} {found[0]:.3f}" if len({round(a, 6) for a in found}) == 1
                else f"{name} {statistics.fmean(found):.3f} (mean of its per-seed teachers: {', '.join(f'{a:.3f}' for a in found)})"
                for name, found in teachers.items()]
        print(f"\nteacher AP@[.5:.95]: {'; '.join(said)}; gap closed = (arm - baseline) / (teacher - baseline), "
              "means over paired seeds\n")
    else:
        print()
    print("| arm | " + " | ".join(classes) + " |\n|" + "---|" * (len(classes) + 1))
    for cells in per_class:
        print("| " + " | ".join(cells) + " |")
    print_curves(out, [baseline_name, *arms])
    print_times(out, baseline_name, arms)


def epoch_seconds(run: Path) -> float:
    """Mean training seconds per epoch (validation excluded), from metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.fmean(r["train_time_s"] for r in records if "train_time_s" in r)


def print_times(out: Path, baseline_name: str, arms: list[str]) -> None:
    """Training seconds per epoch of each arm against its baseline of the same seed, split by
    whether the teacher's outputs came from the teacher cache or from the teacher run live; for a
    run that built (part of) the cache, the teacher's passes that building took, per epoch of
    the schedule, which that run paid before it trained and the runs reading the cache after it
    did not."""
    base = {seed: epoch_seconds(out / f"{baseline_name}-s{seed}") for seed in load(out, baseline_name)}
    print("\ntraining time per epoch against the baseline of the same seed (both runs shared the machine with one other run)\n")
    print("| arm | teacher | seeds | s/epoch | baseline s/epoch | ratio | cache built by this arm, s/epoch |\n"
          "|---|---|---|---|---|---|---|")
    print(f"| {baseline_name} | - | {','.join(map(str, sorted(base)))} | {statistics.fmean(base.values()):.1f} | - | - | - |")
    for name in arms:
        groups: dict[str, list[int]] = {}
        builds: dict[int, float] = {}
        for seed, result in load(out, name).items():
            if seed in base:
                cache = result.get("teacher_cache") or {}
                groups.setdefault("cache" if cache else "live", []).append(seed)
                if cache.get("built_entries"):
                    builds[seed] = cache["build_time_s"] / result["epochs"]
        for kind, seeds in sorted(groups.items()):
            arm = [epoch_seconds(out / f"{name}-s{s}") for s in seeds]
            ratio = [a / base[s] for a, s in zip(arm, seeds)]
            built = [s for s in seeds if s in builds]
            built_cell = f"{statistics.fmean(builds[s] for s in built):.1f} (seeds {','.join(map(str, built))})" if built else "-"
            print(f"| {name} | {kind} | {','.join(map(str, seeds))} | {statistics.fmean(arm):.1f} | "
                  f"{statistics.fmean(base[s] for s in seeds):.1f} | {stat(ratio)}x | {built_cell} |")


def val_curve(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["epoch"]: r["val"]["AP"] for r in records if r.get("val")}


def print_curves(out: Path, names: list[str]) -> None:
    """Validation AP@[.5:.95] per validated epoch, mean over the seeds of each arm."""
    curves = {name: [val_curve(run) for run in sorted(out.glob(f"{name}-s[0-9]*")) if (run / "results.json").is_file()]
              for name in names}
    epochs = sorted({e for runs in curves.values() for curve in runs for e in curve})
    print("\nvalidation AP@[.5:.95] by epoch (mean over seeds)\n")
    print("| epoch | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
    for epoch in epochs:
        cells = []
        for name in names:
            values = [curve[epoch] for curve in curves[name] if epoch in curve]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
        print(f"| {epoch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
