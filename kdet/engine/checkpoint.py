"""Checkpoints: written atomically, self-describing (a checkpoint rebuilds its own model)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from .. import __version__
from ..config import ModelConfig
from ..bundled import BUNDLED_MODELS, resolve_bundled
from ..models import Detector, build_model
from ..models.weights import compare_state, describe_mismatch, to_stderr

FORMAT = "kdet-detector/1"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only when the block ends without an error:
    written to a temporary ``.<name>.*.tmp`` in the same folder, flushed to the disk, given the
    usual mode and renamed over ``path``. A crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_file`."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def model_payload(model: Detector, model_config: ModelConfig, input_size: int, *, extra: dict | None = None) -> dict:
    """What is needed to rebuild and run ``model``: its resolved config, classes, input size and weights."""
    payload = {
        "format": FORMAT,
        "kdet_version": __version__,
        "model_config": model_config.model_dump(mode="json"),
        "class_names": list(model.class_names),
        "input_size": input_size,
        "state_dict": model.state_dict(),
    }
    payload.update(extra or {})
    return payload


def half_precision(payload: dict) -> dict:
    """A copy of a detector checkpoint with fp16 weights: half the size on disk;
    :func:`load_detector` casts them back to fp32."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    return {**payload, "state_dict": state}


def load_checkpoint(path: str | Path, *, log: Callable[[str], None] = to_stderr) -> dict:
    """Read a kdet detector checkpoint (a path or ``bundled:NAME``). A run directory stands for
    its ``best.pt`` (``log`` says so); a run's ``last.pt`` (its training state) is refused with
    the path of the ``best.pt`` to use instead."""
    path = resolve_bundled(path, BUNDLED_MODELS, "checkpoint")
    if path.is_dir():
        best = path / "best.pt"
        if not best.is_file():
            state = " (it holds last.pt: the run has not evaluated an epoch yet, or is still running)" if (path / "last.pt").is_file() else ""
            raise FileNotFoundError(f"checkpoint {path} is a folder without best.pt{state}; give a detector checkpoint such as RUN_DIR/best.pt")
        log(f"{path} is a run directory: using its best.pt ({best})")
        path = best
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(f"{path}: cannot be read as a checkpoint ({error}); is the file complete?") from None
    if isinstance(payload, dict) and "run_state" in payload and "optimizer" in payload:
        best = path.parent / "best.pt"
        raise ValueError(f"{path}: this is a run's training state (what --resume reads), not a detector checkpoint; use "
                         f"{best if best.is_file() else 'the best.pt beside it'} (or the run directory {path.parent})")
    from ..models.ultralytics import is_ultralytics_checkpoint, kdet_payload

    if is_ultralytics_checkpoint(payload):  # an Ultralytics best.pt: read as the ultralytics family
        return kdet_payload(payload, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a kdet detector checkpoint (expected format {FORMAT!r})")
    return payload


def load_detector(path: str | Path, *, map_location: str | torch.device = "cpu",
                  log: Callable[[str], None] = to_stderr) -> tuple[Detector, dict]:
    """Rebuild the detector saved in ``path`` and load its weights (fp16 checkpoints are cast
    back to fp32). Returns ``(model in eval mode, payload)``. Raises ``ValueError`` naming the
    missing, unexpected and reshaped tensors when the weights do not fit the model the
    checkpoint's own config describes."""
    payload = load_checkpoint(path, log=log)
    config = ModelConfig.model_validate(payload["model_config"])
    # weights come from this checkpoint, not from the files the config once named
    config = config.model_copy(update={"pretrained_backbone": None, "weights": None})
    model = build_model(config, payload["class_names"], payload["input_size"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    missing, unexpected, reshaped = compare_state(model.state_dict(), state)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path}: its weights do not fit the model its own config describes ({config.family} {config.backbone}-"
            f"{config.size}, {len(payload['class_names'])} classes): {describe_mismatch(missing, unexpected, reshaped)}. "
            f"The file was edited or written by another kdet version; use the run's best.pt as kdet wrote it, or train again"
        )
    model.load_state_dict(state)
    return model.to(map_location).eval(), payload


# ---------------------------------------------------------------------------------------------
# A run directory's training state, and what an interrupted run leaves behind
# ---------------------------------------------------------------------------------------------
TRAINING_STATE_KEYS = ("config", "model_config", "model", "optimizer", "scheduler", "run_state", "rng")


def load_training_state(path: Path) -> dict:
    """A run's ``last.pt``, for ``--resume``. Raises ``ValueError`` naming the file when it
    cannot be read or lacks what a resume needs (a damaged or foreign file)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(f"--resume: {path} cannot be read ({error}). last.pt is replaced atomically, so an interrupted "
                         f"write cannot cause this: the file was damaged or replaced afterwards. Restore it, or start a new "
                         f"run (another --out, or remove {path})") from None
    lacking = [key for key in TRAINING_STATE_KEYS if not isinstance(saved, dict) or key not in saved]
    if lacking:
        raise ValueError(f"--resume: {path} is not the training state kdet writes (it lacks {', '.join(lacking)}); restore "
                         f"the run's own last.pt, or start a new run")
    return saved


def tidy_run_dir(out_dir: Path, last_epoch: int, log: Callable[[str], None]) -> None:
    """Before a run (new or resumed) trains in ``out_dir``, whose ``last.pt`` holds ``last_epoch``
    completed epochs (0: none): remove the temporary files a process killed while writing a
    checkpoint left (:func:`atomic_file`'s ``.<name>.*.tmp``), and drop the ``metrics.jsonl``
    records of epochs after ``last_epoch``, written before the kill but not checkpointed: the
    run trains those epochs again and records them anew."""
    for name in ("last.pt", "best.pt"):
        for stale in sorted(out_dir.glob(f".{name}.*.tmp")):
            stale.unlink()
            log(f"removed {stale.name}, a temporary file left by a run killed while writing {name}")
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    kept, dropped = [], []
    for line in lines:
        try:
            epoch = json.loads(line).get("epoch")
        except (json.JSONDecodeError, AttributeError):
            epoch = None  # a line cut short by the kill
        (kept if isinstance(epoch, int) and epoch <= last_epoch else dropped).append(line)
    if dropped:
        with atomic_file(metrics) as handle:
            handle.write("".join(f"{line}\n" for line in kept).encode())
        log(f"metrics.jsonl: removed {len(dropped)} record(s) written after the last checkpoint (epoch {last_epoch}); "
            f"those epochs are trained and recorded again")
