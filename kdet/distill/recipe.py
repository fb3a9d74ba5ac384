"""The default distillation recipe: the terms ``kdet distill`` uses when a config gives none.

Pearson-correlation feature distillation (``pkd``, Cao et al. 2022) on every neck level the two
models share a stride on, with ``weight: auto`` at ``distill.auto.fraction: 1.0`` (the term's
gradient on the student as large as the detection loss's). It was picked on BCCD's validation
split (BENCHMARKS.md, "Distillation with a real gap"): among the arms measured it was the one
ahead of its baseline, where objectness_scaled alone was level with it and objectness_scaled
with PKD fell behind. It has not earned its place yet: on BCCD's test split it is level with the
baseline (3 seeds), and on construction-safety it fell behind it (1 seed). PKD standardises
every channel of both maps, so teachers and students of other families, widths and backbones
pair without tuning; it reads no head output, so any pair of heads (anchor, DFL, FCOS, a
two-stage model's) can use it.

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
    pair = ("same family" if teacher.family == student.family and teacher.backbone == student.backbone else
            f"{teacher.family}/{teacher.backbone} teacher, {student.family}/{student.backbone} student")
    return Recipe(
        "pkd",
        [{"loss": "pkd", "student": "neck", "weight": "auto"}],
        f"{pair}: PKD (Pearson correlation) on the neck levels of equal stride, which normalises away the two models' "
        f"feature scales, weighted so its gradient matches the detection loss's (distill.auto.fraction 1.0); chosen on "
        f"BCCD's validation split, level with the baseline on its test split and behind it on construction-safety "
        f"(BENCHMARKS.md): measure it against your own baseline",
        {"auto": {"fraction": 1.0}},
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
