"""Loading a weights file into a module: completely, or only where the user allowed a partial
load. A file that fits a model only in part (another size, another backbone) would otherwise
leave most of the model at its random initialisation without a word."""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

Log = Callable[[str], None]


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def compare_state(own: dict[str, torch.Tensor], given: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Keys of ``own`` (a module's state dict) that ``given`` lacks, keys of ``given`` that
    ``own`` lacks, and shared keys whose shapes differ (``name [given shape] vs [own shape]``)."""
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    reshaped = [f"{k} {list(given[k].shape)} vs {list(own[k].shape)}" for k in own
                if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, reshaped


def describe_mismatch(missing: list[str], unexpected: list[str], reshaped: list[str], *, shown: int = 3) -> str:
    """``"N missing (e.g. a, b), M unexpected (e.g. ...), K with another shape (e.g. ...)"``:
    what a state dict lacks, has too many of, and has in other shapes, counted."""
    parts = []
    for items, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "with another shape")):
        if items:
            more = ", ..." if len(items) > shown else ""
            parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:shown])}{more})")
    return ", ".join(parts)


def load_state(
    module: nn.Module, state: dict[str, Any], *, what: str, source: str, allow_partial: bool, option: str, log: Log = to_stderr
) -> int:
    """Load ``state`` into ``module`` and say how many tensors it loaded (through ``log``).

    A state that fits completely is loaded as it is. One that does not (missing, unexpected or
    reshaped tensors) is refused with a ``ValueError`` that counts and names them, unless
    ``allow_partial``: then the tensors that match by name and shape are loaded, the others keep
    their initialisation, and the log line counts what was left out. ``what`` names the config
    key the file came from (``model.weights``), ``option`` the key that allows a partial load.
    Returns the number of tensors loaded. A state with no tensor matching at all is always
    refused: it is the wrong file.
    """
    own = module.state_dict()
    missing, unexpected, reshaped = compare_state(own, state)
    matched = {k: v for k, v in state.items() if k in own and hasattr(v, "shape") and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise ValueError(
            f"{what}: no tensor in {source} matches the model by name and shape (file has e.g. {list(state)[:3]}, "
            f"model expects e.g. {list(own)[:3]}); is it the right file?"
        )
    mismatch = describe_mismatch(missing, unexpected, reshaped)
    if mismatch and not allow_partial:
        raise ValueError(
            f"{what}: {source} does not fit the model: {len(matched)} of the model's {len(own)} tensors match by name and "
            f"shape; {mismatch}. Give the file made for this model (same family, backbone, size, classes), or set "
            f"{option}: true to load the {len(matched)} matching tensors and leave the rest at their initialisation"
        )
    module.load_state_dict(matched, strict=False)
    log(f"{what}: loaded {len(matched)}/{len(own)} tensors from {source}"
        + (f" (partial load, {option}: true; not loaded: {mismatch})" if mismatch else ""))
    return len(matched)
