"""Training a detector: one visible loop, from a validated :class:`~kdet.config.Config`.

A run directory holds ``config.yaml`` (resolved), ``problems.json`` (what the data reader
reported), ``metrics.jsonl`` (one line per epoch), ``last.pt`` (everything needed to resume),
``best.pt`` (the EMA weights with the best validation AP) and ``results.json`` (test metrics,
size and speed of ``best.pt``, and which kdet code ran: :func:`code_version`).
"""
from __future__ import annotations

import json
import math
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, ModelConfig, config_to_dict
from ..data import read_dataset, resolve_data_path
from ..data.pipeline import DetectionDataset, collate
from ..models import Detector, build_model
from ..models.anchors import DEFAULT_ANCHORS, best_possible_recall, kmeans_anchors
from ..structures import DatasetIndex
from .checkpoint import load_checkpoint, model_payload, save_atomic
from .ema import ModelEMA
from .evaluate import evaluate_model

Log = Callable[[str], None]


class Objective(nn.Module):
    """What a run minimises, when it is more than the detector's own loss (a distiller).

    Called as ``objective(model, images, targets, indices) -> (loss, loss terms)``, ``indices``
    being the training-set indices of the batch's images. Its trainable parameters are optimised
    with the model's; :meth:`state_dict_to_save` goes into ``last.pt`` and is restored on resume.
    Hooks, in the order the trainer calls them: :meth:`data_epoch` and :meth:`start_epoch`
    before every epoch, :meth:`set_progress` before every step.
    """

    def state_dict_to_save(self) -> dict:
        return self.state_dict()

    def load_saved_state(self, state: dict) -> None:
        self.load_state_dict(state)

    def data_epoch(self, epoch: int) -> int:
        """The epoch whose augmentation training epoch ``epoch`` (1-based) sees
        (:meth:`~kdet.data.pipeline.DetectionDataset.set_epoch`): its own, unless the objective
        replays fewer augmented views than there are epochs."""
        return epoch

    def start_epoch(self, epoch: int) -> None:
        """Called before every epoch (1-based)."""

    def set_progress(self, fraction: float) -> None:
        """Called before every step with the fraction of training done, in ``[0, 1)``."""


ObjectiveFactory = Callable[[Detector, DatasetIndex, DetectionDataset, Log], Objective]


# ---------------------------------------------------------------------------------------------
# Pieces a training run (and a distillation run) is made of
# ---------------------------------------------------------------------------------------------
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
            raise ConfigError(
                f"data.{key}: the dataset at {index.root} has no split {name!r}; it has {sorted(index.splits)}"
            )
    if index.problems:
        kinds: dict[str, int] = {}
        for problem in index.problems:
            kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
        log(f"data: {len(index.problems)} problem(s) found and handled ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}); see problems.json or `kdet data check`")
    return index


def resolve_model_config(config: Config, index: DatasetIndex, log: Log) -> ModelConfig:
    """Turn ``anchors: auto`` into concrete anchors, as YOLOv5's autoanchor does: keep the
    default anchors when they can be assigned to at least 98% of the training boxes, otherwise
    fit new ones with k-means."""
    model = config.model
    if model.family != "yolo" or model.anchors != "auto":
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


def init_weights_from(model: Detector, path: str, log: Log) -> None:
    """Start from a kdet checkpoint's weights where names and shapes match (fine-tuning)."""
    state = load_checkpoint(path)["state_dict"]
    own = model.state_dict()
    matched = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    log(f"model.weights: loaded {len(matched)}/{len(own)} tensors from {path}")


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


