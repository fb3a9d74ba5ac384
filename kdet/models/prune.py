"""Channel pruning of a trained detector (``kdet prune``) and the channel plan that rebuilds it.

:func:`prune_detector` removes a fraction of the channels of every prunable layer with
torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR
2023): channels coupled through concatenations, residual additions and normalisations go
together, ranked by the L1 norm of their weights (``l1``) or by a first-order Taylor estimate of
the loss change (``taylor``, from the gradients of the detector's own loss on a few training
batches). The head's output layers keep their channels (classes, boxes, anchors).

The result is described by a channel plan (:func:`channel_plan`): for every module whose tensors
changed, its new sizes. It is stored in the model config (``model.channels``), so
:func:`kdet.models.build_model` rebuilds the pruned architecture (:func:`apply_channel_plan`)
and every command that reads a checkpoint, and training from it, works unchanged.

torch-pruning is an optional dependency (``pip install kdet[prune]``), imported by
:func:`prune_detector` only.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..structures import Targets
from .detector import Detector

INSTALL_HINT = "pip install 'kdet[prune]' (or pip install torch-pruning)"
PRUNABLE_FAMILIES = ("yolo",)
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
    raise ValueError(f"kdet prune supports the {', '.join(PRUNABLE_FAMILIES)} families, not {model.family}")


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
    ignored = output_layers(model)
    example = torch.zeros(1, 3, input_size, input_size)

    def forward(module: nn.Module, images: Tensor) -> list[Tensor]:
        head = module(images).head
        return [t for level in head for t in (level.cls_logits, level.box, level.score) if t is not None]

    importance = tp.importance.TaylorImportance() if method == "taylor" else tp.importance.MagnitudeImportance(p=1)
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio, ignored_layers=ignored,
                                  forward_fn=forward)
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
