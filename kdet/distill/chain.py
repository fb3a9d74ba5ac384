"""``kdet chain``: teacher-assistant chains and born-again generations in one command.

A chain config is a distillation config plus ``chain:``, the stages between the teacher and the
final student (``model:``). Each stage is a ``kdet distill`` run whose student is the stage's
model and whose teacher is the previous stage's ``best.pt`` (the config's teacher for the first
stage); the last run distils the last stage into the final student. Around them kdet trains what
the chain is measured against, with the same data, schedule and seed:

=============  =================================================================
``baseline``   the final student alone (``kdet train``)
``direct``     the teacher distilled straight into the final student
``N-NAME``     stage N: the teacher (or stage N-1) into the stage's model
``chained``    the last stage distilled into the final student
=============  =================================================================

A stage with the final student's model (``chain: [{}, {}]``) makes born-again generations
(Furlanello et al., ICML 2018): with a teacher of the student's architecture, each generation
teaches a fresh copy. When the first stage is the direct run (same model, same teacher) it is
run once and shown as ``direct``.

Every run directory is a normal run: a finished one (``results.json``) is skipped, an
interrupted one resumed, so ``kdet chain`` continues where it stopped. Before training, every
stage is paired with its teacher (a later stage's teacher is untrained until its stage runs,
but its architecture is known). The end is one comparison table (teacher, assistants,
baseline, direct and chained distillation), also written to ``compare.md`` and ``chain.json``.

Reference: Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020;
Furlanello et al., "Born-Again Neural Networks", ICML 2018.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import ChainConfig, Config, ConfigError, DistillConfig, ModelConfig, TeacherConfig
from .recipe import default_recipe, teacher_model_config

Log = Callable[[str], None]


@dataclass
class ChainRun:
    """One run of a chain: its directory name, its role in the table and its config."""

    name: str
    role: str  # baseline | direct | assistant | chained
    config: Config | DistillConfig
    teacher_run: str | None = None  # the run whose best.pt is this run's teacher

    def path(self, out: Path) -> Path:
        return out / self.name


def chain_runs(config: ChainConfig, out: Path) -> list[ChainRun]:
    """The runs of ``config``'s chain, in the order they train (see the module docstring)."""
    if isinstance(config.teacher, list) or config.teacher.self or config.teacher.train:
        raise ConfigError("kdet chain: give one fixed teacher, a checkpoint or teacher.model with teacher.weights (no list, "
                          "self: ema or train: true); a chain passes one teacher from stage to stage")
    base = config.model_dump(mode="json", exclude={"chain"})
    student = {k: v for k, v in base.items() if k not in ("teacher", "distill")}
    runs = [ChainRun("baseline", "baseline", Config.model_validate(student))]
    teacher, teacher_model, teacher_run = base["teacher"], teacher_model_config(config.teacher), None

    def distillation(name: str, role: str, model: dict) -> ChainRun:
        data = {**base, "model": model, "teacher": teacher}
        if not config.distill.terms:  # the default recipe of this teacher and student, recorded in the stage's config
            recipe = default_recipe(teacher_model, ModelConfig.model_validate(model))
            data["distill"] = {**data["distill"], "terms": recipe.terms, **recipe.settings}
        return ChainRun(name, role, DistillConfig.model_validate(data), teacher_run)

    direct = distillation("direct", "direct", base["model"])
    stages = []
    for number, stage in enumerate(config.chain, 1):
        model = {**base["model"], **stage.model}
        name = f"{number}-{stage.name or f'assistant{number}'}"
        run = distillation(name, "assistant", model)
        if number == 1 and run.config == direct.config:
            run = ChainRun(name, "direct", run.config)  # born-again: the first generation is the direct run
        stages.append(run)
        teacher, teacher_model, teacher_run = {"checkpoint": str(out / name / "best.pt")}, ModelConfig.model_validate(model), name
    chained = distillation("chained", "chained", base["model"])
    return runs + ([] if stages[0].role == "direct" else [direct]) + stages + [chained]