def check_finite(losses: dict[str, torch.Tensor], total: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(total):
        values = {k: v.item() for k, v in losses.items()}
        raise FloatingPointError(
            f"loss became {total.item()} at epoch {epoch}, step {step}; loss terms: {values}. "
            f"Lower train.lr, check the data with `kdet data check`, or set train.grad_clip."
        )


def training_set(config: Config, index: DatasetIndex) -> DetectionDataset:
    """The augmented training split, each sample a function of ``(config.seed, epoch, index)``."""
    return DetectionDataset(index.split(config.data.train_split), config.data.input_size, augment=config.data.augment,
                            cache=config.data.cache_images, seed=config.seed)


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


def epoch_loader(dataset: DetectionDataset, config: Config, epoch: int) -> DataLoader:
    """The loader of one epoch: its shuffle order depends only on ``(seed, epoch)``, and each
    sample's augmentation only on ``(seed, the dataset's epoch, index)`` (see
    :meth:`~kdet.data.pipeline.DetectionDataset.sample`), so a resumed run sees the same batches
    as an uninterrupted one."""
    seed = config.seed * 100_003 + epoch
    torch.manual_seed(seed)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=config.train.batch_size,
        shuffle=True,
        drop_last=len(dataset) > config.train.batch_size,
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


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    best_ap: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train(
    config: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log: Log = print,
    progress: bool = True,
    objective: ObjectiveFactory | None = None,
) -> dict:
    """Train ``config`` into ``out_dir``; with ``resume`` continue from ``out_dir/last.pt``.

    ``objective`` builds what is minimised from the model and the data (a distiller); by default
    the model's own loss. Returns the content of ``results.json``.
    """
    out_dir = Path(out_dir)
    last_path = out_dir / "last.pt"
    saved = None
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: {last_path} not found; start a new run without --resume")
        saved = torch.load(last_path, map_location="cpu", weights_only=False)
        check_resume_config(config, type(config).model_validate(saved["config"]))
    elif last_path.exists():
        raise FileExistsError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    code = code_version()
    log(f"kdet {code['version']} from {code['path']}" + (f", commit {code['commit'][:10]}" + (" with local changes" if code["modified"] else "")
                                                         if "commit" in code else ""))

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = pick_device(config.train.device)
    seed_everything(config.seed)
    index = load_data(config, log)
    (out_dir / "problems.json").write_text(json.dumps([p.to_dict() for p in index.problems], indent=1))
    model_config = ModelConfig.model_validate(saved["model_config"]) if saved else resolve_model_config(config, index, log)
    resolved = config.model_copy(update={"model": model_config})
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(resolved), sort_keys=False))

    size = config.data.input_size
    model = build_model(model_config, index.class_names, size).to(device)
    if model_config.weights and not saved:
        init_weights_from(model, model_config.weights, log)
    train_set = training_set(config, index)
    val_set = DetectionDataset(index.split(config.data.val_split), size, augment=None, cache=config.data.cache_images)
    steps_per_epoch = max(1, len(train_set) // config.train.batch_size) if len(train_set) > config.train.batch_size else 1
    # built after the model, so a run with an objective starts from the same initial weights
    extra = objective(model, index, train_set, log).to(device) if objective is not None else None
    trainable = nn.ModuleList([model] + ([extra] if extra is not None else []))
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    ema = ModelEMA(model, config.train.ema_decay, config.train.ema_ramp) if config.train.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.amp and device.type == "cuda")
    state = RunState()
    if saved:
        model.load_state_dict(saved["model"])
        if extra is not None:
            extra.load_saved_state(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = RunState(**saved["run_state"])
        set_rng_state(saved["rng"])
        log(f"resuming {out_dir} after epoch {state.epoch}")

    params = sum(p.numel() for p in model.parameters())
    log(f"model: {model_config.family}/{model_config.backbone}-{model_config.size}, {params / 1e6:.2f}M parameters; "
        f"{len(train_set)} train / {len(val_set)} val images at {size}px on {device}")
    metrics_path = out_dir / "metrics.jsonl"
    eval_kwargs = eval_settings(config)

    for epoch in range(state.epoch + 1, config.train.epochs + 1):
        trainable.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        train_set.set_epoch(extra.data_epoch(epoch) if extra is not None else epoch)
        if extra is not None:
            extra.start_epoch(epoch)
        loader = epoch_loader(train_set, config, epoch)
        for step, (images, targets, indices) in enumerate(_progress(loader, f"epoch {epoch}/{config.train.epochs}", progress)):
            images = images.to(device, non_blocking=True)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, enabled=scaler.is_enabled()):
                if extra is None:
                    output = model(images, targets)
                    loss, losses = output.loss, output.losses
                else:
                    extra.set_progress(((epoch - 1) * steps_per_epoch + step) / (config.train.epochs * steps_per_epoch))
                    loss, losses = extra(model, images, targets, indices)
            check_finite(losses, loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.train.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable.parameters(), config.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            steps += 1
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for key, value in losses.items():
                sums[f"loss_{key}"] = sums.get(f"loss_{key}", 0.0) + value.item()
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **{k: v / max(steps, 1) for k, v in sums.items()},
                  "train_time_s": round(time.perf_counter() - started, 2)}
        eval_model = ema.module if ema is not None else model
        if epoch % config.train.eval_every == 0 or epoch == config.train.epochs:
            metrics = evaluate_model(eval_model, val_set.records, size, dataset=val_set, **eval_kwargs)
            record["val"] = {"AP": metrics["coco"]["AP"], "AP50": metrics["coco"]["AP50"], "VOC_mAP50": metrics["voc"]["mAP50_all"]}
            ap = metrics["coco"]["AP"] or 0.0
            if ap > state.best_ap:
                state.best_ap, state.best_epoch = ap, epoch
                save_atomic(model_payload(eval_model, model_config, size, extra={"epoch": epoch, "val": record["val"]}), out_dir / "best.pt")
        state.epoch = epoch
        state.history.append(record)
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        save_atomic(
            {
                "config": config_to_dict(resolved),
                "model_config": model_config.model_dump(mode="json"),
                "model": model.state_dict(),
                "objective": extra.state_dict_to_save() if extra is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "run_state": state.__dict__,
                "rng": rng_state(),
            },
            last_path,
        )
        val = record.get("val")
        log(f"epoch {epoch}: loss {record['loss']:.4f}" + (f", val AP {val['AP']:.3f} AP50 {val['AP50']:.3f}" if val else "")
            + f" ({record['train_time_s']:.0f}s)")

    return finish_run(out_dir, config, index, log, code)


