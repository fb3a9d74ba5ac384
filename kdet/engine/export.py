"""ONNX export of a kdet detector, and the NMS post-step that goes with it.

The exported graph takes ``images`` float32 ``[N, 3, S, S]`` in ``[0, 1]`` (letterboxed as kdet
does; the mean/std normalisation is inside the graph) and gives, before any NMS:

* ``boxes`` ``[N, K, 4]``: xyxy in input pixels, clipped to ``[0, S]``;
* ``scores`` ``[N, K, C]``: per-class scores, YOLO objectness x class probability (the DFL
  head: the class probability), FCOS ``sqrt(class probability x centerness)``,

decoded exactly as the PyTorch model decodes before NMS (YOLO: :func:`level_boxes_and_scores`
per level, then concatenation and clipping, as :func:`decode_yolo`; FCOS: :func:`decode_ltrb`
per level, then concatenation and clipping, as torchvision's ``postprocess_detections``).
``K`` is every location (x anchor) of every level.

NMS is not in the graph: :func:`postprocess` applies it to the outputs of ONNX Runtime with the
selection rules of kdet's YOLO decoding (:func:`select_detections`), so for a YOLO model
ONNX Runtime + :func:`postprocess` gives the detections of ``model(images, decode=True)``.
For FCOS the boxes and scores are torchvision's, but torchvision selects candidates per level
(the ``topk_candidates`` best of each level above the threshold) where :func:`postprocess` keeps
the 2000 best over all levels; the two agree whenever no level has more than 1000 candidates above
the score threshold and all levels together no more than 2000.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from .. import __version__
from ..models import Detector
from ..models.fcos import decode_ltrb
from ..models.torchvision_detectors import retinanet_boxes_and_scores
from ..models.yolo import level_boxes_and_scores, select_detections
from ..structures import Detections, HeadLevel

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores")
DEFAULT_OPSET = 17
EXPORT_FAMILIES = ("yolo", "fcos", "retinanet", "ultralytics")
MIN_OPSET = 11  # Range (the decoding grids) needs opset 11
try:  # the highest opset torch's TorchScript-based exporter can write (20 in torch 2.3 .. 2.14)
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:  # pragma: no cover - private module moved
    MAX_OPSET = 17

BOX_FORMAT = "xyxy in input pixels (0..input_size), clipped to the image; before NMS"
NMS_NOTE = (
    "NMS is not in the graph: apply kdet.engine.export.postprocess(boxes, scores, score_thresh, nms_iou, max_det) "
    "(class-wise NMS, kdet's YOLO selection rules)"
)


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted ``max |ONNX Runtime - PyTorch|`` for ``boxes`` (input pixels) and ``scores``."""

    boxes: float
    scores: float


# fp32: measured differences are ~1e-5 px and ~1e-7 in score (operation order only).
FP32_TOLERANCE = Tolerance(boxes=1e-2, scores=1e-4)
# fp16 weights and arithmetic: a coordinate near 320 px is stored to 0.25 px in fp16, and the
# rounding of every layer adds up; scores keep about three decimals.
FP16_TOLERANCE = Tolerance(boxes=2.0, scores=1e-2)


