"""Size and speed measurements: hand-counted FLOPs on one convolution, then every registered
model family gets finite, positive numbers that grow with the input size."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdet.config import ModelConfig
from kdet.engine.profile import ModelProfile, count_flops, count_parameters, measure_latency, profile_model
from kdet.models import MODELS, build_model




def tiny_model(family: str) -> nn.Module:
    config = ModelConfig(family=family, backbone="mobilenet_v3_small", width=0.5, size="p", anchors="default")
    return build_model(config, ["a", "b"], 64)


def test_count_flops_counts_a_multiply_add_as_two():
    conv = nn.Conv2d(3, 4, kernel_size=1, bias=False)
    # 8 x 8 outputs x 4 channels x 3 multiply-adds each, 2 FLOPs per multiply-add
    assert count_flops(conv, 8) == 8 * 8 * 4 * 3 * 2


def test_count_parameters_separates_frozen_ones():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 16 + 10 parameters
    net[0].requires_grad_(False)
    assert count_parameters(net) == (26, 10)


@pytest.mark.parametrize("family", [f for f in MODELS.names() if f != "ultralytics"])  # ultralytics: test_ultralytics.py
def test_profile_is_finite_positive_and_grows_with_size(family):
    model = tiny_model(family).train()
    threads_before = torch.get_num_threads()
    profile = profile_model(model, 64, runs=3, threads=1)
    assert isinstance(profile, ModelProfile)
    assert profile.params == sum(p.numel() for p in model.parameters()) > 0
    assert 0 < profile.trainable_params <= profile.params
    assert profile.flops > 0
    assert math.isfinite(profile.latency_ms_median) and profile.latency_ms_median > 0
    assert math.isfinite(profile.latency_ms_iqr) and profile.latency_ms_iqr >= 0
    assert (profile.input_size, profile.threads, profile.device) == (64, 1, "cpu")
    assert torch.get_num_threads() == threads_before  # restored
    assert model.training  # restored
    assert count_flops(model, 128) > count_flops(model, 64)


@pytest.mark.parametrize("family", [f for f in MODELS.names() if f != "ultralytics"])  # ultralytics: test_ultralytics.py
def test_measure_latency_gives_one_time_per_run(family):
    model = tiny_model(family)
    times = measure_latency(model, 64, runs=2, warmup=1, threads=1, decode=False)
    assert len(times) == 2 and all(math.isfinite(t) and t > 0 for t in times)
    with pytest.raises(ValueError, match="runs must be at least 1"):
        measure_latency(model, 64, runs=0)
