"""Channel pruning of a trained detector (``kdet prune``) and the channel plan that rebuilds it.

:func:`prune_detector` removes a fraction of the channels of every prunable layer with
torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR
2023): channels coupled through concatenations, residual additions and normalisations go
together, ranked by the L1 norm of their weights (``l1``) or by a first-order Taylor estimate of
the loss change (``taylor``, from the gradients of the detector's own loss on a few training
batches). The head's output layers keep their channels (classes, boxes, anchors).

Two families are prunable: kdet's own ``yolo`` and ``ultralytics`` (YOLOv5, YOLOv8, YOLO11 and
YOLO26 detect networks, made of :data:`ULTRALYTICS_BLOCKS`). For the latter the graph is traced on
the Detect head's raw maps (no reshapes), and the channels whose count is structural keep it:

* the Detect head's class and box output convs (both branches of an end-to-end head) and DFL's
  fixed conv;
* attention (``Attention`` in C2PSA and in YOLO26's C3k2): its width is heads x head size and
  its output is reshaped to its input's channels, so its input and output channels, and the
  residual stream around it, stay. The graph sees each attention module as one node instead of
  tracing its reshapes and matrix products: torch-pruning reads those reshapes as flattens that
  map each channel index to several, on paths that loop through the matrix products, so the index
  sets grow without end and building one pruning group does not finish;
* the ``cv1`` of the CSP blocks (C2f, C3k2, C2PSA), whose output is cut into two equal halves
  (``chunk(2)`` / ``split((c, c))``): torch-pruning cannot tell which consumer reads which part of
  a split, so it cannot prune them apart. Their inner layers, their ``cv2`` and every other
  convolution are pruned.

The result is described by a channel plan (:func:`channel_plan`): for every module whose tensors
changed, its new sizes. It is stored in the model config (``model.channels``), so
:func:`kdet.models.build_model` rebuilds the pruned architecture (:func:`apply_channel_plan`)
and every command that reads a checkpoint, and training from it, works unchanged.

torch-pruning is an optional dependency (``pip install kdet[prune]``), imported by
:func:`prune_detector` only.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..structures import Targets
from .detector import Detector

INSTALL_HINT = "pip install 'kdet[prune]' (or pip install torch-pruning)"
PRUNABLE_FAMILIES = ("yolo", "ultralytics")
# the Ultralytics blocks whose channel structure kdet prune knows (YOLOv5/v8/11/26 detect networks)
ULTRALYTICS_BLOCKS = ("Conv", "C2f", "C3k2", "C3", "SPPF", "C2PSA", "Upsample", "Concat", "Detect")
ATTRIBUTES = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.ConvTranspose2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",),
}


def output_layers(model: Detector) -> list[nn.Module]:
    """The layers whose output channels are head maps (classes, boxes, scores): never pruned."""
    if model.family == "yolo":
        if model.head_kind == "dfl":
            return [branch[-1] for branch in (*model.head.cls_branches, *model.head.box_branches)]
        return list(model.head.convs)
    if model.family == "ultralytics":
        detect = model.net.model[-1]
        heads = [getattr(detect, name, None) for name in ("cv2", "cv3", "one2one_cv2", "one2one_cv3")]
        return [branch[-1] for head in heads if head is not None for branch in head] + [detect.dfl]
    raise ValueError(f"kdet prune supports the {' and '.join(PRUNABLE_FAMILIES)} families, not {model.family}")


# ---------------------------------------------------------------------------------------------
# The Ultralytics family
# ---------------------------------------------------------------------------------------------
class _Opaque(torch.autograd.Function):
    """``out`` (computed from ``x`` by a block) as one autograd node whose only input is ``x``:
    the dependency graph sees the block, not the operations inside it."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor) -> Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def _opaque_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return _Opaque.apply(args[0], output.detach())


def _c2psa_chunked(self, x: Tensor) -> Tensor:
    """C2PSA's forward with ``chunk(2)`` for ``split((c, c))``, the same halves, for tracing:
    torch-pruning gives a split one part per consumer, and the two sizes ``split`` records run out
    (IndexError) when the halves have more consumers; ``chunk`` records one size for all."""
    a, b = self.cv1(x).chunk(2, 1)
    return self.cv2(torch.cat((a, self.m(b)), 1))


