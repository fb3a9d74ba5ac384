"""Speed of a detector in PyTorch and in ONNX Runtime, on the CPU, at a chosen batch size.

Both backends time the same computation: the network and the box decoding before NMS, i.e. what
the exported ONNX graph holds (:class:`kdet.engine.export.ExportWrapper` in PyTorch). NMS, a
post-step after ONNX Runtime, is left out of both. Latency is per batch of ``batch`` random
images at the model's input size, warm-up runs excluded; throughput is ``batch`` over the median.
Parameters and FLOPs come from :mod:`kdet.engine.profile` (FLOPs per image, a multiply-add
counted as 2); for an ONNX file alone the parameters are the elements of its floating-point
initializers (BatchNorm is folded into the convolutions there, so a few fewer than PyTorch
counts) and FLOPs are unknown unless the checkpoint it came from is given.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .export import INPUT_NAME, OUTPUT_NAMES, ExportWrapper, export_onnx, ort_session, read_metadata, weights_fingerprint
from .profile import count_flops, count_parameters

WHAT_IS_TIMED = "network and box decoding, without NMS"


@dataclass
class BenchResult:
    """One backend's numbers. ``latency_ms_*`` are per batch of ``batch`` images; ``flops`` is
    per image (``None`` when unknown); ``params_source`` says what ``params`` counts."""

    backend: str
    params: int
    params_source: str
    flops: int | None
    batch: int
    threads: int
    runs: int
    warmup: int
    latency_ms_median: float
    latency_ms_iqr: float
    images_per_s: float


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Milliseconds of ``runs`` calls of ``call`` after ``warmup`` untimed ones."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    times = []
    for index in range(warmup + runs):
        start = time.perf_counter()
        call()
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def _stats(times: list[float]) -> tuple[float, float]:
    """Median and interquartile range (75th minus 25th percentile), as :func:`profile_model`."""
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return float(statistics.median(times)), float(q3 - q1)


def _result(backend: str, params: int, source: str, flops: int | None, batch: int, threads: int, runs: int, warmup: int, times: list[float]) -> BenchResult:
    median, iqr = _stats(times)
    return BenchResult(backend, params, source, flops, batch, threads, runs, warmup, median, iqr, batch * 1000.0 / median)


def onnx_parameters(path: str | Path) -> int:
    """Elements of the floating-point initializers of an ONNX model (its weights)."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats))


