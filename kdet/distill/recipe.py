"""The default distillation recipe: the terms ``kdet distill`` uses when a config gives none.

* Both heads kdet's DFL head (``model.head: dfl``): localization distillation on the box
  distributions (``ld``) and the teacher's class probabilities as soft labels (``soft_bce``),
  each ``weight: auto`` at ``distill.auto.fraction: 0.5``, with the student's positives taken from
  the teacher's predictions (``distill.assign: teacher``): PP-YOLOE+'s distillation of one-stage
  DFL detectors (LD by Zheng et al. 2022, soft labels after GFL, assignment distillation after
  LAD). On BCCD (BENCHMARKS.md, "DFL heads and localization distillation") it was ahead of its
  paired baseline on 4 of 5 seeds of the test split (and of ``objectness_scaled`` on 4 of the same
  5) and closed 48% of the teacher-student gap on the means; on construction-safety it was ahead
  of both on each of 5 seeds and closed 48%.
* Two Ultralytics models: the same, without ``ld`` where the heads have no box distributions
  (YOLO26, ``soft_labels_assign``): on BCCD with a YOLO26s teacher and a YOLO26n student (a
  pair whose student alone nearly matches its teacher) it gained +0.017 AP over 3 seeds, ahead
  of its paired baseline on 2 and level on the third (BENCHMARKS.md, "kdet on the same
  Ultralytics pair").
* Other one-stage pairs (anchor heads, FCOS, across families): ``objectness_scaled`` (Mehta &
  Ozay 2018) with its box part weighted like the student's own box loss (0.05): the student's
  head learns where the teacher sees objects, their classes and boxes, compared as probabilities
  and decoded boxes, so any pair of one-stage heads can use it. On BCCD and construction-safety it
  raises AP50 and leaves AP@[.5:.95] level with the baseline; none of the other terms measured
  with anchor heads did better (PKD, ``weight: auto``, combinations; BENCHMARKS.md).
* The student's own moving average as its teacher (``teacher: {self: ema}``): no default; the
  config must give its terms (:data:`SELF_EVIDENCE` says what was measured).
* A two-stage model (Faster R-CNN) has no per-location scores to compare, so such pairs get PKD
  on the neck levels of equal stride, ``weight: auto`` at ``distill.auto.fraction: 1.0``.

:func:`with_default_recipe` fills an empty ``distill.terms`` with it before a run starts, so the
run's ``config.yaml`` records the terms (and settings) it trained with and ``--resume`` finds the
same ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import ConfigError, DistillConfig, ModelConfig, TeacherConfig


@dataclass
class Recipe:
    name: str
    terms: list[dict]
    why: str
    settings: dict = field(default_factory=dict)


def teacher_model_config(teacher: TeacherConfig) -> ModelConfig:
    """The teacher's architecture: ``teacher.model``, or the one its checkpoint records."""
    if teacher.model is not None:
        return teacher.model
    if not teacher.checkpoint:
        raise ConfigError("teacher: set teacher.checkpoint (a kdet checkpoint such as bundled:bccd_teacher or runs/x/best.pt), "
                          "or teacher.model and teacher.weights")
    from ..engine.checkpoint import load_checkpoint

    try:
        return ModelConfig.model_validate(load_checkpoint(teacher.checkpoint, log=lambda _: None)["model_config"])
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"teacher.checkpoint: {error}") from None


# why there is no default recipe for self distillation (BENCHMARKS.md, "Self distillation")
SELF_EVIDENCE = ("on BCCD, ld and soft_bce, the recipe of two DFL models, made every mean-teacher run with the "
                 "average in eval mode diverge (weight: auto and 1.0, together and each alone, with and without a "
                 "19-epoch burn-in; seeds 0 and 1); with the average on the batch's statistics (teacher.batch_stats, "
                 "now the default for self: ema), both at weight 1.0 after that burn-in did not diverge but ended "
                 "0.010 ± 0.013 AP below the baseline (seeds 0 to 2) and without it 0.033 AP below (seed 0), "
                 "and no other setting was measured")


def _ld_soft_labels(why: str) -> Recipe:
    return Recipe("ld_soft_labels", [{"loss": "ld", "weight": "auto"}, {"loss": "soft_bce", "weight": "auto"}], why,
                  {"auto": {"fraction": 0.5}, "assign": "teacher"})