def _fixed_pruner(tp):
    """torch-pruning's pruner for an attention module: one node whose input and output channels
    are tied and never removed (the module is among the ignored layers, so no group that reaches
    it is pruned)."""

    class FixedChannels(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            raise RuntimeError(f"{type(layer).__name__} keeps its channels")

        prune_in_channels = prune_out_channels  # in and out channels are tied

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.proj.conv.out_channels

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.qkv.conv.in_channels

    return FixedChannels()


def _ultralytics_maps(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The Detect head's raw class and box maps, every branch: plain tensors, no reshapes."""
    y = model._layers(model.normalize(images))
    detect = model.net.model[-1]
    feats = [y[j] for j in detect.f]
    heads = [(detect.cv2, detect.cv3)] + ([(detect.one2one_cv2, detect.one2one_cv3)] if model.end2end else [])
    return [t for box, cls in heads for maps in model._branch(feats, box, cls) for t in maps]


def _ultralytics_pruning(model: Detector, tp) -> dict[str, Any]:
    """MetaPruner's arguments for an Ultralytics network, and the context its graph is traced in."""
    from ultralytics.nn.modules.block import C2PSA, Attention, C2f

    unknown = sorted({type(m).__name__ for m in model.net.model} - set(ULTRALYTICS_BLOCKS))
    if unknown:
        raise ValueError(f"kdet prune does not know the channel structure of the Ultralytics block{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)}; it prunes networks made of {', '.join(ULTRALYTICS_BLOCKS)} (YOLOv5, "
                         f"YOLOv8, YOLO11 and YOLO26 detect)")
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    csp = [m for m in model.modules() if isinstance(m, (C2f, C2PSA))]

    @contextlib.contextmanager
    def tracing() -> Iterator[None]:
        hooks = [m.register_forward_hook(_opaque_output) for m in attention]
        for m in csp:
            if isinstance(m, C2PSA):
                m.forward = types.MethodType(_c2psa_chunked, m)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for m in csp:
                vars(m).pop("forward", None)

    return {"ignored_layers": output_layers(model) + attention + [m.cv1 for m in csp],
            "customized_pruners": {Attention: _fixed_pruner(tp)}, "forward_fn": _ultralytics_maps, "tracing": tracing}


def channel_plan(pruned: nn.Module, original: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {attribute: value, "tensors": {name: shape}}}`` for every module of
    ``pruned`` whose parameters or buffers differ in shape from ``original``'s (the same
    architecture before pruning)."""
    before = dict(original.named_modules())
    plan: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        reference = before.get(name)
        tensors = {key: list(value.shape) for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                   if value is not None and reference is not None and tuple(getattr(reference, key).shape) != tuple(value.shape)}
        if not tensors:
            continue
        entry: dict[str, Any] = {"tensors": tensors}
        for kind, names in ATTRIBUTES.items():
            if isinstance(module, kind):
                entry.update({key: list(v) if isinstance(v, tuple) else v for key in names if (v := getattr(module, key, None)) is not None})
        plan[name] = entry
    return plan


def apply_channel_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Give ``model`` (built unpruned) the sizes of ``plan``: the tensors are replaced by ones of
    the planned shapes (their values come from the checkpoint loaded next)."""
    modules = dict(model.named_modules())
    for name, entry in plan.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"model.channels names a module {name!r} this model does not have; the channel plan belongs to "
                             f"another architecture")
        for key, value in entry.items():
            if key == "tensors":
                continue
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
        for key, shape in entry["tensors"].items():
            if key in module._parameters:
                old = module._parameters[key]
                module._parameters[key] = nn.Parameter(torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad)
            elif key in module._buffers:
                module._buffers[key] = torch.zeros(shape, dtype=module._buffers[key].dtype)
    return model


def prune_detector(model: Detector, input_size: int, ratio: float, *, method: str = "l1",
                   batches: list[tuple[Tensor, Targets]] | None = None, log: Callable[[str], None] = print) -> Detector:
    """Prune ``ratio`` of the channels of every prunable layer of ``model`` in place and return it.
    ``taylor`` needs ``batches`` of training images and targets for the gradients."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ValueError(f"kdet prune needs torch-pruning, which is not installed; {INSTALL_HINT}") from None
    if not 0 < ratio < 1:
        raise ValueError(f"--ratio must lie between 0 and 1 (the fraction of channels removed), got {ratio}")
    if method not in ("l1", "taylor"):
        raise ValueError(f"--method must be l1 or taylor, got {method!r}")
    example = torch.zeros(1, 3, input_size, input_size)

    def forward(module: nn.Module, images: Tensor) -> list[Tensor]:
        head = module(images).head
        return [t for level in head for t in (level.cls_logits, level.box, level.score) if t is not None]

    if model.family == "ultralytics":
        options = _ultralytics_pruning(model, tp)
        tracing = options.pop("tracing")
    else:
        options, tracing = {"ignored_layers": output_layers(model), "forward_fn": forward}, contextlib.nullcontext
    importance = tp.importance.TaylorImportance() if method == "taylor" else tp.importance.MagnitudeImportance(p=1)
    model.eval()
    with tracing():
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio, in_channel_groups={},
                                      out_channel_groups={}, **options)
    if method == "taylor":
        if not batches:
            raise ValueError("--method taylor ranks channels by the gradients of the detector's loss: it needs training data")
        model.train()
        model.zero_grad()
        for images, targets in batches:
            model(images, targets).loss.backward()
        model.eval()
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    model.zero_grad(set_to_none=True)
    after = sum(p.numel() for p in model.parameters())
    log(f"pruned {ratio:.0%} of the channels ({method}): {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters")
    return model