def onnx_input(session, batch: int) -> tuple[np.ndarray, int]:
    """Random images for ``session``'s input at ``batch``, and the input size; refuses a batch
    that a fixed-batch model cannot take."""
    import onnx

    spec = session.get_inputs()[0]
    shape = spec.shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise ValueError(f"expected an input of shape [N, 3, S, S] with a fixed size, got {shape}")
    if isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch:
        raise ValueError(f"the ONNX model has a fixed batch of {shape[0]}; use --batch {shape[0]}, or export with --dynamic-batch")
    elem = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16, "tensor(double)": onnx.TensorProto.DOUBLE}
    if spec.type not in elem:
        raise ValueError(f"expected a floating-point image input, got {spec.type}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem[spec.type])
    rng = np.random.default_rng(0)
    return rng.random((batch, *shape[1:])).astype(dtype), int(shape[-1])


def bench_onnx(path: str | Path, *, batch: int = 1, threads: int = 1, runs: int = 50, warmup: int = 5, flops: int | None = None) -> BenchResult:
    """ONNX Runtime (CPU provider, ``threads`` intra-op threads) on ``path``."""
    session = ort_session(path, threads=threads)
    images, _ = onnx_input(session, batch)
    names = [o.name for o in session.get_outputs()]
    outputs = list(OUTPUT_NAMES) if set(OUTPUT_NAMES) <= set(names) else names
    input_name = session.get_inputs()[0].name
    times = time_calls(lambda: session.run(outputs, {input_name: images}), runs, warmup)
    return _result("onnxruntime", onnx_parameters(path), "ONNX initializers", flops, batch, threads, runs, warmup, times)


def bench_torch(model, input_size: int, *, batch: int = 1, threads: int = 1, runs: int = 50, warmup: int = 5) -> tuple[BenchResult, int]:
    """PyTorch (eval mode, no gradients, ``threads`` torch threads, restored afterwards) on the
    model's forward pass and decoding before NMS. Returns the result and the FLOPs per image."""
    params, _ = count_parameters(model)
    flops = count_flops(model, input_size)
    wrapper = ExportWrapper(model.eval(), input_size).eval()
    images = torch.rand(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    images = images.to(next(model.parameters()).device)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            times = time_calls(lambda: wrapper(images), runs, warmup)
    finally:
        torch.set_num_threads(previous)
    return _result("pytorch", params, "model parameters", flops, batch, threads, runs, warmup, times), flops


def bench(
    path: str,
    *,
    checkpoint: str | None = None,
    batch: int = 1,
    threads: int | None = None,
    runs: int = 50,
    warmup: int = 5,
) -> dict:
    """Bench a kdet checkpoint (``bundled:NAME`` too) in PyTorch and, exported on the fly to a
    temporary file, in ONNX Runtime; or an ``.onnx`` file in ONNX Runtime (and in PyTorch too
    when ``checkpoint``, the checkpoint it was exported from, is given: its fingerprint must
    match the file's ``kdet.weights_sha256``). Returns a JSON-ready dict with the settings and
    one :class:`BenchResult` per backend under ``results``."""
    from .checkpoint import load_detector

    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    threads = threads if threads is not None else torch.get_num_threads()
    results: list[BenchResult] = []
    if path.endswith(".onnx"):
        onnx_path = Path(path).expanduser()
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX file {onnx_path} not found")
        try:
            metadata = read_metadata(onnx_path)
        except Exception as error:  # onnx raises DecodeError and friends on a damaged file
            raise ValueError(f"{onnx_path}: cannot be read as an ONNX model ({error})") from None
        flops = None
        _, input_size = onnx_input(ort_session(onnx_path, threads=1), batch)  # refuses a batch it cannot take
        if checkpoint is not None:
            if "kdet.weights_sha256" not in metadata:
                raise ValueError(f"{onnx_path} has no kdet metadata: it cannot be matched with {checkpoint}; bench it without --checkpoint")
            model, payload = load_detector(checkpoint)
            if weights_fingerprint(model) != metadata["kdet.weights_sha256"]:
                raise ValueError(f"{onnx_path} was not exported from {checkpoint} (the weights differ); give the checkpoint it came from, or none")
            input_size = int(payload["input_size"])
            torch_result, flops = bench_torch(model, input_size, batch=batch, threads=threads, runs=runs, warmup=warmup)
            results.append(torch_result)
        results.append(bench_onnx(onnx_path, batch=batch, threads=threads, runs=runs, warmup=warmup, flops=flops))
    else:
        if checkpoint is not None:
            raise ValueError("--checkpoint goes with an .onnx file; a checkpoint is benched in PyTorch and ONNX Runtime by itself")
        model, payload = load_detector(path)
        input_size = int(payload["input_size"])
        torch_result, flops = bench_torch(model, input_size, batch=batch, threads=threads, runs=runs, warmup=warmup)
        results.append(torch_result)
        with tempfile.TemporaryDirectory(prefix="kdet-bench-") as folder:
            onnx_path = Path(folder) / "model.onnx"
            export_onnx(model, input_size, onnx_path, batch=batch, source=str(path))
            results.append(bench_onnx(onnx_path, batch=batch, threads=threads, runs=runs, warmup=warmup, flops=flops))
    return {
        "model": str(path),
        "checkpoint": checkpoint,
        "input_size": input_size,
        "batch": batch,
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "timed": WHAT_IS_TIMED,
        "input": INPUT_NAME,
        "results": [asdict(r) for r in results],
    }


def format_bench(report: dict) -> str:
    """The report as a few lines of text (what ``kdet bench`` prints without ``--json``)."""
    lines = [
        f"{report['model']}: {report['input_size']}x{report['input_size']} px, batch {report['batch']}, "
        f"{report['threads']} thread(s), median of {report['runs']} runs after {report['warmup']} warm-up ({report['timed']})"
    ]
    for r in report["results"]:
        flops = f"{r['flops'] / 1e9:.2f}G/image" if r["flops"] is not None else "-"
        lines.append(
            f"{r['backend']:<12} parameters {r['params'] / 1e6:.2f}M ({r['params_source']}), FLOPs {flops}, "
            f"latency {r['latency_ms_median']:.2f} ms (IQR {r['latency_ms_iqr']:.2f}), {r['images_per_s']:.1f} images/s"
        )
    return "\n".join(lines)
