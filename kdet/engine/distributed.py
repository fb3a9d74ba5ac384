"""Training in several processes, started by torchrun, with PyTorch's own distributed stack.

``torchrun --nproc-per-node N -m kdet train CONFIG`` (or ``distill``) starts N processes, each
given ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address in its environment.
:func:`process_group_from_env` joins them into one process group (NCCL when training on CUDA,
each process on GPU ``LOCAL_RANK``; gloo on the CPU) and the trainer then:

* keeps the sampling contract of a one-process run: every epoch draws the same permutation of
  the training set from ``(seed, epoch)``, cuts it into batches of ``train.batch_size`` (the
  global batch), and process ``r`` of ``N`` takes the ``r``-th of ``N`` equal slices of every
  batch (:class:`RankShare`); each sample is still a pure function of ``(seed, epoch, index)``.
  So N processes see the batches one process sees, and a run may be resumed with any number of
  processes;
* wraps the training step once in ``DistributedDataParallel`` (:func:`wrap`), which averages
  the gradients, so a step of N processes is a step of one process on the whole batch (up to
  BatchNorm, whose statistics are each process's own unless ``train.sync_bn``);
* writes checkpoints, ``metrics.jsonl``, logs and ``results.json`` from rank 0 alone; every
  process predicts its share of the validation split and rank 0 scores the whole.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterable, Iterator, Sized

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

# a process waiting for rank 0 to build something (the teacher cache) may wait for hours; the
# gloo group used for that wait gets this timeout instead of the default's minutes
LONG_WAIT = timedelta(hours=24)
_wait_group = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_with(environ=os.environ) -> int:
    """The number of processes torchrun started (``WORLD_SIZE``); 1 outside torchrun."""
    return int(environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group_from_env(device: torch.device) -> Iterator[None]:
    """Join the processes torchrun started into one process group for the block (NCCL when
    ``device`` is CUDA, gloo otherwise), and leave it afterwards. Nothing happens outside
    torchrun, with one process, or when a process group already exists."""
    global _wait_group
    if launched_with() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _wait_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    try:
        yield
    finally:
        _wait_group = None
        dist.destroy_process_group()


def barrier(*, long: bool = False) -> None:
    """Wait for every process (no-op with one); ``long`` waits without the usual timeout."""
    if world_size() > 1:
        dist.barrier(group=_wait_group if long and _wait_group is not None else None)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block, then the other processes run it: for work that rank 0 does once
    and the others then find done (building the teacher cache they read)."""
    if not is_main_process():
        barrier(long=True)
    yield
    if is_main_process():
        barrier(long=True)


def broadcast_object(obj):
    """Rank 0's ``obj`` in every process."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_lists(items: list) -> list | None:
    """The concatenation of every process's ``items`` (rank 0's first) on rank 0; ``None`` on
    the others."""
    if world_size() == 1:
        return items
    gathered = [None] * world_size() if is_main_process() else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else None


def mean_over_processes(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each scalar in ``values`` averaged over the processes (one all-reduce); detached."""
    if world_size() == 1 or not values:
        return [v.detach() for v in values]
    stacked = torch.stack([v.detach().float() for v in values])
    dist.all_reduce(stacked)
    return list((stacked / world_size()).unbind())


def mean_of_present(value: float | None, device: torch.device | None = None) -> float | None:
    """The mean of ``value`` over the processes that have one (``None`` where a process has
    none; ``None`` when none has). With one process, ``value`` itself. Every process must call
    it at the same point: it is one all-reduce."""
    if world_size() == 1:
        return value
    present = value is not None
    total, count = mean_over_processes([torch.tensor(value if present else 0.0, device=device),
                                        torch.tensor(float(present), device=device)])
    return float(total / count) if count > 0 else None


def wrap(step: nn.Module, device: torch.device, *, sync_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(step, module)``: the step (its BatchNorm layers made ``SyncBatchNorm`` with ``sync_bn``)
    and what the trainer calls on a batch: the step itself with one process, the step wrapped in
    ``DistributedDataParallel`` with several. Parameters outside the student (connectors, a
    loss's own modules) may receive no gradient in some steps (before ``distill.start_epoch``,
    after ``distill.stop_epoch``), so DDP then looks for unused parameters."""
    if world_size() == 1:
        return step, step
    if sync_bn:
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
    beyond_student = any(p.requires_grad and not name.startswith("student.") for name, p in step.named_parameters())
    module = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                                 find_unused_parameters=beyond_student)
    return step, module


class RankShare(Sampler[list[int]]):
    """This process's share of every batch ``batches`` gives: process ``rank`` of ``world`` takes
    the ``rank``-th of ``world`` contiguous slices (equal when the batch size divides by
    ``world``). With one process, the batches themselves."""

    def __init__(self, batches: Iterable[list[int]], rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            n = len(batch)
            yield batch[self.rank * n // self.world : (self.rank + 1) * n // self.world]

    def __len__(self) -> int:
        if not isinstance(self.batches, Sized):
            raise TypeError("RankShare: the batches have no length")
        return len(self.batches)


__all__ = ["RankShare", "barrier", "broadcast_object", "gather_lists", "is_main_process", "launched_with",
           "main_process_first", "mean_over_processes", "process_group_from_env", "rank", "world_size", "wrap"]
