"""Configuration: one validated schema, read from YAML, overridden with ``--set key=value``.

This is the only module that reads YAML; library code takes typed arguments. Unknown or
misspelled keys are errors that name the key, the file and line, and the closest valid key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A configuration problem, with where it is and how to fix it in the message."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    scale: tuple[float, float] = Field((0.6, 1.4), description="random scale range (1, 1 turns it off)")
    translate: float = Field(0.1, ge=0, le=0.5, description="random shift as a fraction of the input size")
    brightness: float = Field(0.3, ge=0)
    contrast: float = Field(0.3, ge=0)
    saturation: float = Field(0.5, ge=0)
    hue: float = Field(0.015, ge=0, le=0.5)
    mosaic: float = Field(0.0, ge=0, le=1, description="probability of a 4-image mosaic")


TRAIN_REST = "train_rest"  # data.unlabelled: the training images data.labelled_fraction leaves out
TRAIN_REST_NEEDS_FRACTION = ("data.unlabelled: train_rest needs data.labelled_fraction < 1 (train_rest is the part of the "
                             "training split that loses its labels); set data.labelled_fraction, e.g. 0.1, or give "
                             "data.unlabelled a folder of images or a dataset")


class DataConfig(Strict):
    path: str = Field(..., description="dataset folder (VOC, COCO JSON or YOLO txt), or 'bundled:bccd'")
    format: Literal["auto", "voc", "coco", "yolo"] = "auto"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    input_size: int = Field(320, ge=32, description="square model input; images are letterboxed to it")
    augment: AugmentConfig = AugmentConfig()
    cache: Literal["ram", "disk", "none"] = Field(
        "ram", description="letterboxed images: ram (decoded once per run, kept in memory), disk (decoded once per source "
                           "file and input size, kept in data.cache_dir and shared by runs and seeds), none (decoded at every use)"
    )
    cache_dir: str | None = Field(None, description="folder of the disk image cache (default: $XDG_CACHE_HOME/kdet/images, "
                                  "else ~/.cache/kdet/images)")
    cache_images: bool | None = Field(None, exclude=True, description="older spelling: true is cache: ram, false is cache: none")
    workers: int = Field(1, ge=0)
    labelled_fraction: float = Field(1.0, gt=0, le=1, description="the part of the training split that keeps its labels: "
                                     "round(fraction x images) of them (at least 1), a seeded choice (data.labelled_seed) "
                                     "that every command training on this config makes alike (kdet train, distill, cache, "
                                     "chain, the teacher's training); validation and test splits are untouched; 1: all")
    labelled_seed: int = Field(0, description="seed of the data.labelled_fraction choice: one seeded order of the "
                               "training images, of which a fraction keeps a prefix (with one seed, 0.1 is part of 0.25)")
    unlabelled: str | None = Field(None, description="kdet distill: a folder of images, or a dataset whose labels are "
                                   "ignored, mixed into training for the distillation terms only (images of the labelled "
                                   "splits are left out); train_rest: the training images data.labelled_fraction leaves out; "
                                   "kdet train ignores it")
    unlabelled_ratio: float = Field(1.0, gt=0, description="unlabelled images added to each batch per labelled image "
                                    "(rounded, at least 1): 1.0 doubles the batch")

    @model_validator(mode="before")
    @classmethod
    def _cache_images_alias(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("cache_images"), bool):
            return data
        data = dict(data)
        cache = "ram" if data.pop("cache_images") else "none"
        if data.get("cache", cache) != cache:
            raise ValueError(f"data.cache_images (older spelling of data.cache) says {cache} but data.cache says "
                             f"{data['cache']}; keep data.cache only")
        data["cache"] = cache
        return data

    @field_validator("unlabelled")
    @classmethod
    def _train_rest_needs_a_fraction(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == TRAIN_REST and info.data.get("labelled_fraction", 0.0) >= 1:
            raise ValueError(TRAIN_REST_NEEDS_FRACTION.removeprefix("data.unlabelled: "))
        return value

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (the coarsest stride), got {value}; try {round(value / 32) * 32}")
        return value


class ModelConfig(Strict):
    family: str = Field("yolo", description="detector family: yolo, fcos, retinanet, faster_rcnn or ultralytics")
    backbone: str = Field("cspdarknet", description="cspdarknet, mobilenet_v2, mobilenet_v3_small/large, resnet18/34/50, or "
                          "timm:NAME for a timm model (pip install kdet[timm]; a plain ViT through a simple feature pyramid)")
    backbone_args: dict[str, Any] = Field(default_factory=dict, description="timm backbones: keyword arguments of "
                                          "timm.create_model, e.g. {drop_path_rate: 0.1, depth: 6}")
    size: Literal["p", "t", "n", "s", "m", "l"] = Field("s", description="width/depth of cspdarknet and of the neck")
    head: Literal["anchor", "dfl"] = Field(
        "anchor", description="yolo: 'anchor' (YOLOv5-style, anchors and objectness) or 'dfl' (YOLOv8-style anchor-free "
                              "decoupled head, DFL boxes, task-aligned assignment; ignores anchors and the *_weight keys)"
    )
    width: float = Field(1.0, gt=0, description="width multiplier of MobileNet backbones")
    anchors: Literal["auto", "default"] | list[list[list[float]]] = Field(
        "auto", description="yolo: 'auto' (k-means on the training boxes), 'default' (YOLOv5's) or [[[w, h], ...], ...]"
    )
    config: str | dict[str, Any] | None = Field(None, description="ultralytics: the model's yaml (yolo11n.yaml, yolov8s.yaml, "
                                                "yolo26n.yaml ... as Ultralytics ships them, or a path); unset: the architecture "
                                                "of the checkpoint in model.weights")
    channels: dict[str, dict[str, Any]] | None = Field(None, description="the channel plan of a pruned model (kdet prune "
                                                       "writes it into its checkpoint; model.weights: pruned.pt adopts it)")
    fpn_channels: int = Field(64, ge=8, description="fcos, retinanet, faster_rcnn: channels of the FPN and head")
    extra_levels: bool = Field(True, description="fcos: add P6 and P7 (strides 64, 128) like the paper")
    pretrained_backbone: str | None = Field(None, description="local weights file for the backbone")
    weights: str | None = Field(None, description="kdet checkpoint to initialise the whole detector from (ultralytics: an "
                                "Ultralytics checkpoint too)")
    partial_weights: bool = Field(False, description="accept a weights or pretrained_backbone file that fits the model only "
                                  "in part: load the tensors that match by name and shape, leave the rest at their "
                                  "initialisation (default: such a file is refused)")
    box_weight: float = Field(0.05, ge=0, description="yolo: box loss weight")
    obj_weight: float = Field(1.0, ge=0, description="yolo: objectness loss weight")
    cls_weight: float = Field(0.5, ge=0, description="yolo: class loss weight")


class TrainConfig(Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1, description="images per optimiser step, over all processes under torchrun (each "
                            "process takes batch_size / processes of them)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.937, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_ratio: float = Field(0.05, ge=0, le=1)
    ema: bool = True
    ema_decay: float = Field(0.999, gt=0, lt=1)
    ema_ramp: float = Field(200, gt=0, description="updates over which the EMA decay ramps up")
    grad_clip: float | None = Field(10.0, gt=0)
    eval_every: int = Field(1, ge=1, description="evaluate on the validation split every N epochs")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    amp: Literal["bf16", "fp16", "none"] = Field(
        "none", description="mixed precision: bf16 (CUDA or CPU), fp16 (CUDA, with a gradient scaler that skips steps whose "
                            "loss or gradients are not finite; on the CPU training stays fp32), none. true is fp16, false none"
    )
    sync_bn: bool = Field(False, description="torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm) "
                          "instead of each process's share")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, value: Any) -> Any:
        # configs written when train.amp was a switch for fp16 on CUDA
        return {True: "fp16", False: "none"}.get(value, value) if isinstance(value, bool) else value


class EvalConfig(Strict):
    score_thresh: float = Field(0.001, ge=0, le=1)
    nms_iou: float = Field(0.6, gt=0, le=1)
    max_det: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)


class Config(Strict):
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


# ---------------------------------------------------------------------------------------------
# Distillation: a training config (``model`` is the student) plus a teacher and loss terms
# ---------------------------------------------------------------------------------------------
TEACHER_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
RESERVED_TEACHER_NAMES = ("head", "neck", "backbone")  # a term's teacher: reads NAME or NAME.feature, never a feature


class TeacherConfig(Strict):
    name: str | None = Field(None, pattern=TEACHER_NAME, description="the teacher's name, which terms give to read this "
                             "teacher alone (teacher: NAME or NAME.neck.p4); default: teacher, or teacher0, teacher1 ... "
                             "by position in a list of teachers")
    weight: float = Field(1.0, gt=0, description="several teachers: this teacher's share where a term averages the "
                          "teachers' outputs")
    checkpoint: str | None = Field(None, description="kdet checkpoint of the teacher (a path or bundled:NAME)")
    model: ModelConfig | None = Field(None, description="teacher architecture, when its weights are a plain state dict")
    weights: str | None = Field(None, description="state dict file for teacher.model")
    partial_weights: bool = Field(False, description="accept teacher.weights that fit teacher.model only in part (the rest "
                                  "of the teacher stays random); default: refused")
    input_size: int | None = Field(None, description="input size the teacher was trained at (checkpoints record it)")
    self: Literal["ema"] | None = Field(None, description="ema: the student's own exponential moving average (train.ema) "
                                        "is its teacher (mean teacher); no checkpoint, model or weights")
    batch_stats: bool | None = Field(None, description="the teacher's BatchNorm layers normalise with each batch's own "
                                     "statistics, as the student's do while it trains (the teacher's running statistics are "
                                     "left unchanged); false: its running statistics (eval mode). Default: true for self: ema, "
                                     "whose average in eval mode pulls the student towards the gap between its two BatchNorm "
                                     "modes at every step; false for every other teacher")
    train: bool = Field(False, description="online (mutual) distillation: train the teacher in the same step, on the labels "
                        "and from the student's outputs (response terms in reverse); saved as teacher_best.pt. It may start "
                        "from a checkpoint, from teacher.model with weights, or from teacher.model alone (from scratch)")

    def reads_batch_stats(self) -> bool:
        """Whether the teacher normalises with the batch's statistics (``batch_stats``, or its default)."""
        return self.batch_stats if self.batch_stats is not None else self.self == "ema"

    @field_validator("name")
    @classmethod
    def _not_a_feature_name(cls, value: str | None) -> str | None:
        if value in RESERVED_TEACHER_NAMES:
            raise ValueError(f"{value!r} names a part of a model (a term's teacher: reads a teacher's name or a feature); "
                             f"pick another name")
        return value


