"""Online (mutual) distillation: the teacher trains in the same step as the student.

With ``teacher.train: true`` the distillation step owns both networks. Each learns from its
labels and from the other: the student through the configured terms (teacher outputs detached),
the teacher through the same response terms in reverse (student outputs detached, the student
paired as the teacher), so ``kl`` becomes Deep Mutual Learning's symmetric KL and
``objectness_scaled`` a symmetric objectness-weighted L2. Feature terms teach the student only.
One optimiser updates both (the student's parameters first).

:class:`OnlineTeacher` keeps what the run needs of the teacher besides its weights: a moving
average of them (when ``train.ema`` is on, as the student's), validated every
``train.eval_every`` epochs, and ``teacher_best.pt``, the average with the best validation AP,
scored on the test split at the end beside the student. Its state is saved in ``last.pt``, so
``--resume`` continues both models exactly.

Reference: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from ..config import ModelConfig
from ..engine.checkpoint import model_payload, save_atomic
from ..engine.ema import ModelEMA
from ..structures import DetectorOutput, FeatureMap, HeadLevel


class OnlineTeacher:
    """The trained teacher's moving average, validation and best checkpoint."""

    def __init__(self, teacher: nn.Module, model_config: ModelConfig, *, input_size: int, out_dir: Path | None,
                 validate: Callable[[nn.Module], dict] | None, eval_every: int = 1, ema: tuple[float, float] | None = None,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.teacher = teacher
        self.model_config = model_config
        self.input_size = input_size
        self.out_dir = out_dir
        self.validate = validate
        self.eval_every = eval_every
        self.ema = ModelEMA(teacher, *ema) if ema is not None else None
        self.log = log
        self.best = {"epoch": -1, "AP": -1.0, "history": []}

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.teacher

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.teacher)

    def after_epoch(self, epoch: int, epochs: int) -> None:
        """Validate the teacher (its average), keep ``teacher_best.pt`` and ``teacher_metrics.json``.
        Under torchrun every process validates its share and rank 0 alone (``validate`` gives it
        the metrics) writes."""
        if self.validate is None or self.out_dir is None or not (epoch % self.eval_every == 0 or epoch == epochs):
            return
        metrics = self.validate(self.eval_model)
        if metrics is None:
            return
        val = {"AP": metrics["coco"]["AP"], "AP50": metrics["coco"]["AP50"], "VOC_mAP50": metrics["voc"]["mAP50_all"]}
        self.best["history"].append({"epoch": epoch, "val": val})
        if (val["AP"] or 0.0) > self.best["AP"]:
            self.best.update(epoch=epoch, AP=val["AP"] or 0.0)
            save_atomic(model_payload(self.eval_model, self.model_config, self.input_size, extra={"epoch": epoch, "val": val}),
                        self.out_dir / "teacher_best.pt")
        (self.out_dir / "teacher_metrics.json").write_text(json.dumps(self.best, indent=1))
        self.log(f"teacher (trained online) epoch {epoch}: val AP {val['AP'] or 0.0:.3f} AP50 {val['AP50'] or 0.0:.3f}")

    def state_dict(self) -> dict:
        """The teacher's weights, its average and the best epoch so far (in ``last.pt``)."""
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        if self.ema is not None:
            state.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
            state["ema_updates"] = self.ema.updates
        state["best"] = self.best
        return state

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict({k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")})
        if self.ema is not None:
            self.ema.load_state_dict({"module": {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")},
                                      "updates": state["ema_updates"]})
        self.best = state["best"]


def detached(out: DetectorOutput) -> DetectorOutput:
    """``out`` with every feature and head map detached: what the other model learns from."""
    def level(lv: HeadLevel) -> HeadLevel:
        fields = {name: getattr(lv, name).detach() for name in ("cls_logits", "box", "score", "box_dist") if getattr(lv, name) is not None}
        return HeadLevel(**{**lv.__dict__, **fields})

    return DetectorOutput({name: FeatureMap(fm.tensor.detach(), fm.stride) for name, fm in out.features.items()},
                          [level(lv) for lv in out.head])


__all__ = ["OnlineTeacher", "detached"]
