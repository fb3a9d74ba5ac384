"""The default distillation recipe: the terms ``kdet distill`` uses when a config gives none.

``objectness_scaled`` (Mehta & Ozay 2018) with its box part weighted like the student's own box
loss (0.05): the student's head learns where the teacher sees objects, their classes and boxes,
compared as probabilities and decoded boxes, so any pair of one-stage heads (anchor, DFL, FCOS,
across families) can use it. Of the arms measured on BCCD's validation split over three seeds
(BENCHMARKS.md, "Distillation with a real gap") it was the one ahead of its baseline on every
seed (PKD on the neck was ahead on two seeds and behind on the third, and behind on
construction-safety; objectness_scaled with PKD fell behind). It has not earned its place yet:
on BCCD's test split it is level with the baseline. A two-stage model (Faster R-CNN) has no
per-location scores to compare, so such pairs get PKD on the neck levels of equal stride,
``weight: auto`` at ``distill.auto.fraction: 1.0``.

:func:`with_default_recipe` fills an empty ``distill.terms`` with it before a run starts, so the
run's ``config.yaml`` records the terms it trained with and ``--resume`` finds the same ones.
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
    pair = ("same family" if teacher.family == student.family else
            f"{teacher.family} teacher, {student.family} student: scores and boxes compared in a form both heads share")
    return Recipe(
        "objectness_scaled",
        [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}],
        f"{pair}; objectness_scaled (Mehta & Ozay) with the box part weighted like the student's own box loss: ahead of "
        f"its baseline on BCCD's validation split on 3 of 3 seeds, level with it on the test split (BENCHMARKS.md): "
        f"measure it against your own baseline",
    )


def with_default_recipe(config: DistillConfig, log: Callable[[str], None] = print) -> tuple[DistillConfig, Recipe | None]:
    """``config`` with the default recipe's terms when it has none (and the recipe), else
    ``(config, None)``."""
    if config.distill.terms:
        return config, None
    if isinstance(config.teacher, list):
        raise ConfigError("distill.terms is empty, and the default recipe is for one teacher; with several teachers give "
                          "the terms (README: Several teachers)")
    recipe = default_recipe(config.model if config.teacher.self else teacher_model_config(config.teacher), config.model)
    log(f"recipe: distill.terms is empty, so kdet uses its default recipe {recipe.name}: {recipe.why}")
    # the recipe's settings, except those the config gives itself
    settings = {k: v for k, v in recipe.settings.items() if k not in config.distill.model_fields_set}
    distill = config.distill.model_validate({**config.distill.model_dump(), "terms": recipe.terms, **settings})
    return config.model_copy(update={"distill": distill}), recipe


__all__ = ["Recipe", "default_recipe", "teacher_model_config", "with_default_recipe"]