# ``teacher:`` is one teacher (a mapping) or several (a list); the tags keep validation errors
# about one teacher free of the other form's (config errors drop them from the key path)
_UNION_TAGS = ("(one)", "(list)")
TeacherSpec = Annotated[
    Union[Annotated[TeacherConfig, Tag(_UNION_TAGS[0])], Annotated[list[TeacherConfig], Tag(_UNION_TAGS[1])]],
    Discriminator(lambda value: _UNION_TAGS[1] if isinstance(value, list) else _UNION_TAGS[0]),
]


class TermConfig(Strict):
    loss: str = Field(..., description="a registered distillation loss (README: Distillation methods)")
    weight: float | Literal["auto"] = Field(
        1.0, description="the term's weight, or auto: set over the first steps so that the term's gradient on the "
                         "student is distill.auto.fraction of the detection loss's"
    )
    student: str = Field("head", description="'head', a feature name such as neck.p3, or 'neck'/'backbone' for every level")
    teacher: str | None = Field(None, description="teacher output to read; defaults to the same name as student")
    connector: Literal["auto", "conv", "converter", "none"] = Field(
        "auto", description="feature terms: 1x1 conv, or conv+BN+ReLU6 (FitNets converter); auto: the loss's choice"
    )
    resample: bool = Field(False, description="feature terms: resize the student map to the teacher's grid when strides differ")
    mask: Literal["none", "gt"] = Field("none", description="feature terms: gt counts only locations inside the ground-truth "
                                        "boxes (losses that support it)")
    enabled: bool = True
    args: dict[str, Any] = Field(default_factory=dict, description="the loss's own arguments")


