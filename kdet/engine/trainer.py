"""Training a detector: one visible loop, from a validated :class:`~kdet.config.Config`.

:func:`train` assembles a run (data, model, :class:`~kdet.engine.step.TrainStep`, optimiser,
hooks) from the pieces in :mod:`kdet.engine.setup`, and :class:`Trainer` runs it: every batch
becomes a :class:`~kdet.engine.step.Batch`, the step turns it into a loss, and the hooks
(:class:`~kdet.engine.step.HookBase`) do the rest at fixed points: the EMA after every step,
validation and checkpoints after every epoch.

A run directory holds ``config.yaml`` (resolved), ``problems.json`` (what the data reader
reported), ``metrics.jsonl`` (one line per epoch), ``last.pt`` (everything needed to resume),
``best.pt`` (the EMA weights with the best validation AP) and ``results.json`` (test metrics,
size and speed of ``best.pt``, and which kdet code ran: :func:`code_version`).

Under torchrun the same run goes on in several processes (:mod:`kdet.engine.distributed`):
rank 0 alone writes the run directory and logs.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn

from ..config import Config, ModelConfig, config_to_dict
from ..data.pipeline import DetectionDataset
from ..models import Detector, build_model
from ..structures import DatasetIndex
from . import distributed
from .checkpoint import load_training_state, model_payload, save_atomic, tidy_run_dir
from .ema import ModelEMA
from .evaluate import evaluate_model, predict
from .metrics import evaluate
from .setup import (
    Log,
    amp_settings,
    build_optimizer,
    build_scheduler,
    check_resume_config,
    check_world,
    code_version,
    epoch_loader,
    eval_settings,
    init_weights_from,
    labelled_summary,
    load_data,
    pick_device,
    read_history,
    resolve_model_config,
    rng_state,
    seed_everything,
    set_rng_state,
    test_split,
    training_set,
    validation_set,
)
from .step import Batch, HookBase, TrainStep
from .watch import LossWatch

StepFactory = Callable[[Detector, DatasetIndex, DetectionDataset, Log], TrainStep]
"""Builds a run's :class:`TrainStep` from the student, the data and the augmented training set."""