# ---------------------------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------------------------
def decode_levels(family: str, head: list[HeadLevel], image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Boxes ``[N, K, 4]`` (clipped to ``image_size`` = ``(H, W)``) and scores ``[N, K, C]`` of
    every level, as the model's own decoding computes them before NMS."""
    if family == "yolo":
        decode = level_boxes_and_scores
    elif family == "fcos":
        decode = decode_ltrb
    elif family == "retinanet":
        decode = retinanet_boxes_and_scores
    else:
        raise ValueError(f"ONNX export supports the {', '.join(EXPORT_FAMILIES)} families, not {family!r}")
    decoded = [decode(level) for level in head]
    boxes = clip_boxes_to_image(torch.cat([b for b, _ in decoded], 1), image_size)
    scores = torch.cat([s for _, s in decoded], 1)
    return boxes, scores


class ExportWrapper(nn.Module):
    """``images [N, 3, S, S]`` in ``[0, 1]`` -> ``(boxes [N, K, 4], scores [N, K, C])``: the
    detector's forward pass and its decoding before NMS; what the ONNX graph computes."""

    def __init__(self, model: Detector, input_size: int) -> None:
        super().__init__()
        if model.family not in EXPORT_FAMILIES:
            raise ValueError(f"ONNX export supports the {', '.join(EXPORT_FAMILIES)} families, not {model.family!r}"
                             + (" (a two-stage detector: its boxes come from proposals chosen by NMS inside the network)"
                                if getattr(model, "two_stage", False) else ""))
        self.model = model
        self.input_size = int(input_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if hasattr(self.model, "boxes_and_scores"):  # a family that decodes in its own way (ultralytics)
            return self.model.boxes_and_scores(images)
        head = self.model(images).head
        return decode_levels(self.model.family, head, (self.input_size, self.input_size))


def for_export(model: Detector, input_size: int) -> Detector:
    """``model`` as it is traced at ``input_size``: where a part of it specialises on a fixed
    input size (``fix_input_size``: a timm transformer's position embeddings), a copy that
    does, with the same outputs at that size; else ``model`` itself."""
    if not any(hasattr(module, "fix_input_size") for module in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fix_input_size"):
            module.fix_input_size(input_size)
    return model


# ---------------------------------------------------------------------------------------------
# NMS, after ONNX Runtime
# ---------------------------------------------------------------------------------------------
def postprocess(
    boxes: np.ndarray | Tensor,
    scores: np.ndarray | Tensor,
    score_thresh: float = 0.001,
    nms_iou: float = 0.6,
    max_det: int = 300,
) -> list[Detections]:
    """Detections from the exported model's outputs (numpy arrays from ONNX Runtime, or tensors):
    ``boxes [N, K, 4]`` and ``scores [N, K, C]`` (or one image, ``[K, 4]`` and ``[K, C]``).

    Per image, as kdet's YOLO decoding (:func:`kdet.models.yolo.select_detections`): every
    (box, class) pair with score above ``score_thresh`` (a box may carry several classes), the
    2000 best, class-wise NMS at ``nms_iou``, at most ``max_det``. Returns one
    :class:`~kdet.structures.Detections` per image (boxes in input pixels; map them back to the
    original image with :meth:`kdet.data.pipeline.Letterbox.to_original`).
    """
    boxes = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, Tensor) else boxes).float()
    scores = torch.as_tensor(np.asarray(scores) if not isinstance(scores, Tensor) else scores).float()
    if boxes.dim() == 2 and scores.dim() == 2:
        boxes, scores = boxes[None], scores[None]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or scores.dim() != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(
            f"expected boxes [N, K, 4] and scores [N, K, C] with the same N and K, got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    return [select_detections(boxes[i], scores[i], score_thresh, nms_iou, max_det) for i in range(len(boxes))]


# ---------------------------------------------------------------------------------------------
# writing the file
# ---------------------------------------------------------------------------------------------
def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, shapes and fp32 values): ties an exported file to
    the checkpoint it came from (``kdet bench FILE.onnx --checkpoint CKPT`` checks it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def onnx_metadata(model: Detector, input_size: int, *, fp16: bool, dynamic_batch: bool, batch: int, opset: int, source: str = "") -> dict[str, str]:
    """What kdet writes into the ONNX model's ``metadata_props`` (all values are strings)."""
    scores = {
        "yolo": "class probability" if getattr(model, "head_kind", "anchor") == "dfl" else "objectness x class probability",
        "fcos": "sqrt(class probability x centerness)",
        "retinanet": "class probability",
        "ultralytics": "class probability",
    }[model.family]
    return {
        "kdet.version": __version__,
        "kdet.source": source,
        "kdet.family": model.family,
        "kdet.class_names": json.dumps(list(model.class_names)),
        "kdet.input_size": str(int(input_size)),
        "kdet.input": f"{INPUT_NAME}: float32 [N, 3, {input_size}, {input_size}] RGB in [0, 1], letterboxed (grey 114 padding); normalisation is in the graph",
        "kdet.batch": "dynamic" if dynamic_batch else str(batch),
        "kdet.box_format": f"boxes: float32 [N, K, 4] {BOX_FORMAT}",
        "kdet.scores": f"scores: float32 [N, K, C] per class ({scores}), classes in kdet.class_names order",
        "kdet.nms": NMS_NOTE,
        "kdet.precision": "fp16 (weights and arithmetic; inputs and outputs fp32)" if fp16 else "fp32",
        "kdet.opset": str(opset),
        "kdet.weights_sha256": weights_fingerprint(model),
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (``{}`` when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def _torch_onnx_export(wrapper: nn.Module, example: Tensor, path: Path, *, opset: int, dynamic_batch: bool) -> None:
    """``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``).

    Why not the default of torch >= 2.9, the dynamo-based exporter (``dynamo=True``)? Both give
    the same numbers on these models, but on torch 2.14 the dynamo one needs the extra packages
    ``onnxscript`` and ``onnx_ir``, takes 12-17 s for a tiny 64 px model on a CPU where the
    TorchScript exporter takes under 1 s (``kdet bench`` exports on the fly), writes progress
    lines to stdout, and for FCOS silently keeps opset 18 when 17 is asked (its version converter
    fails on GroupNorm). The TorchScript exporter works offline on CPU with torch alone, honours
    ``--opset``, and exists in every torch kdet accepts (2.3 to 2.14); ``dynamo=`` itself only
    exists from torch 2.5. It is deprecated upstream: its warnings are silenced here, as are the
    tracer's, which are expected (the grids depend on the fixed input size, not on the batch).
    """
    kwargs = dict(
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        do_constant_folding=True,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(wrapper, (example,), str(path), **kwargs)


def _topological_sort(graph) -> None:
    """Order ``graph.node`` so every node comes after the nodes it reads (ONNX requires it;
    onnxruntime's fp16 converter appends the Cast nodes of kept fp32 inputs at the end)."""
    available = {value.name for value in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"cannot order the ONNX graph: node {rest[0].name or rest[0].op_type} reads a value nothing produces")
        pending = rest
    nodes = [type(node)() for node in ordered]
    for copy, node in zip(nodes, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


def convert_to_fp16(model):
    """fp16 weights and arithmetic, inputs and outputs kept fp32 (``keep_io_types``), with
    onnxruntime's own converter (``onnxruntime.transformers.float16``, shipped with
    onnxruntime). ONNX Runtime's CPU provider runs the result (more slowly than fp32 on CPUs
    without fp16 arithmetic: the point is the halved file, and GPU providers)."""
    import logging

    from onnxruntime.transformers.float16 import convert_float_to_float16

    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    _topological_sort(half.graph)
    return half


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset} is not supported: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and, when it verified, how far ONNX Runtime was from PyTorch."""

    path: Path
    bytes: int
    fp16: bool
    dynamic_batch: bool
    batch: int
    opset: int
    num_boxes: int
    verified_images: int = 0
    max_box_diff: float | None = None
    max_score_diff: float | None = None
    tolerance: Tolerance | None = None


def export_onnx(
    model: Detector,
    input_size: int,
    out: str | Path,
    *,
    dynamic_batch: bool = False,
    batch: int = 1,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    source: str = "",
    verify_with: Tensor | None = None,
) -> ExportReport:
    """Write ``model`` as ONNX to ``out``: inputs/outputs as the module docstring says, batch
    ``batch`` or dynamic, fp16 weights and arithmetic with ``fp16``, kdet's metadata in
    ``metadata_props``.

    The file is written to a temporary file beside ``out``, checked with
    ``onnx.checker.check_model`` and, given ``verify_with`` (images ``[N, 3, S, S]``), run with
    ONNX Runtime and compared to PyTorch; only then is it renamed over ``out``. A difference
    above :data:`FP32_TOLERANCE` (:data:`FP16_TOLERANCE` for fp16) raises ``ValueError`` and
    leaves ``out`` as it was.
    """
    import onnx

    _check_opset(opset)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    wrapper = ExportWrapper(for_export(model, input_size), input_size).eval()
    parameter = next(model.parameters())
    # a dynamic batch is traced at batch 2 so nothing specialises on a batch of 1
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2 if dynamic_batch else batch, 3, input_size, input_size, generator=generator).to(parameter.device)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            _torch_onnx_export(wrapper, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
            num_boxes = int(wrapper(example[:1])[0].shape[1])
        proto = onnx.load(str(tmp))
        if fp16:
            proto = convert_to_fp16(proto)
        proto.doc_string = f"kdet {model.family} detector; boxes {BOX_FORMAT}. {NMS_NOTE}"
        del proto.metadata_props[:]
        metadata = onnx_metadata(model, input_size, fp16=fp16, dynamic_batch=dynamic_batch, batch=batch, opset=opset, source=source)
        onnx.helper.set_model_props(proto, metadata)
        with open(tmp, "wb") as handle:
            handle.write(proto.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as error:  # onnx.checker.ValidationError and friends
            raise ValueError(f"the exported ONNX model fails onnx.checker: {error}") from None
        report = ExportReport(out, tmp.stat().st_size, fp16, dynamic_batch, batch, opset, num_boxes)
        if verify_with is not None:
            box_diff, score_diff = compare_with_pytorch(model, input_size, tmp, verify_with)
            tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
            report.verified_images, report.max_box_diff, report.max_score_diff, report.tolerance = (
                len(verify_with), box_diff, score_diff, tolerance)
            if not (box_diff <= tolerance.boxes and score_diff <= tolerance.scores):
                raise ValueError(
                    f"ONNX Runtime disagrees with PyTorch on {len(verify_with)} image(s): boxes max |diff| {box_diff:.3g} px "
                    f"(tolerance {tolerance.boxes:g}), scores {score_diff:.3g} (tolerance {tolerance.scores:g}); {out} not written"
                )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report


# ---------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------
def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU provider with ``threads`` intra-op threads (ONNX
    Runtime's default when ``None``), sequential execution, warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail ...)
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({str(error).strip().splitlines()[0]})") from None


def run_session(session, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes, scores)`` of ``images`` through an exported model; a model with a fixed batch
    gets the images in batches of that size."""
    images = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    images = images.astype(np.float32, copy=False)
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else len(images)
    if len(images) % step:
        raise ValueError(f"the model takes batches of {step}; got {len(images)} image(s)")
    outputs = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i : i + step]}) for i in range(0, len(images), step)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


@torch.no_grad()
def compare_with_pytorch(model: Detector, input_size: int, onnx_path: str | Path, images: Tensor) -> tuple[float, float]:
    """``(max |boxes diff| in pixels, max |scores diff|)`` between ONNX Runtime on ``onnx_path``
    and the PyTorch model decoded before NMS, on ``images [N, 3, S, S]``."""
    wrapper = ExportWrapper(model.eval(), input_size).eval()
    boxes, scores = wrapper(images.to(next(model.parameters()).device))
    ort_boxes, ort_scores = run_session(ort_session(onnx_path, threads=1), images)
    box_diff = float(np.abs(ort_boxes.astype(np.float64) - boxes.cpu().double().numpy()).max())
    score_diff = float(np.abs(ort_scores.astype(np.float64) - scores.cpu().double().numpy()).max())
    return box_diff, score_diff


def verification_images(class_names: list[str], input_size: int, count: int = 4, *, seed: int = 0) -> tuple[Tensor, str]:
    """``count`` images ``[count, 3, S, S]`` in ``[0, 1]`` to compare ONNX Runtime and PyTorch on,
    and where they came from: the first test images of the bundled BCCD when the model's
    classes are BCCD's (letterboxed as kdet does), else uniform random images."""
    from ..data import read_dataset, resolve_data_path
    from ..data.pipeline import Letterbox, letterbox_image, load_image

    index = None
    try:
        index = read_dataset(resolve_data_path("bundled:bccd"), verify_images=False)
    except Exception:  # the bundled copy missing from an install: fall back to random images
        pass
    if index is not None and sorted(index.class_names) == sorted(class_names):
        records = (index.splits.get("test") or index.all_records())[:count]
        batch = []
        for record in records:
            image = load_image(record.path)
            batch.append(letterbox_image(image, Letterbox.fit(image.shape[2], image.shape[1], input_size)))
        return torch.stack(batch).float().div(255), f"{len(batch)} bundled BCCD test image(s)"
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, input_size, input_size, generator=generator), f"{count} random image(s)"


def default_output(checkpoint: str, fp16: bool = False) -> Path:
    """``runs/x/best.pt`` -> ``runs/x/best.onnx`` (``best.fp16.onnx`` with fp16);
    ``bundled:NAME`` -> ``NAME.onnx`` in the current directory."""
    suffix = ".fp16.onnx" if fp16 else ".onnx"
    if str(checkpoint).startswith("bundled:"):
        return Path(str(checkpoint).removeprefix("bundled:") + suffix)
    path = Path(checkpoint).expanduser()
    return path.with_name(path.stem + suffix)


def export_checkpoint(
    checkpoint: str,
    out: str | Path | None = None,
    *,
    dynamic_batch: bool = False,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    verify_count: int = 4,
) -> tuple[ExportReport, str]:
    """Export a kdet checkpoint (a path or ``bundled:NAME``) and verify it on ``verify_count``
    images (see :func:`verification_images`). ``out``: the file to write, or an existing folder
    to write the default name into (:func:`default_output`). Returns the report and where the
    images came from."""
    from .checkpoint import load_detector

    _check_opset(opset)
    target = Path(out) if out is not None else default_output(checkpoint, fp16)
    if target.is_dir():  # decided before the export runs, not when renaming onto the folder
        target = target / default_output(checkpoint, fp16).name
    model, payload = load_detector(checkpoint)
    input_size = int(payload["input_size"])
    images, source = verification_images(model.class_names, input_size, verify_count)
    report = export_onnx(
        model, input_size, target,
        dynamic_batch=dynamic_batch, fp16=fp16, opset=opset, source=str(checkpoint), verify_with=images,
    )
    return report, source