class TeacherCacheConfig(Strict):
    dir: str | None = Field(None, description="directory of the teacher-output cache (kdet distill --teacher-cache DIR); "
                            "unset: the teacher runs on every batch")
    views: int | None = Field(None, ge=1, description="augmented views cached per image: epoch e replays the augmentation "
                              "of epoch (e - 1) mod views + 1; unset: one per epoch, the augmentation of a run without the cache")
    dtype: Literal["fp16", "fp32"] = Field("fp16", description="storage precision of the cached teacher outputs")


class AutoWeightConfig(Strict):
    fraction: float = Field(0.1, gt=0, description="a term's gradient norm on the student, as a fraction of the detection "
                            "loss's, that weight: auto aims at")
    steps: int = Field(20, ge=1, description="training steps over which the gradient norms are measured and averaged")


class PseudoLabelConfig(Strict):
    score: float = Field(0.5, gt=0, le=1, description="teacher detection score (as kdet predict shows it) from which a "
                         "detection on an unlabelled image becomes a box the student's own loss learns")
    weight: float = Field(1.0, ge=0, description="weight of the student's detection loss on the pseudo-labelled images")
    nms_iou: float = Field(0.6, gt=0, le=1, description="IoU of the class-wise NMS across levels and teachers, after the "
                           "feature-map NMS")


