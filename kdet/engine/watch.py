"""A hook that warns when the training loss explodes, long before it becomes NaN: a run whose
loss grows by orders of magnitude (too high a learning rate, broken labels) otherwise ends
"successfully" with a useless model."""
from __future__ import annotations

import math
from typing import Callable

from .step import HookBase

Log = Callable[[str], None]


class LossWatch(HookBase):
    """After every step, compares the loss with the loss of the run's first step (the model as
    initialised or resumed, before any update of this process: healthy training stays below
    it) and warns, through ``log``, the first time it is ``factor`` times larger, then each time
    it grows by ``factor`` again (100x, 10 000x, ... by default): one line per order of growth,
    not one per step."""

    def __init__(self, log: Log, *, factor: float = 100.0) -> None:
        self.log, self.factor = log, factor
        self.reference: float | None = None
        self.next_warning = factor

    def after_step(self, trainer) -> None:
        loss = float(trainer.loss)
        if not math.isfinite(loss):  # a step the fp16 scaler skipped; any other non-finite loss has stopped the run
            return
        if self.reference is None:
            self.reference = max(loss, 1e-6)
            return
        ratio = loss / self.reference
        if ratio < self.next_warning:
            return
        while ratio >= self.next_warning:
            self.next_warning *= self.factor
        lr = trainer.optimizer.param_groups[0]["lr"]
        self.log(f"warning: the loss is exploding: {loss:.3g} at epoch {trainer.epoch}, step {trainer.iteration}, {ratio:.3g} "
                 f"times the first step's ({self.reference:.3g}). Training goes on but is unlikely to learn: lower train.lr "
                 f"(now {lr:.3g}), keep train.grad_clip set, or check the labels with `kdet data check`")