def check_finite(losses: dict[str, torch.Tensor], total: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(total):
        values = {k: v.item() for k, v in losses.items()}
        raise FloatingPointError(
            f"loss became {total.item()} at epoch {epoch}, step {step}; loss terms: {values}. "
            f"Lower train.lr, check the data with `kdet data check`, or set train.grad_clip."
        )


NON_FINITE_LIMIT = 20
"""Under fp16 a step with a non-finite loss is skipped by the gradient scaler; this many such
steps in a row stop the run (a loss that overflows in the forward pass every time is not
something the scaler's lower scale can fix)."""


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    best_ap: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Runs epochs of steps and calls the hooks around them.

    ``step`` is the run's :class:`TrainStep`; ``module`` what is called on a batch (the step
    itself, or the step wrapped in ``DistributedDataParallel``). ``amp_dtype`` runs the step under
    ``torch.autocast`` in that dtype (``torch.bfloat16``, or ``torch.float16`` with an enabled
    ``scaler``; an enabled ``scaler`` alone means fp16). While a run goes on, :attr:`epoch`
    (1-based), :attr:`iteration` (0-based step within the epoch), :attr:`progress` (fraction of
    training done, in ``[0, 1)``) and, after a step, :attr:`loss` and :attr:`losses` (averaged
    over the processes under torchrun) and :attr:`skipped` (whether the fp16 scaler skipped the
    update) say where it is.

    A non-finite loss raises ``FloatingPointError`` naming the terms, except under fp16, where
    the scaler skips the step (its gradients are not finite either) and lowers its scale; only
    :data:`NON_FINITE_LIMIT` such losses in a row raise.
    """

    def __init__(self, step: TrainStep, optimizer: torch.optim.Optimizer, scheduler, *, epochs: int, steps_per_epoch: int,
                 grad_clip: float | None = None, scaler: torch.amp.GradScaler | None = None, hooks: list[HookBase] = (),
                 module: nn.Module | None = None, autocast_device: str = "cpu", amp_dtype: torch.dtype | None = None) -> None:
        self.step = step
        self.module = module or step
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.grad_clip = grad_clip
        self.hooks = [step, *hooks]
        self.autocast_device = autocast_device
        self.amp_dtype = amp_dtype if amp_dtype is not None or not self.scaler.is_enabled() else torch.float16
        self.epoch = 0
        self.iteration = 0
        self.progress = 0.0
        self.loss: torch.Tensor | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.skipped = False
        self.non_finite_in_a_row = 0

    def call(self, name: str) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self)

    def train(self, first_epoch: int, batches: Callable[[int], object]) -> None:
        """Epochs ``first_epoch .. epochs``; ``batches(epoch)`` gives an epoch's
        :class:`Batch` objects."""
        self.call("before_train")
        for epoch in range(first_epoch, self.epochs + 1):
            self.epoch = epoch
            self.module.train()
            self.call("before_epoch")
            for iteration, batch in enumerate(batches(epoch)):
                self.iteration = iteration
                self.progress = ((epoch - 1) * self.steps_per_epoch + iteration) / (self.epochs * self.steps_per_epoch)
                self.call("before_step")
                self.run_step(batch)
                self.call("after_step")
            self.call("after_epoch")
        self.call("after_train")

    def run_step(self, batch: Batch) -> None:
        """Loss, backward pass, optimiser and learning-rate step."""
        with torch.autocast(self.autocast_device, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, losses = self.module(batch)
        # every process sees the same mean, so a non-finite loss stops all of them at once
        reported, *terms = distributed.mean_over_processes([loss, *losses.values()])
        reported_terms = dict(zip(losses, terms))
        finite = bool(torch.isfinite(reported))
        scaling = self.scaler.is_enabled()
        if not scaling:
            check_finite(reported_terms, reported, self.epoch, self.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.step.parameters(), self.grad_clip)
        scale = self.scaler.get_scale() if scaling else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # the scaler lowers its scale exactly when it found non-finite gradients and skipped the step
        self.skipped = scaling and self.scaler.get_scale() < scale
        self.non_finite_in_a_row = 0 if finite else self.non_finite_in_a_row + 1
        if self.non_finite_in_a_row >= NON_FINITE_LIMIT:
            values = {k: v.item() for k, v in reported_terms.items()}
            raise FloatingPointError(
                f"the loss was not finite in {NON_FINITE_LIMIT} steps in a row under train.amp fp16 (the gradient scaler "
                f"skipped them), last {reported.item()} at epoch {self.epoch}, step {self.iteration}; loss terms: {values}. "
                f"Train with train.amp bf16 or none, or lower train.lr.")
        self.scheduler.step()
        self.loss, self.losses = reported, reported_terms


class EMAHook(HookBase):
    """Keeps the exponential moving average of the student's weights after every step."""

    def __init__(self, ema: ModelEMA, model: nn.Module) -> None:
        self.ema, self.model = ema, model

    def after_step(self, trainer: Trainer) -> None:
        self.ema.update(self.model)


