"""The pieces a training run is assembled from: data, model configuration, optimiser and
learning-rate schedule, the per-epoch loader, random-state snapshots, and the record of which
code ran. :mod:`kdet.engine.trainer` puts them together; ``kdet cache``, ``kdet check`` and the
report reuse them so every command reads data and settings the same way.
"""
from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from ..config import Config, ConfigError, ModelConfig, config_to_dict
from ..data import read_dataset, resolve_data_path
from ..data.labelled import keep_labelled, labelled_line, labelled_record
from ..data.pipeline import DetectionDataset, collate
from ..models import Detector
from ..models.anchors import DEFAULT_ANCHORS, best_possible_recall, kmeans_anchors
from ..models.weights import load_state
from ..structures import DatasetIndex
from .checkpoint import load_checkpoint

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available here; use auto or cpu")
    return device


def amp_settings(amp: str, device: torch.device, log: Log) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, whether a GradScaler is needed)`` for ``train.amp`` on ``device``.
    fp16 is for CUDA; on the CPU it trains in fp32 as ``train.amp: true`` always did there, and
    says so (bf16 is the CPU's mixed precision)."""
    if amp == "none":
        return None, False
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.amp: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or none")
        return torch.bfloat16, False
    if device.type != "cuda":
        log(f"train.amp: fp16 runs on CUDA only; training in fp32 on {device.type} (train.amp: bf16 is mixed precision there)")
        return None, False
    return torch.float16, True


def check_world(config: Config, world: int, device: torch.device, train_images: int) -> None:
    """Refuse settings that several processes (torchrun) cannot train."""
    if world == 1:
        return
    if config.train.batch_size % world:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is the batch of all {world} processes together and "
                          f"must divide among them; use a multiple of {world}, e.g. {config.train.batch_size // world * world or world}")
    if min(train_images, config.train.batch_size) < world:
        raise ConfigError(f"the training split has {train_images} image(s), fewer than the {world} processes")
    if config.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA (PyTorch synchronises BatchNorm on GPUs only); "
                          "set train.sync_bn=false on the CPU")


def load_data(config: Config, log: Log) -> DatasetIndex:
    index = read_dataset(
        resolve_data_path(config.data.path),
        config.data.format,
        seed=config.data.split_seed,
        fractions=config.data.split_fractions,
    )
    for key in ("train_split", "val_split"):
        name = getattr(config.data, key)
        if name not in index.splits:
            raise ConfigError(f"data.{key}: {index.missing_split_message(name)}")
        if not index.splits[name]:
            raise ConfigError(f"data.{key}: split {name!r} of the dataset at {index.root} has no usable image; "
                              f"`kdet data check {index.root}` lists what was skipped and why")
    if config.data.labelled_fraction < 1:
        index = labelled_part(config, index, log)
    if config.data.test_split in index.lost_splits:
        log(f"warning: data.test_split: split {config.data.test_split!r} is lost ({index.lost_splits[config.data.test_split]}); "
            f"the run is scored on {config.data.val_split!r} instead")
    if index.problems:
        kinds: dict[str, int] = {}
        for problem in index.problems:
            kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
        log(f"data: {len(index.problems)} problem(s) found and handled ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}); see problems.json or `kdet data check`")
    return index


def labelled_part(config: Config, index: DatasetIndex, log: Log) -> DatasetIndex:
    """``index`` whose training split holds only the images ``data.labelled_fraction`` keeps
    (:mod:`kdet.data.labelled`), the others in ``index.withheld``; logged in one line."""
    split = config.data.train_split
    shared = [key for key in ("val_split", "test_split") if getattr(config.data, key) == split]
    if shared:
        raise ConfigError(f"data.labelled_fraction: data.train_split {split!r} is also data.{shared[0]}, which keeps all its "
                          f"images; give the training split a split of its own")
    index = keep_labelled(index, split, config.data.labelled_fraction, config.data.labelled_seed)
    log(labelled_line(labelled_summary(config, index)))
    return index


def labelled_summary(config: Config, index: DatasetIndex, *, ids: bool = False) -> dict | None:
    """What a run with ``data.labelled_fraction`` trains on (:func:`~kdet.data.labelled.labelled_record`);
    ``None`` when the whole training split keeps its labels."""
    if config.data.labelled_fraction >= 1:
        return None
    return labelled_record(index, config.data.train_split, config.data.labelled_fraction, config.data.labelled_seed, ids=ids)


def resolve_model_config(config: Config, index: DatasetIndex, log: Log) -> ModelConfig:
    """Turn ``anchors: auto`` into concrete anchors, as YOLOv5's autoanchor does: keep the
    default anchors when they can be assigned to at least 98% of the training boxes, otherwise
    fit new ones with k-means."""
    model = config.model
    if model.weights and model.channels is None:  # a pruned checkpoint: its channel plan, recorded in the run's config
        plan = load_checkpoint(model.weights, log=log)["model_config"].get("channels")
        if plan:
            log(f"model.weights {model.weights} is a pruned model: building it with its channel plan")
            model = model.model_copy(update={"channels": plan})
    if model.family == "ultralytics":  # an Ultralytics checkpoint's architecture, recorded in the run's config
        from ..models.ultralytics import resolve_config

        return resolve_config(model)
    if model.family != "yolo" or model.head != "anchor" or model.anchors != "auto":
        return model
    size = config.data.input_size
    sizes = np.concatenate(
        [(r.boxes[:, 2:] - r.boxes[:, :2]) * size / max(r.width, r.height) for r in index.split(config.data.train_split)]
    )
    recall = best_possible_recall(sizes, DEFAULT_ANCHORS)
    if recall >= 0.98:
        log(f"anchors: default anchors fit {recall:.1%} of the {len(sizes)} training boxes; keeping them")
        return ModelConfig.model_validate({**model.model_dump(), "anchors": DEFAULT_ANCHORS})
    anchors = kmeans_anchors(sizes, seed=config.seed)
    log(f"anchors: default anchors fit only {recall:.1%} of the training boxes; k-means gives {anchors} "
        f"(fits {best_possible_recall(sizes, anchors):.1%})")
    return ModelConfig.model_validate({**model.model_dump(), "anchors": anchors})


