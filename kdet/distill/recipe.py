"""The default distillation recipe: the terms ``kdet distill`` uses when a config gives none.

The recipe depends on what the two heads can exchange, and was chosen on the validation splits
of kdet's benchmark beds (BENCHMARKS.md, "The default recipe"):

* a response term the student's head can read from any teacher head: ``objectness_scaled``
  (Mehta & Ozay), boxes weighted like the student's own box loss (0.05);
* Pearson-correlation feature distillation (``pkd``) on every neck level the two models share a
  stride on, ``weight: auto``: it standardises each channel, so teachers and students of other
  families, widths and backbones pair without tuning;
* with a two-stage model (Faster R-CNN), whose classes and boxes belong to proposals, PKD alone;
* when both heads predict box distributions (``model.head: dfl``), localization distillation
  (``ld``) and the teacher's soft class scores (``soft_bce``) instead of ``objectness_scaled``,
  the response terms that read what those heads have.

:func:`with_default_recipe` fills an empty ``distill.terms`` with it before a run starts, so the
run's ``config.yaml`` records the terms it trained with and ``--resume`` finds the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import ConfigError, DistillConfig, ModelConfig, TeacherConfig


TWO_STAGE = "faster_rcnn"


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
    features = {"loss": "pkd", "student": "neck", "weight": "auto"}
    same_family = teacher.family == student.family
    if TWO_STAGE in (teacher.family, student.family):
        return Recipe("pkd", [features], f"a two-stage {TWO_STAGE} model has no per-location class scores or boxes for "
                                         f"response terms: PKD on the neck levels of equal stride alone")
    if teacher.family == student.family == "yolo" and teacher.head == student.head == "dfl":
        return Recipe(
            "ld+soft_bce+pkd",
            [{"loss": "ld", "weight": "auto"}, {"loss": "soft_bce", "weight": "auto"}, features],
            "both heads predict box-edge distributions (dfl): localization distillation on them, the teacher's soft "
            "class scores, and PKD on the neck levels of equal stride",
        )
    why = ("same family: the student's head learns the teacher's objectness, classes and boxes (objectness_scaled)"
           if same_family else
           f"{teacher.family} teacher, {student.family} student: objectness_scaled compares scores and decoded boxes "
           f"across the families")
    return Recipe(
        "objectness_scaled+pkd",
        [{"loss": "objectness_scaled", "weight": 1.0, "args": {"box_weight": 0.05}}, features],
        why + "; PKD (Pearson correlation) on the neck levels of equal stride, which normalises away the two "
              "models' feature scales, weighted automatically",
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
    distill = config.distill.model_validate({**config.distill.model_dump(), "terms": recipe.terms, **recipe.settings})
    return config.model_copy(update={"distill": distill}), recipe


__all__ = ["Recipe", "default_recipe", "teacher_model_config", "with_default_recipe"]