class EpochRecorder(HookBase):
    """Averages the loss terms over an epoch; after it, validates (every ``eval_every`` epochs
    and at the last), keeps ``best.pt``, appends the epoch to ``metrics.jsonl``, writes
    ``last.pt`` and logs a line. Steps the fp16 scaler skipped are counted
    (``amp_skipped_steps``); non-finite losses are left out of the means. Under torchrun every process validates
    (``validate`` gives the metrics on rank 0, ``None`` elsewhere) and only rank 0
    (``main``) writes."""

    def __init__(self, *, out_dir: Path, state: RunState, eval_model: Callable[[], nn.Module], validate: Callable[[nn.Module], dict | None],
                 eval_every: int, best_payload: Callable[[nn.Module, dict], dict], last_payload: Callable[[Trainer], dict], log: Log,
                 main: bool = True) -> None:
        self.out_dir, self.state, self.eval_model, self.validate = out_dir, state, eval_model, validate
        self.eval_every, self.best_payload, self.last_payload, self.log = eval_every, best_payload, last_payload, log
        self.main = main
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.skipped = 0
        self.started = 0.0

    def before_epoch(self, trainer: Trainer) -> None:
        self.sums, self.steps, self.skipped, self.started = {}, 0, 0, time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        self.skipped += trainer.skipped
        if not math.isfinite(trainer.loss.item()):  # only under fp16, where the scaler skipped the step
            return
        self.steps += 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + trainer.loss.item()
        for key, value in trainer.losses.items():
            self.sums[f"loss_{key}"] = self.sums.get(f"loss_{key}", 0.0) + value.item()

    def after_epoch(self, trainer: Trainer) -> None:
        epoch, state = trainer.epoch, self.state
        record = {"epoch": epoch, "lr": trainer.optimizer.param_groups[0]["lr"],
                  **{k: v / max(self.steps, 1) for k, v in self.sums.items()},
                  "train_time_s": round(time.perf_counter() - self.started, 2)}
        if trainer.scaler.is_enabled():
            record["amp_skipped_steps"] = self.skipped
        if "loss" not in record:
            record["loss"] = float("nan")  # every step of the epoch was skipped
        validating = epoch % self.eval_every == 0 or epoch == trainer.epochs
        if not self.main:
            if validating:
                self.validate(self.eval_model())  # this process's share of the predictions
            return
        if validating:
            model = self.eval_model()
            metrics = self.validate(model)
            record["val"] = {"AP": metrics["coco"]["AP"], "AP50": metrics["coco"]["AP50"], "VOC_mAP50": metrics["voc"]["mAP50_all"]}
            ap = metrics["coco"]["AP"] or 0.0
            if ap > state.best_ap:
                state.best_ap, state.best_epoch = ap, epoch
                save_atomic(self.best_payload(model, {"epoch": epoch, "val": record["val"]}), self.out_dir / "best.pt")
        state.epoch = epoch
        state.history.append(record)
        with (self.out_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        save_atomic(self.last_payload(trainer), self.out_dir / "last.pt")
        val = record.get("val")
        skipped = f", {self.skipped} step(s) skipped by the fp16 gradient scaler (loss or gradients not finite)" if self.skipped else ""
        self.log(f"epoch {epoch}: loss {record['loss']:.4f}" + (f", val AP {_number(val['AP'])} AP50 {_number(val['AP50'])}" if val else "")
                 + f" ({record['train_time_s']:.0f}s){skipped}")


def _number(value: float | None) -> str:
    """An AP for the log: undefined (``None``) when the split has no box to score."""
    return "undefined" if value is None else f"{value:.3f}"


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
    step: StepFactory | None = None,
) -> dict:
    """Train ``config`` into ``out_dir``; with ``resume`` continue from ``out_dir/last.pt``.

    ``step`` builds what one training step computes from the student and the data (a
    distiller); by default the student's own loss (:class:`TrainStep`). Returns the content of
    ``results.json``.

    Inside a process group of several processes (torchrun, :mod:`kdet.engine.distributed`) every
    process calls this: each trains on its share of every batch, and rank 0 alone logs and
    writes ``out_dir``, which must be a folder every process can read (``--resume`` reads
    ``last.pt`` in each). Other processes return an empty dict.
    """
    out_dir = Path(out_dir)
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    if not main:
        log, progress = (lambda _: None), False
    last_path = out_dir / "last.pt"
    saved = None
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: {last_path} not found; start a new run without --resume")
        saved = load_training_state(last_path)
        check_resume_config(config, type(config).model_validate(saved["config"]))
    elif last_path.exists():
        raise FileExistsError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    code = code_version() if main else {}
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log(f"kdet {code['version']} from {code['path']}" + (f", commit {code['commit'][:10]}" + (" with local changes" if code["modified"] else "")
                                                             if "commit" in code else ""))

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = pick_device(config.train.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's GPU
    seed_everything(config.seed)
    index = load_data(config, log)
    if main:
        (out_dir / "problems.json").write_text(json.dumps([p.to_dict() for p in index.problems], indent=1))
        labelled = labelled_summary(config, index, ids=True)
        if labelled is not None:  # which training images kept their labels (data.labelled_fraction)
            (out_dir / "labelled.json").write_text(json.dumps(labelled, indent=1))
    model_config = ModelConfig.model_validate(saved["model_config"]) if saved else resolve_model_config(config, index, log)
    model_config = distributed.broadcast_object(model_config)  # one set of anchors for every process
    resolved = config.model_copy(update={"model": model_config})
    if main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(resolved), sort_keys=False))

    size = config.data.input_size
    model = build_model(model_config, index.class_names, size).to(device)
    if model_config.weights and not saved:
        init_weights_from(model, model_config.weights, log, allow_partial=model_config.partial_weights)
    train_set = training_set(config, index)
    check_world(config, world, device, len(train_set))
    val_records = index.split(config.data.val_split)
    val_set = validation_set(config, val_records[rank::world])  # each process predicts its share
    steps_per_epoch = max(1, len(train_set) // config.train.batch_size) if len(train_set) > config.train.batch_size else 1
    # built after the model, so a run with a distiller starts from the same initial weights
    run_step = (step(model, index, train_set, log) if step is not None else TrainStep(model)).to(device)
    run_step, module = distributed.wrap(run_step, device, sync_bn=config.train.sync_bn)
    optimizer = build_optimizer(run_step, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    ema = ModelEMA(model, config.train.ema_decay, config.train.ema_ramp) if config.train.ema else None
    amp_dtype, use_scaler = amp_settings(config.train.amp, device, log)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = RunState()
    if saved:
        model.load_state_dict(saved["model"])
        run_step.load_saved_state(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        if use_scaler and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = RunState(**saved["run_state"])
        set_rng_state(saved["rng"])
        log(f"resuming {out_dir} after epoch {state.epoch}")
    if main:
        tidy_run_dir(out_dir, state.epoch, log)  # what a run killed mid-write left behind

    params = sum(p.numel() for p in model.parameters())
    head = f", {model_config.head} head" if model_config.family == "yolo" else ""
    processes = f", {world} processes x {config.train.batch_size // world} images per step" if world > 1 else ""
    precision = f", {config.train.amp} mixed precision" if amp_dtype is not None else ""
    if model_config.family == "ultralytics":  # built from its yaml or checkpoint: backbone and size do not apply
        source = model_config.config if isinstance(model_config.config, str) else model_config.weights
        name = f"ultralytics/{Path(source).name}" if source else "ultralytics (yaml given inline)"
    else:
        name = f"{model_config.family}/{model_config.backbone}-{model_config.size}{head}"
    log(f"model: {name}, {params / 1e6:.2f}M parameters; "
        f"{len(train_set)} train / {len(val_records)} val images at {size}px on {device}{processes}{precision}")
    eval_kwargs = eval_settings(config)

    def last_payload(trainer: Trainer) -> dict:
        return {
            "config": config_to_dict(resolved),
            "model_config": model_config.model_dump(mode="json"),
            "model": model.state_dict(),
            "objective": run_step.state_dict_to_save(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "run_state": state.__dict__,
            "rng": rng_state(),
        }

    def validate(model: nn.Module) -> dict | None:
        predictions = distributed.gather_lists(predict(model, val_set.records, size, dataset=val_set, **eval_kwargs))
        return evaluate(val_records, predictions, model.class_names) if predictions is not None else None

    recorder = EpochRecorder(
        out_dir=out_dir, state=state, eval_model=lambda: ema.module if ema is not None else model, validate=validate,
        eval_every=config.train.eval_every, best_payload=lambda m, extra: model_payload(m, model_config, size, extra=extra),
        last_payload=last_payload, log=log, main=main,
    )
    trainer = Trainer(run_step, optimizer, scheduler, epochs=config.train.epochs, steps_per_epoch=steps_per_epoch,
                      grad_clip=config.train.grad_clip, scaler=scaler,
                      hooks=([EMAHook(ema, model)] if ema else []) + [recorder, LossWatch(log)],
                      module=module, autocast_device=device.type, amp_dtype=amp_dtype)

    def batches(epoch: int):
        view = run_step.data_epoch(epoch)
        train_set.set_epoch(view)
        shard = {"rank": rank, "world": world} if world > 1 else {}
        loader = epoch_loader(train_set, config, epoch, **shard)
        for images, targets, indices in _progress(loader, f"epoch {epoch}/{config.train.epochs}", progress):
            yield Batch.of(images, targets, indices, epoch=epoch, view=view).to(device)

    trainer.train(state.epoch + 1, batches)
    if not main:
        return {}
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
        "batch_size": config.train.batch_size,
        "processes": distributed.world_size(),
        "code": code,
    }
    labelled = labelled_summary(config, index)
    if labelled is not None:
        results["labelled"] = labelled
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    coco = metrics["coco"]
    log(f"{split}: AP {coco['AP']:.3f}, AP50 {coco['AP50']:.3f}, VOC mAP50 {metrics['voc']['mAP50_all']:.3f} "
        f"(best epoch {payload.get('epoch')}); results in {out_dir / 'results.json'}")
    return results



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
