"""Size and speed of a detector: parameters, forward FLOPs and latency per image at batch 1.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add
as 2 FLOPs and counts only matrix products and convolutions: normalisation, activations,
element-wise operations, upsampling and NMS add nothing to the count (they add to the latency).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ModelProfile:
    """What :func:`profile_model` measured.

    ``flops``: forward FLOPs at batch 1 without decoding, a multiply-add counted as 2.
    ``latency_ms_median`` and ``latency_ms_iqr`` (75th minus 25th percentile): milliseconds per
    image at batch 1, decoding and NMS included, on ``device`` with ``threads`` torch threads.
    """

    params: int
    trainable_params: int
    flops: int
    latency_ms_median: float
    latency_ms_iqr: float
    input_size: int
    threads: int
    device: str


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(all parameters, trainable parameters)``; a parameter shared by two modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _probe(model: nn.Module, input_size: int) -> torch.Tensor:
    parameter = next(model.parameters())
    return torch.rand(1, 3, input_size, input_size, device=parameter.device, dtype=parameter.dtype)


def count_flops(model: nn.Module, input_size: int) -> int:
    """Forward FLOPs of one ``input_size`` x ``input_size`` image, eval mode, no decoding."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(_probe(model, input_size))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def measure_latency(
    model: nn.Module,
    input_size: int,
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    decode: bool = True,
) -> list[float]:
    """Milliseconds of ``runs`` timed forward passes of one image (after ``warmup`` untimed
    ones), in eval mode without gradients; with ``decode`` the time includes decoding and NMS.

    ``threads`` sets torch's CPU thread count for the measurement; the previous count and the
    model's train/eval mode are restored afterwards.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    previous_threads = torch.get_num_threads()
    was_training = model.training
    image = _probe(model, input_size)
    synchronize = torch.cuda.synchronize if image.is_cuda else (lambda: None)
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.no_grad():
            for index in range(warmup + runs):
                synchronize()
                start = time.perf_counter()
                model(image, decode=decode)
                synchronize()
                if index >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    return times


def profile_model(model: nn.Module, input_size: int, *, runs: int = 20, threads: int | None = None) -> ModelProfile:
    """Parameters, FLOPs and batch-1 latency (decoding included) of ``model`` at ``input_size``."""
    params, trainable = count_parameters(model)
    flops = count_flops(model, input_size)
    times = measure_latency(model, input_size, runs=runs, threads=threads)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return ModelProfile(
        params=params,
        trainable_params=trainable,
        flops=flops,
        latency_ms_median=float(statistics.median(times)),
        latency_ms_iqr=float(q3 - q1),
        input_size=input_size,
        threads=threads if threads is not None else torch.get_num_threads(),
        device=str(next(model.parameters()).device),
    )
