"""What one training step computes, and the hooks around it.

:class:`TrainStep` is the one module a run trains: it owns every network whose weights the
optimiser updates (the student detector, and for a distillation run the connectors and any
module a loss needs: :class:`~kdet.distill.distiller.Distiller`). Called on a :class:`Batch` it
returns the loss to minimise and its named terms. Because it is one ``nn.Module``, the
optimiser is built from its parameters, gradient clipping sees all of them, and
``DistributedDataParallel`` wraps it as one thing.

:class:`HookBase` is what the trainer calls around the steps, in this order::

    before_train
    for every epoch:  before_epoch -> (before_step -> step -> after_step) per batch -> after_epoch
    after_train

The step itself is the first hook called at every point, so what it needs from the loop (the
epoch, the fraction of training done) reaches it the same way as any other hook.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..models import Detector
from ..structures import Targets

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class Batch:
    """One training batch.

    ``images`` ``[N, 3, H, W]`` in ``[0, 1]``; ``targets`` one dict per image (``boxes`` xyxy
    input pixels ``[M, 4]``, ``labels`` ``[M]``; ``M`` may be 0); ``indices`` the images'
    indices in the training set; ``labelled`` ``bool [N]``: whether an image's labels may train
    the detector's own loss (an unlabelled image gets only distillation terms); ``epoch`` the
    1-based training epoch and ``view`` the augmentation epoch its samples were made with.
    """

    images: Tensor
    targets: Targets
    indices: list[int]
    labelled: Tensor
    epoch: int = 1
    view: int = 1

    @staticmethod
    def of(images: Tensor, targets: Targets, indices: list[int] | None = None, *, epoch: int = 1, view: int | None = None) -> "Batch":
        """A batch of labelled images (``indices`` default to ``0..N-1``)."""
        n = len(images)
        return Batch(images, targets, list(range(n)) if indices is None else list(indices),
                     torch.ones(n, dtype=torch.bool, device=images.device), epoch, epoch if view is None else view)

    def to(self, device: torch.device) -> "Batch":
        return replace(self, images=self.images.to(device, non_blocking=True),
                       targets=[{k: v.to(device) for k, v in t.items()} for t in self.targets],
                       labelled=self.labelled.to(device))


class HookBase:
    """Something the trainer calls at fixed points of a run (see the module docstring for the
    order). ``trainer`` gives access to the epoch, step, optimiser and run state."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def before_epoch(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_epoch(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


class TrainStep(nn.Module, HookBase):
    """The student's own detection loss on the batch's labels: what a plain training run minimises.

    Subclasses add what a run trains besides (a distiller's connectors and loss modules, a
    second model) as submodules registered after ``student``, so the optimiser sees the
    student's parameters first. :meth:`state_dict_to_save` goes into ``last.pt`` beside the
    student's weights and is restored on resume.
    """

    def __init__(self, student: Detector) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, named loss terms)``; the terms are detached, for logging."""
        if not bool(batch.labelled.all()):
            raise ValueError("this training step trains on labelled images only; the batch holds unlabelled ones")
        out = self.student(batch.images, batch.targets)
        return out.loss, {k: v.detach() for k, v in out.losses.items()}

    def data_epoch(self, epoch: int) -> int:
        """The augmentation epoch (view) training epoch ``epoch`` (1-based) sees: its own, unless
        the step replays fewer augmented views than there are epochs (the teacher cache)."""
        return epoch

    def state_dict_to_save(self) -> dict | None:
        """What of the step besides the student's weights a resumed run needs; ``None``: nothing."""
        return None

    def load_saved_state(self, state: dict | None) -> None:
        pass


__all__ = ["Batch", "HookBase", "TrainStep"]
