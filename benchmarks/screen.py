"""Validation-split view of distillation arms against their baseline, paired by seed: what
settings are picked on (the test split is scored once, by paired.py, on the chosen arms).

    python benchmarks/screen.py OUT_DIR BASELINE ARM [ARM ...]

reads OUT_DIR/<name>-s<seed>/metrics.jsonl (finished or not) and prints per arm and seed: the
best validation AP@[.5:.95] so far (what best.pt keeps) and its gain over the baseline of the
same seed, the last validated epoch, and the first validated epoch at which the arm reached the
baseline's final best validation AP (the training it saves), then the mean gain over seeds.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def history(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["epoch"], r["val"]["AP"] or 0.0) for r in records if "val" in r]


def main(out: Path, baseline: str, arms: list[str]) -> None:
    seeds = sorted(int(p.name.rsplit("-s", 1)[1]) for p in out.glob(f"{baseline}-s[0-9]*") if p.is_dir())
    base = {s: history(out / f"{baseline}-s{s}") for s in seeds}
    print("| arm | seed | epochs | best val AP | baseline best | gain | epoch reaching the baseline's final best |")
    print("|---|---|---|---|---|---|---|")
    means = {}
    for arm in arms:
        gains = []
        for seed in seeds:
            runs = history(out / f"{arm}-s{seed}")
            if not runs or not base[seed]:
                continue
            last_epoch = runs[-1][0]
            best = max(ap for _, ap in runs)
            # the baseline at the same point of training, so unfinished arms compare fairly
            base_so_far = max(ap for e, ap in base[seed] if e <= last_epoch)
            base_final = max(ap for _, ap in base[seed])
            reach = next((e for e, ap in runs if ap >= base_final), None)
            gains.append(best - base_so_far)
            print(f"| {arm} | {seed} | {last_epoch} | {best:.3f} | {base_so_far:.3f} | {best - base_so_far:+.3f} | "
                  f"{reach if reach is not None else '-'} of {base[seed][-1][0]} |")
        if gains:
            means[arm] = gains
    print()
    for arm, gains in means.items():
        spread = f" ± {statistics.stdev(gains):.3f}" if len(gains) > 1 else ""
        print(f"{arm}: mean validation gain {statistics.fmean(gains):+.3f}{spread} over {len(gains)} seed(s)")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