class DistillSettings(Strict):
    hard_weight: float = Field(1.0, ge=0, description="weight of the student's own detection loss on the labels")
    response: bool = Field(True, description="switch every response (head output) term on or off")
    features: bool = Field(True, description="switch every feature term on or off")
    terms: list[TermConfig] = Field(default_factory=list)
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="term weights over training: constant, or decaying (linear/cosine) to final_ratio at the last step"
    )
    final_ratio: float = Field(0.0, ge=0, le=1, description="term weight factor at the end of a decaying schedule")
    start_epoch: int = Field(1, ge=1, description="first epoch with distillation terms; earlier epochs train on the labels "
                             "alone (a burn-in: the student learns the task before it is taught; default 1, every epoch)")
    stop_epoch: int | None = Field(None, ge=0, description="last epoch with distillation terms; later epochs train on the "
                                   "labels alone (unset: every epoch)")
    assign: Literal["own", "teacher"] = Field(
        "own", description="whose predictions the student's own loss assigns its targets from: its own, or the teacher's "
                           "(PP-YOLOE+ / LAD distillation; a dfl or ultralytics student and a teacher with one anchor per location)"
    )
    auto: AutoWeightConfig = Field(AutoWeightConfig(), description="how terms with weight: auto get their weight")
    cache: TeacherCacheConfig = Field(TeacherCacheConfig(), description="teacher outputs computed once per augmented view "
                                      "and read back, instead of a teacher pass on every batch (kdet.distill.cache)")
    pseudo_labels: PseudoLabelConfig | None = Field(None, description="unlabelled images (data.unlabelled): the teachers' "
                                                    "detections as hard targets of the student's own loss; unset: none")