def init_weights_from(model: Detector, path: str, log: Log, *, allow_partial: bool = False) -> None:
    """Start from a kdet checkpoint's weights (fine-tuning). A checkpoint that fits the model
    only in part (another size, other classes) is refused unless ``allow_partial``
    (``model.partial_weights``): then the tensors that match by name and shape are loaded."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_checkpoint(path, log=log)["state_dict"].items()}
    load_state(model, state, what="model.weights", source=str(path), allow_partial=allow_partial, option="model.partial_weights",
               log=log)


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """Weight decay on convolution and linear weights only, not on norms and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.train.lr, momentum=config.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(config.train.momentum, 0.999))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning rate factor: linear warm-up, then cosine or linear decay to
    ``final_lr_ratio``."""
    total = config.train.epochs * steps_per_epoch
    warmup = int(config.train.warmup_epochs * steps_per_epoch)
    final = config.train.final_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.train.scheduler == "cosine":
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        if config.train.scheduler == "linear":
            return 1 - (1 - final) * progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_set(config: Config, index: DatasetIndex) -> DetectionDataset:
    """The augmented training split, each sample a function of ``(config.seed, epoch, index)``."""
    return DetectionDataset(index.split(config.data.train_split), config.data.input_size, augment=config.data.augment,
                            cache=config.data.cache, cache_dir=config.data.cache_dir, seed=config.seed)


def validation_set(config: Config, records: list) -> DetectionDataset:
    """``records`` letterboxed without augmentation, cached as ``data.cache`` says."""
    return DetectionDataset(records, config.data.input_size, augment=None, cache=config.data.cache, cache_dir=config.data.cache_dir)


def test_split(config: Config, index: DatasetIndex) -> str:
    """The split a finished run is scored on: ``data.test_split``, or ``data.val_split`` when the
    dataset has no test split."""
    return config.data.test_split if config.data.test_split in index.splits else config.data.val_split


def read_history(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run's ``metrics.jsonl``; none when it has no such file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_settings(config: Config) -> dict:
    """Keyword arguments of :func:`~kdet.engine.evaluate.evaluate_model` from ``config.eval``."""
    return config.eval.model_dump()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def epoch_loader(dataset: DetectionDataset, config: Config, epoch: int, *, rank: int = 0, world: int = 1) -> DataLoader:
    """The loader of one epoch: its shuffle order depends only on ``(seed, epoch)``, and each
    sample's augmentation only on ``(seed, the dataset's epoch, index)`` (see
    :meth:`~kdet.data.pipeline.DetectionDataset.sample`), so a resumed run sees the same batches
    as an uninterrupted one. Batches hold ``train.batch_size`` images (the last, incomplete one
    dropped unless it is the only one); process ``rank`` of ``world`` (torchrun) gets its share of
    each (:class:`~kdet.engine.distributed.RankShare`)."""
    from .distributed import RankShare

    seed = config.seed * 100_003 + epoch
    torch.manual_seed(seed)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # what DataLoader(shuffle=True, batch_size=..., generator=generator) builds, so one process
    # draws the batches it always drew
    batches = BatchSampler(RandomSampler(dataset, generator=generator), config.train.batch_size,
                           drop_last=len(dataset) > config.train.batch_size)
    return DataLoader(
        dataset,
        batch_sampler=RankShare(batches, rank, world),
        collate_fn=collate,
        num_workers=config.data.workers,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def code_version() -> dict:
    """Which kdet code ran: its version and where it was imported from, plus the git commit and
    whether the package's files differ from it, when kdet runs from a git checkout."""
    from .. import __version__

    root = Path(__file__).resolve().parents[1]
    info: dict = {"version": __version__, "path": str(root), "torch": torch.__version__}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."],
                                    capture_output=True, text=True, timeout=10)
            info["commit"] = commit.stdout.strip()
            info["modified"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def check_resume_config(config: Config, saved: Config) -> None:
    """A resumed run must train the same thing; only ``train.epochs`` may grow, and the image
    cache (``data.cache``, ``data.cache_dir``), which changes no sample, may change."""
    new, old = config_to_dict(config), config_to_dict(saved)
    new["train"]["epochs"] = old["train"]["epochs"] = 0
    for key in ("cache", "cache_dir"):
        new["data"][key] = old["data"][key] = None
    if config.model.anchors == "auto":  # the saved config holds the anchors k-means chose
        new["model"]["anchors"] = old["model"]["anchors"]
    diffs = _diff(old, new)
    if diffs:
        raise ConfigError("--resume: the config differs from the one the run started with: " + "; ".join(diffs)
                          + ". Resume with the run's own config.yaml, or start a new run.")
    if config.train.epochs < saved.train.epochs:
        raise ConfigError(f"--resume: train.epochs {config.train.epochs} is below the run's {saved.train.epochs}")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