def default_recipe(teacher: ModelConfig, student: ModelConfig) -> Recipe:
    """The recipe for a ``teacher`` and a ``student`` of these architectures."""
    two_stage = [model.family for model in (teacher, student) if model.family == "faster_rcnn"]
    if two_stage:
        return Recipe(
            "pkd",
            [{"loss": "pkd", "student": "neck", "weight": "auto"}],
            "a two-stage faster_rcnn model has no per-location class scores or boxes for response terms: PKD (Pearson "
            "correlation) on the neck levels of equal stride, weighted so its gradient matches the detection loss's",
            {"auto": {"fraction": 1.0}},
        )
    ld_soft_labels = "localization distillation (ld) and the teacher's class probabilities as soft labels (soft_bce), "\
        "each weighted to half the detection loss's gradient, the student's positives taken from the teacher's " \
        "predictions (distill.assign: teacher)"
    if all(model.family == "ultralytics" for model in (teacher, student)):
        from ..models.ultralytics import box_bins

        bins = {box_bins(model) for model in (teacher, student)}
        if len(bins) == 1 and bins != {1}:
            return _ld_soft_labels(
                f"both Ultralytics heads have box distributions of the same bins: {ld_soft_labels}, the recipe of kdet's "
                "own DFL pairs (ahead of their baselines on 9 of 10 seeds, BENCHMARKS.md): measure it against your own "
                "baseline")
        return Recipe(
            "soft_labels_assign",
            [{"loss": "soft_bce", "weight": "auto"}],
            "Ultralytics heads without box distributions on both sides (YOLO26): the teacher's class probabilities as "
            "soft labels (soft_bce), weighted to half the detection loss's gradient, the student's positives taken from "
            "the teacher's predictions (distill.assign: teacher); with a YOLO26s teacher and a YOLO26n student on BCCD "
            "it gained +0.017 AP over 3 seeds, ahead of its paired baseline on 2 and level on the third (objectness_scaled: "
            "+0.005, ahead on all 3; BENCHMARKS.md): measure it against your own baseline",
            {"auto": {"fraction": 0.5}, "assign": "teacher"},
        )
    if all(model.family == "yolo" and model.head == "dfl" for model in (teacher, student)):
        return _ld_soft_labels(
            f"both heads are DFL heads with box distributions: {ld_soft_labels}, as PP-YOLOE+ distils; it was ahead of its "
            "paired baseline on 4 of 5 seeds on BCCD and on 5 of 5 on construction-safety (BENCHMARKS.md): measure it "
            "against your own baseline")
    pair = ("same family" if teacher.family == student.family else
            f"{teacher.family} teacher, {student.family} student: scores and boxes compared in a form both heads share")
    return Recipe(
        "objectness_scaled",
        [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}],
        f"{pair}; objectness_scaled (Mehta & Ozay) with the box part weighted like the student's own box loss: it raised "
        f"AP50 on BCCD and construction-safety and left AP@[.5:.95] level with the baseline (BENCHMARKS.md); with DFL heads "
        f"on both sides (model.head: dfl) kdet uses LD and soft labels instead: measure it against your own baseline",
    )


def with_default_recipe(config: DistillConfig, log: Callable[[str], None] = print) -> tuple[DistillConfig, Recipe | None]:
    """``config`` with the default recipe's terms when it has none (and the recipe), else
    ``(config, None)``."""
    if config.distill.terms:
        return config, None
    if isinstance(config.teacher, list):
        raise ConfigError("distill.terms is empty, and the default recipe is for one teacher; with several teachers give "
                          "the terms (README: Several teachers)")
    if config.teacher.self:
        raise ConfigError(f"distill.terms is empty, and kdet has no default recipe for self distillation (teacher: {{self: "
                          f"ema}}): {SELF_EVIDENCE}. Give the terms, each with a number as its weight (README: Self distillation)")
    recipe = default_recipe(teacher_model_config(config.teacher), config.model)
    log(f"recipe: distill.terms is empty, so kdet uses its default recipe {recipe.name}: {recipe.why}")
    # the recipe's settings, except those the config gives itself
    settings = {k: v for k, v in recipe.settings.items() if k not in config.distill.model_fields_set}
    distill = config.distill.model_validate({**config.distill.model_dump(), "terms": recipe.terms, **settings})
    return config.model_copy(update={"distill": distill}), recipe


__all__ = ["Recipe", "default_recipe", "teacher_model_config", "with_default_recipe"]