class DistillConfig(Config):
    """A training config whose ``model`` is the student, with a frozen teacher (or several)."""

    teacher: TeacherSpec
    distill: DistillSettings = DistillSettings()

    @field_validator("teacher")
    @classmethod
    def _distinct_names(cls, value: TeacherConfig | list[TeacherConfig]) -> TeacherConfig | list[TeacherConfig]:
        if isinstance(value, list):
            if not value:
                raise ValueError("the list of teachers is empty; give at least one")
            names = [t.name or f"teacher{i}" for i, t in enumerate(value)]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"teacher name(s) {twice} given to more than one teacher; give each teacher a name of its own")
        return value

    @model_validator(mode="after")
    def _distillation_epochs(self) -> "DistillConfig":
        start, stop, epochs = self.distill.start_epoch, self.distill.stop_epoch, self.train.epochs
        if start > epochs:
            raise ValueError(f"distill.start_epoch: {start} is after the last epoch (train.epochs: {epochs}), so nothing "
                             f"would be distilled; give an epoch from 1 to {epochs}")
        if stop is not None and stop < start:
            raise ValueError(f"distill.stop_epoch: {stop} is before distill.start_epoch: {start}, so nothing would be "
                             "distilled; give a stop_epoch at or after the start_epoch, or unset it")
        return self

    def distilled_epochs(self) -> tuple[int, int]:
        """The first and last epoch with distillation terms (``distill.start_epoch``, ``stop_epoch``)."""
        return self.distill.start_epoch, min(self.distill.stop_epoch or self.train.epochs, self.train.epochs)

    def teachers(self) -> list[TeacherConfig]:
        """Every teacher, each with its name set (see :attr:`TeacherConfig.name`)."""
        if isinstance(self.teacher, TeacherConfig):
            return [self.teacher.model_copy(update={"name": self.teacher.name or "teacher"})]
        return [t.model_copy(update={"name": t.name or f"teacher{i}"}) for i, t in enumerate(self.teacher)]


class ChainStage(Strict):
    name: str | None = Field(None, pattern=TEACHER_NAME, description="the stage's name; its run directory is N-NAME under "
                             "kdet chain --out (default: assistantN)")
    model: dict[str, Any] = Field(default_factory=dict, description="the stage student's model: the keys of model: that "
                                  "differ from the final student's ({size: s}); {} for the same model (a born-again "
                                  "generation)")

    @field_validator("model")
    @classmethod
    def _model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            ModelConfig.model_validate(value)
        except ValidationError as error:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None
        return value


class ChainConfig(DistillConfig):
    """A distillation config whose teacher teaches through a chain of students (``kdet chain``):
    teacher -> chain[0] -> chain[1] ... -> ``model``, each stage's student the next stage's teacher."""

    chain: list[ChainStage] = Field(..., min_length=1, description="the stages between the teacher and the final student "
                                    "(model:), in order")


