"""Print a Markdown table of finished kdet runs (their results.json), grouped by config."""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml


def describe(run: Path) -> str:
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    return f"{model['family']} {model['backbone']}-{model['size']}"


def main(runs: list[str]) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in map(Path, runs):
        results = json.loads((run / "results.json").read_text())
        results["seed"] = yaml.safe_load((run / "config.yaml").read_text())["seed"]
        groups[describe(run)].append(results)

    def stat(values: list[float], digits: int = 3) -> str:
        mean = statistics.fmean(values)
        if len(values) == 1:
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    print("| model | params | GFLOPs | CPU latency (ms) | AP@[.5:.95] | AP50 | VOC mAP@0.5 (all-pt) | train time (min) | epochs | seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, items in groups.items():
        p = items[0]["profile"]
        print(
            f"| {name} | {p['params'] / 1e6:.2f}M | {p['flops'] / 1e9:.2f} | "
            f"{stat([r['profile']['latency_ms_median'] for r in items], 1)} | "
            f"{stat([r['metrics']['coco']['AP'] for r in items])} | {stat([r['metrics']['coco']['AP50'] for r in items])} | "
            f"{stat([r['metrics']['voc']['mAP50_all'] for r in items])} | {stat([r['train_time_s'] / 60 for r in items], 1)} | "
            f"{items[0]['epochs']} | {', '.join(str(r['seed']) for r in items)} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