def check_chain(config: ChainConfig, runs: list[ChainRun], out: Path, log: Log) -> list[tuple[ChainRun, object]]:
    """Pair every distillation run of the chain with its teacher before any trains: the teacher
    itself, a finished stage's ``best.pt``, or an untrained model of the stage's architecture."""
    from ..engine.trainer import load_data, resolve_model_config
    from ..models import build_model
    from .setup import pair_config, shown

    index = load_data(config, log)
    size = config.data.input_size
    models: dict[str, ModelConfig] = {}
    checked = []
    for run in runs:
        model_config = resolve_model_config(run.config, index, lambda _: None)
        models[run.name] = model_config
        if run.role == "baseline":
            continue
        student = build_model(model_config, index.class_names, size)
        teachers = None
        best = out / run.teacher_run / "best.pt" if run.teacher_run else None
        if best is not None and not best.is_file():
            untrained = build_model(models[run.teacher_run], index.class_names, size).eval()
            teachers = [(TeacherConfig(name="teacher", checkpoint=str(best)), untrained, size)]
        _, pairing = pair_config(run.config, student, index.class_names, teachers=teachers)
        checked.append((run, shown(pairing)))
    return checked


def run_chain(config: ChainConfig, out: str | Path, *, log: Log = print, progress: bool = True, check_only: bool = False) -> list[dict]:
    """Train (or continue) every run of the chain under ``out`` and return the comparison rows;
    with ``check_only``, pair the stages and return nothing. Raises ``PairingError`` before any
    training when a stage cannot be paired."""
    from ..engine.trainer import train
    from .compare import markdown_table
    from .run import distill
    from .setup import report_lines

    out = Path(out)
    runs = chain_runs(config, out)
    log("chain: " + " -> ".join(["teacher"] + [r.name for r in runs if r.name not in ("baseline", "direct")])
        + "; compared with the baseline and the direct distillation")
    checked = check_chain(config, runs, out, log)
    errors = []
    for run, report in checked:
        if check_only:
            log(f"== {run.name} ({run.role})")
            for line in report_lines(report):
                log(f"  {line}")
        if not report.ok:
            errors.append(run.name)
    if errors:
        raise ConfigError(f"kdet chain: run(s) {', '.join(errors)} cannot be paired with their teacher; "
                          f"`kdet chain CONFIG --check` shows why")
    if check_only:
        log("chain: every stage pairs with its teacher")
        return []
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        path = run.path(out)
        if (path / "results.json").is_file():
            log(f"== {run.name} ({run.role}): finished, skipped")
            continue
        resume = (path / "last.pt").is_file()
        log(f"== {run.name} ({run.role}): {'resuming' if resume else 'training'} in {path}")
        if run.role == "baseline":
            train(run.config, path, resume=resume, log=log, progress=progress)
        else:
            distill(run.config, path, resume=resume, log=log, progress=progress)
    rows = chain_rows(runs, out)
    (out / "chain.json").write_text(json.dumps([{"run": r.name, "role": r.role, "teacher": r.teacher_run or "teacher",
                                                 "path": str(r.path(out))} for r in runs], indent=1))
    (out / "compare.md").write_text(markdown_table(rows) + "\n")
    return rows


def chain_rows(runs: list[ChainRun], out: Path) -> list[dict]:
    """The comparison rows of a finished chain: the teacher, the assistants, the baseline, the
    direct and the chained student; the gap closed is measured against the chain's teacher."""
    from .compare import collect_runs, comparison_rows

    collected = collect_runs([run.path(out) for run in runs])
    roles = {str(run.path(out)): run.role for run in runs}
    assistants = {str(run.path(out) / "best.pt") for run in runs if run.role in ("assistant", "direct")}
    rows = []
    for row in comparison_rows(collected):
        if row["role"] == "teacher":
            if row["name"] in assistants:
                continue  # an assistant used as a teacher: it has its own row
        else:
            row["role"] = roles[row["runs"][0]]
        rows.append(row)
    teacher = next(row for row in rows if row["role"] == "teacher")
    base = next(row for row in rows if row["role"] == "baseline")
    top, bottom = teacher["AP"]["mean"], base["AP"]["mean"]
    for row in rows:
        if row["role"] in ("direct", "chained"):  # against the chain's teacher, not the stage's own
            row.pop("gap_closed", None)
            if None not in (top, bottom, row["AP"]["mean"]) and top > bottom:
                row["gap_closed"] = (row["AP"]["mean"] - bottom) / (top - bottom)
    order = {"teacher": 0, "assistant": 1, "baseline": 2, "direct": 3, "chained": 4}
    return sorted(rows, key=lambda row: order[row["role"]])


__all__ = ["ChainRun", "chain_rows", "chain_runs", "check_chain", "run_chain"]
