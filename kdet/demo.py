"""``kdet demo``: the main job on the bundled BCCD data, start to finish on a CPU."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .config import load_config

CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_config(name: str) -> Path:
    """Path of a recipe shipped with kdet (``kdet/configs/<name>.yaml``)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config file {name!r} and no packaged recipe of that name; recipes: {', '.join(names)}")
    return path


def run_demo(out: Path, *, epochs: int | None = None, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train the student-sized recipe on bundled BCCD, evaluate it on the test split, and print
    its accuracy, size and speed."""
    from .engine.trainer import train

    overrides = [f"train.epochs={epochs}"] if epochs else []
    config = load_config(packaged_config("demo"), overrides)
    resume = (out / "last.pt").exists()
    if resume:
        log(f"{out} holds an earlier demo run: continuing it (delete the folder to start over)")
    results = train(config, out, resume=resume, log=log, progress=progress)
    profile = results["profile"]
    coco, voc = results["metrics"]["coco"], results["metrics"]["voc"]
    log("")
    log(f"BCCD {results['split']} split: AP@[.5:.95] {coco['AP']:.3f}, AP50 {coco['AP50']:.3f}, "
        f"VOC mAP@0.5 {voc['mAP50_all']:.3f} (all-point) / {voc['mAP50_11pt']:.3f} (11-point)")
    for name, values in coco["per_class"].items():
        log(f"  {name:<10} AP {values['AP']:.3f}  AP50 {values['AP50']:.3f}")
    log(f"model: {profile['params'] / 1e6:.2f}M parameters, {profile['flops'] / 1e9:.2f} GFLOPs, "
        f"{profile['latency_ms_median']:.1f} ms/image on this CPU; trained in {results['train_time_s']:.0f}s")
    log(f"everything measured is in {out}: results.json, metrics.jsonl, best.pt")
    (out / "demo.json").write_text(json.dumps(results, indent=1))
    return results