def finish_run(out_dir: Path, config: Config, index: DatasetIndex, log: Log, code: dict) -> dict:
    """Score ``best.pt`` on the test split (or the validation split when there is none),
    measure its size and speed, and write ``results.json``."""
    from .checkpoint import load_detector
    from .profile import profile_model

    model, payload = load_detector(out_dir / "best.pt")
    split = test_split(config, index)
    metrics = evaluate_model(model, index.split(split), config.data.input_size, **eval_settings(config))
    profile = profile_model(model, config.data.input_size, threads=config.train.threads)
    history = read_history(out_dir)
    results = {
        "split": split,
        "best_epoch": payload.get("epoch"),
        "metrics": metrics,
        "profile": profile.__dict__,
        "train_time_s": round(sum(r["train_time_s"] for r in history), 1),
        "epochs": len(history),
        "code": code,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    coco = metrics["coco"]
    log(f"{split}: AP {coco['AP']:.3f}, AP50 {coco['AP50']:.3f}, VOC mAP50 {metrics['voc']['mAP50_all']:.3f} "
        f"(best epoch {payload.get('epoch')}); results in {out_dir / 'results.json'}")
    return results


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
    """A resumed run must train the same thing; only ``train.epochs`` may grow."""
    new, old = config_to_dict(config), config_to_dict(saved)
    new["train"]["epochs"] = old["train"]["epochs"] = 0
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


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=len(iterable))
        for item in iterable:
            yield item
            bar.advance(task)
