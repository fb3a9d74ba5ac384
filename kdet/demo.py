"""``kdet demo``: the main job on the bundled BCCD data, start to finish on a CPU.

The bundled DFL-head teacher (``bundled:bccd_teacher_dfl``, CSP-Darknet-s, 9.1M parameters) is
distilled into a student of the same head eleven times smaller (CSP-Darknet-p, 0.79M) with kdet's
default recipe for that pair (:mod:`kdet.distill.recipe`: LD and soft labels with the teacher's
assignment); a baseline student is trained with the same data, schedule and seed and no teacher. The demo ends with the comparison
table of ``kdet compare`` and writes the report of ``kdet report`` (``OUT/report/index.html``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


from .config import DistillConfig, load_config

CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_config(name: str) -> Path:
    """Path of a recipe shipped with kdet (``kdet/configs/<name>.yaml``)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config file {name!r} and no packaged recipe of that name; recipes: {', '.join(names)}")
    return path


def demo_configs(epochs: int | None = None) -> tuple:
    """The baseline config (``demo.yaml``) and the distillation config: the same student, data,
    schedule and seed, plus the bundled DFL teacher and kdet's default recipe (no terms given)."""
    overrides = [f"train.epochs={epochs}"] if epochs else []
    baseline = load_config(packaged_config("demo"), overrides)
    distilled = load_config(packaged_config("demo"), overrides, base={"teacher": {"checkpoint": "bundled:bccd_teacher_dfl"}},
                            schema=DistillConfig)
    return baseline, distilled


def run_demo(out: Path, *, epochs: int | None = None, report: bool = True, log: Callable[[str], None] = print,
             progress: bool = True) -> list[dict]:
    """Train the baseline and the distilled student into ``out/baseline`` and ``out/distilled``
    (continuing either if interrupted), then print and save the comparison and, with ``report``,
    write the report into ``out/report``."""
    from rich.console import Console

    from .distill.compare import collect_runs, comparison_rows, markdown_table, render_comparison
    from .distill.run import distill
    from .engine.trainer import train

    baseline, distilled = demo_configs(epochs)
    runs = [("baseline", baseline, train), ("distilled", distilled, distill)]
    for name, config, fn in runs:
        run_dir = out / name
        if (run_dir / "results.json").exists():
            log(f"{run_dir} is complete already (delete it to train again)")
            continue
        resume = (run_dir / "last.pt").exists()
        log(f"== {name} student: {run_dir}" + (" (continuing the earlier run)" if resume else ""))
        fn(config, run_dir, resume=resume, log=log, progress=progress)
    rows = comparison_rows(collect_runs([out / name for name, _, _ in runs]))
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    (out / "comparison.md").write_text(markdown_table(rows) + "\n")
    log("")
    render_comparison(rows, Console(highlight=False))
    log(f"everything measured is in {out}: comparison.md/json, and per run results.json, metrics.jsonl, best.pt")
    log(f"compare again with: kdet compare {out / 'baseline'} {out / 'distilled'}")
    if report:
        from .report.build import build_report

        log("")
        log("== report: test-split predictions and CPU latency (PyTorch and ONNX Runtime) of each model")
        html_path = build_report([out / name for name, _, _ in runs], out / "report", log=log)
        log(f"open the report: {html_path.resolve().as_uri()}")
    return rows