# ---------------------------------------------------------------------------------------------
# Loading, overriding and error messages
# ---------------------------------------------------------------------------------------------
def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict | None = None, schema: type[Config] = Config
) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate against ``schema``
    (:class:`Config`, or :class:`DistillConfig` for ``kdet distill``). Raises :class:`ConfigError`."""
    raw: dict[str, Any] = dict(base or {})
    lines: dict[tuple, int] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text = path.read_text()
        loaded = read_yaml_config(path, text) or {}
        lines = _key_lines(text)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
        raw = _merge(raw, loaded)
    overridden: set[tuple] = set()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, for example --set train.epochs=10")
        parts = tuple(key.strip().split("."))
        _set_path(raw, parts, yaml.safe_load(value))
        overridden.add(parts)
    return validate_config(raw, source=source, lines=lines, overridden=overridden, schema=schema)


def load_student_config(path: str | Path, overrides: list[str] | None = None, *, base: dict | None = None) -> tuple[Config, bool]:
    """A training config from ``path``; from a distillation config, its student alone (the
    teacher and the terms dropped): the baseline with the same data, schedule and seed.
    Returns ``(config, whether teacher/distill keys were dropped)``."""
    loaded = read_yaml_config(Path(path)) if Path(path).is_file() else None
    if isinstance(loaded, dict) and ("teacher" in loaded or "distill" in loaded):
        config = load_config(path, overrides, base=base, schema=DistillConfig)
        return Config.model_validate(config.model_dump(exclude={"teacher", "distill"})), True
    return load_config(path, overrides, base=base), False


def validate_config(
    raw: dict, *, source: str = "config", lines: dict | None = None, overridden: set | None = None, schema: type[Config] = Config
) -> Config:
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_explain(error, source, lines or {}, overridden or set(), schema)) from None


def config_to_dict(config: Config) -> dict:
    return config.model_dump(mode="json")


def _explain(error: ValidationError, source: str, lines: dict, overridden: set, schema: type[BaseModel] = Config) -> str:
    messages = []
    for item in error.errors():
        loc = tuple(str(p) for p in item["loc"] if p not in _UNION_TAGS)
        dotted = ".".join(loc)
        if not loc:  # a check across keys: its message starts with the key it is about ("distill.start_epoch: ...")
            message = str(item["msg"]).removeprefix("Value error, ")
            key = tuple(message.split(":", 1)[0].split("."))
            messages.append(f"{_where(key, source, lines, overridden)}{message}.")
            continue
        where = _where(loc, source, lines, overridden)
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(loc[:-1], schema)
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" Did you mean {'.'.join(loc[:-1] + (close[0],))!r}?" if close else ""
            messages.append(f"{where}unknown key {dotted!r}.{hint} Valid keys here: {', '.join(valid)}.")
        elif item["type"] == "missing":
            messages.append(f"{where}missing required key {dotted!r}.")
        else:
            messages.append(f"{where}{dotted}: {item['msg']} (got {item.get('input')!r}).")
    return "invalid configuration:\n  " + "\n  ".join(messages)


def _where(loc: tuple, source: str, lines: dict, overridden: set) -> str:
    if loc not in lines:
        # a key only --set wrote (``--set trian.epochs=3`` is about the unknown top-level 'trian')
        written = sorted(o for o in overridden if o[: len(loc)] == loc)
        if written:
            return f"--set {'.'.join(written[0])}: "
    # --set replaces the whole value at its key: a bad item under it (distill.terms.0.weight
    # under --set distill.terms=[...]) came from --set even where the file has that item too
    for n in range(len(loc), 0, -1):
        if loc[:n] in overridden:
            return f"--set {'.'.join(loc[:n])}: "
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{source}, line {lines[loc[:n]]}: "
    return f"{source}: "


def _valid_keys(loc: tuple, schema: type[BaseModel] = Config) -> list[str]:
    model: type[BaseModel] = schema
    for part in loc:
        if part.isdigit():  # an item of a list of models (distill.terms.0)
            continue
        field = model.model_fields.get(part)
        inner = _model_type(field.annotation) if field is not None else None
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _model_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``M``, ``M | None``, ``list[M]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_type(arg)
        if found is not None:
            return found
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(f"line {line}: key {key!r} is written twice in the same mapping (first on line "
                                    f"{seen[key]}); YAML would keep only the last value. Remove one of them")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    pass


def read_yaml_config(path: Path, text: str | None = None) -> Any:
    """The YAML document in ``path`` (``text``, when already read). Raises :class:`ConfigError`
    naming the file and line when it is not valid YAML or writes a key twice in one mapping."""
    try:
        return yaml.load(path.read_text() if text is None else text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as error:
        raise ConfigError(f"{path}, {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line."""
    out: dict[tuple, int] = {}

    def walk(node: yaml.Node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                out[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                path = prefix + (str(index),)
                out[path] = item.start_mark.line + 1
                walk(item, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_path(raw: dict, parts: tuple, value: Any) -> None:
    """Set ``raw[parts[0]][parts[1]]...`` to ``value``; a number indexes a list the config already
    has (``distill.terms.0.weight``), other missing levels are made mappings."""
    node: Any = raw
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:depth])} is a list of {len(node)} item(s); "
                                  f"index it with 0 to {len(node) - 1}, or give the whole list (--set {'.'.join(parts[:depth])}=[...])")
            key: Any = int(part)
        else:
            key = part
        if depth == len(parts) - 1:
            node[key] = value
        else:
            if not isinstance(node[key] if isinstance(node, list) else node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
