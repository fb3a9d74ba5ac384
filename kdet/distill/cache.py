"""The teacher-output cache: run the frozen teacher once per augmented view of each training
image, keep what the distillation terms read, and read it back during training instead of
running the teacher on every batch (``kdet distill --teacher-cache DIR``, ``kdet cache``).

Deterministic replay, not a cache of the plain images
  The teacher must see the very image the student sees. Outputs computed on the plain image
  cannot be carried through the augmentation afterwards: a mosaic mixes four images around a
  random centre, a random scale changes what each pyramid level responds to, a colour change
  changes the responses themselves, and none of that can be applied to a feature or head map.
  So the cache holds the teacher's outputs on the augmented samples, and relies on the data
  pipeline making every training sample a pure function of ``(seed, epoch, index)``
  (:meth:`kdet.data.pipeline.DetectionDataset.sample`): training remakes the same augmented image
  bit for bit, in any batch and any process, and reads the teacher's outputs for it by
  ``(view, index)``.

Views
  View ``k`` of an image is the augmentation epoch ``k`` gives it in a run without the cache.
  ``distill.cache.views`` unset: a run of E epochs replays views 1..E, the data stream of a run
  without the cache (and of its baseline); the teacher runs E times per image, once for every
  later run sharing the cache. ``views: V`` below E: epoch ``e`` replays view
  ``(e - 1) mod V + 1``; the teacher runs V times per image, but the student then sees only V
  augmentations of each image (its batches are still shuffled anew every epoch), less variety
  than its baseline, which can cost accuracy on small data sets. What a view holds does not
  depend on V or on the number of epochs, so runs with other values share the views they have
  in common.

What is stored, per (view, image)
  ``head``: every head level of the teacher, class logits, box and score maps and a DFL head's
  box edge distributions as the head outputs them (the distiller derives what each response
  term reads from them, as it does from a live teacher), when a response term is on;
  ``feature.<name>``: each teacher feature map a feature term reads. Feature maps are much
  larger than the head maps; the size estimate printed before a build says how much. fp16 by
  default (half the disk; values within fp16 rounding, about 1e-3 relative, of the teacher's),
  fp32 on request.

Layout of ``DIR``
  ``DIR/<fingerprint>/manifest.json``: what the cache was made from and the layout of each group;
  ``DIR/<fingerprint>/<group>/view0003.npy``: ``[images, row]`` array, read as a memory map;
  ``DIR/<fingerprint>/<group>/view0003.done.npy``: ``bool [images]``, the rows written.
  The fingerprint covers the teacher's weights, the training records (image paths, file sizes
  and times, boxes, labels), the input size, the augmentation settings, the seed, the storage
  dtype and the torch/torchvision versions (their transforms make the augmented images). A run
  whose fingerprint differs gets a subdirectory of its own rather than an error: one ``DIR``
  then serves every seed and teacher of a benchmark, and nothing stale can be read, since a
  subdirectory only ever holds outputs of its own fingerprint. The log names the other
  subdirectories and what differs from them.

Writes
  Array files are created full size under a temporary name and renamed into place; rows are
  written in place, flushed, and only then marked in the done mask, which is itself replaced
  atomically (:func:`kdet.engine.checkpoint.atomic_file`). An interrupted build resumes entry by entry, and
  no reader takes a half-written row for a finished one. A build holds a lock on its
  subdirectory, so two runs started together on one cache build it once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, TeacherCacheConfig
from ..data.pipeline import DetectionDataset
from ..engine.checkpoint import atomic_file
from ..models import Detector
from ..structures import DetectorOutput, FeatureMap, HeadLevel
from .pairing import PairingReport

Log = Callable[[str], None]

CACHE_FORMAT = 1
DTYPES = {"fp16": np.float16, "fp32": np.float32}
DISK_RESERVE = 256 * 2**20  # left free on the disk after a build


# the parts of a HeadLevel the cache stores, those a head has (score and box_dist may be None)
HEAD_PARTS = ("cls_logits", "box", "score", "box_dist")


class TeacherCacheError(ConfigError):
    """The cache cannot be used as configured; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------
# What is stored: groups of arrays, one row per image
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredArray:
    """One teacher output inside a group's row: ``shape`` per image, from element ``offset``."""

    name: str  # "p3.cls_logits", "p3.box", "p3.score", "p3.box_dist" in the head group; the feature name in a feature group
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Group:
    """Teacher outputs stored together, one flat row per (view, image): ``head`` (every head
    level) or ``feature.<name>`` (one feature map)."""

    name: str
    arrays: tuple[StoredArray, ...]

    @property
    def row_size(self) -> int:
        return sum(a.numel for a in self.arrays)

    def to_dict(self) -> dict:
        return {"arrays": [{"name": a.name, "shape": list(a.shape), "offset": a.offset} for a in self.arrays]}

    def rows(self, output: DetectorOutput) -> Tensor:
        """``[N, row_size]``: this group's outputs of a batch, flattened in the stored order."""
        return torch.cat([_tensor(output, self.name, a.name).flatten(1) for a in self.arrays], 1)


def _tensor(output: DetectorOutput, group: str, name: str) -> Tensor:
    if group == "head":
        level_name, part = name.rsplit(".", 1)
        level = next(level for level in output.head if level.name == level_name)
        return getattr(level, part)
    return output.features[name].tensor


def needed_groups(report: PairingReport) -> list[str]:
    """The groups the active terms of ``report`` read: ``head`` for response terms, terms that
    read the teacher's quality and a student assigning from the teacher, one ``feature.<teacher feature>`` per feature a feature term
    reads."""
    groups = ["head"] if report.assign_from_teacher else []
    for plan in report.terms:
        if not plan.active:
            continue
        names = ["head"] if plan.kind == "response" else [f"feature.{f.teacher}" for f in plan.features]
        if "teacher_quality" in plan.context:
            names.append("head")
        groups += [name for name in names if name not in groups]
    return groups


def group_layouts(probe: DetectorOutput, names: list[str]) -> dict[str, Group]:
    """The layout of each group, from a teacher output on one image."""
    groups = {}
    for name in names:
        arrays, offset = [], 0
        if name == "head":
            for level in probe.head:
                for part in HEAD_PARTS:
                    tensor = getattr(level, part)
                    if tensor is not None:
                        arrays.append(StoredArray(f"{level.name}.{part}", tuple(tensor.shape[1:]), offset))
                        offset += arrays[-1].numel
        else:
            feature = name.removeprefix("feature.")
            arrays.append(StoredArray(feature, tuple(probe.features[feature].tensor.shape[1:]), 0))
        groups[name] = Group(name, tuple(arrays))
    return groups


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------
def teacher_digest(teacher: Detector) -> str:
    """SHA-256 of the teacher's family, classes and weights
    (:func:`kdet.engine.export.weights_fingerprint`)."""
    from ..engine.export import weights_fingerprint

    identity = json.dumps([teacher.family, list(teacher.class_names), weights_fingerprint(teacher)])
    return hashlib.sha256(identity.encode()).hexdigest()


def records_digest(dataset: DetectionDataset) -> str:
    """SHA-256 of the training records in order: image path, file size and modification time,
    image size, boxes and labels."""
    digest = hashlib.sha256()
    for record in dataset.records:
        stat = os.stat(record.path)
        digest.update(f"{record.path}|{stat.st_size}|{stat.st_mtime_ns}|{record.width}x{record.height}|".encode())
        digest.update(record.boxes.tobytes())
        digest.update(record.labels.tobytes())
    return digest.hexdigest()


def fingerprint_parts(teacher: Detector, dataset: DetectionDataset, dtype: str) -> dict:
    """Everything the stored outputs depend on, in readable form (the manifest keeps it)."""
    if dataset.augment_config is None:
        raise ValueError("the teacher cache replays training samples; give it the augmented training set")
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_digest(teacher),
        "data": records_digest(dataset),
        "images": len(dataset),
        "input_size": dataset.input_size,
        "augment": dataset.augment_config.model_dump(mode="json"),
        "seed": dataset.seed,
        "dtype": dtype,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


_PART_NAMES = {"teacher": "teacher weights", "data": "training images or labels", "images": "number of images",
               "input_size": "input size", "augment": "augmentation", "seed": "seed", "dtype": "storage dtype",
               "torch": "torch version", "torchvision": "torchvision version", "format": "cache format"}


# ---------------------------------------------------------------------------------------------
# The cache on disk
# ---------------------------------------------------------------------------------------------
@dataclass
class CacheEstimate:
    """Sizes of the groups a run needs over its views, and how many rows of each are missing."""

    groups: dict[str, Group]
    views: list[int]
    images: int
    itemsize: int
    missing_rows: dict[str, int]  # group name -> (view, image) rows not written yet

    def bytes_per_image(self, group: Group | None = None) -> int:
        groups = [group] if group is not None else list(self.groups.values())
        return sum(g.row_size for g in groups) * self.itemsize

    @property
    def entries(self) -> int:
        return self.images * len(self.views) * len(self.groups)

    @property
    def present(self) -> int:
        return self.entries - sum(self.missing_rows.values())

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_image() * self.images * len(self.views)

    @property
    def missing_bytes(self) -> int:
        return sum(self.groups[name].row_size * self.itemsize * rows for name, rows in self.missing_rows.items())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(self.bytes_per_image(g))}" for name, g in self.groups.items())
        return (f"{len(self.views)} view(s) x {self.images} images x {format_bytes(self.bytes_per_image())} per image "
                f"({parts}) = {format_bytes(self.total_bytes)}; {self.present} of {self.entries} entries present, "
                f"{format_bytes(self.missing_bytes)} to write")


class TeacherCache:
    """One subdirectory of a cache directory: the outputs of one teacher on one training set,
    augmentation and seed (see the module docstring)."""

    def __init__(self, root: str | Path, parts: dict) -> None:
        self.root = Path(root)
        self.parts = parts
        self.fingerprint = fingerprint(parts)
        self.path = self.root / self.fingerprint
        self.images = int(parts["images"])
        self.dtype = DTYPES[parts["dtype"]]
        self._arrays: dict[tuple[str, int], np.ndarray] = {}

    # -- manifest -------------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        path = self.path / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise TeacherCacheError(f"{path}: not valid JSON ({error}); delete {self.path} to rebuild that cache") from None
        if manifest.get("fingerprint") != self.fingerprint or manifest.get("parts") != self.parts:
            raise TeacherCacheError(f"{path} does not describe the cache its directory is named for (fingerprint "
                                    f"{manifest.get('fingerprint')!r}, expected {self.fingerprint!r}); it was moved or "
                                    f"edited. Delete {self.path} to rebuild it.")
        return manifest

    def others(self) -> list[str]:
        """Other caches in the directory, each with what differs from this one."""
        out = []
        for path in sorted(self.root.glob("*/manifest.json")):
            if path.parent == self.path:
                continue
            try:
                parts = json.loads(path.read_text()).get("parts", {})
            except (OSError, json.JSONDecodeError):
                continue
            differs = [_PART_NAMES.get(k, k) for k in sorted(set(parts) | set(self.parts)) if parts.get(k) != self.parts.get(k)]
            out.append(f"{path.parent.name} (differs in {', '.join(differs) or 'nothing'}, {format_bytes(_du(path.parent))})")
        return out

    def _check_layouts(self, groups: dict[str, Group]) -> None:
        """Record the layout of new groups in the manifest; refuse a layout that changed."""
        manifest = self.manifest() or {"fingerprint": self.fingerprint, "parts": self.parts, "groups": {}}
        changed = False
        for name, group in groups.items():
            stored = manifest["groups"].get(name)
            if stored is None:
                manifest["groups"][name] = group.to_dict()
                changed = True
            elif stored != group.to_dict():
                raise TeacherCacheError(f"{self.path}: group {name} was stored with another layout than this teacher's "
                                        f"outputs have now (the model code changed?). Delete {self.path} to rebuild it.")
        if changed:
            with atomic_file(self.path / "manifest.json") as handle:
                handle.write(json.dumps(manifest, indent=1).encode())

    # -- entries --------------------------------------------------------------------------------
    def _file(self, group: str, view: int, kind: str = "") -> Path:
        return self.path / group / f"view{view:04d}{kind}.npy"

    def done(self, group: str, view: int) -> np.ndarray:
        """``bool [images]``: which rows of ``group`` in ``view`` are written."""
        path = self._file(group, view, ".done")
        return np.load(path) if path.is_file() else np.zeros(self.images, bool)

    def estimate(self, groups: dict[str, Group], views: list[int]) -> CacheEstimate:
        missing = {name: sum(int((~self.done(name, v)).sum()) for v in views) for name in groups}
        return CacheEstimate(groups, views, self.images, np.dtype(self.dtype).itemsize, missing)

    def check_space(self, estimate: CacheEstimate, settings_hint: str = "distill.cache") -> None:
        """Refuse a build the disk cannot hold, saying how much is needed and how to need less."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        needed = estimate.missing_bytes
        if needed + DISK_RESERVE <= free:
            return
        feature_bytes = sum(estimate.bytes_per_image(g) for n, g in estimate.groups.items() if n != "head")
        ways = []
        if len(estimate.views) > 1:
            fewer = max(1, len(estimate.views) // 4)
            ways.append(f"fewer views ({settings_hint}.views={fewer} needs about "
                        f"{format_bytes(needed * fewer // len(estimate.views))}; less augmentation variety)")
        if estimate.itemsize > 2:
            ways.append(f"fp16 storage ({settings_hint}.dtype=fp16, half the size)")
        if feature_bytes:
            share = feature_bytes / estimate.bytes_per_image()
            ways.append(f"fewer or smaller feature maps in the feature terms (they are {share:.0%} of it)")
        ways.append("a --teacher-cache directory on a disk with more room, or no cache")
        raise TeacherCacheError(
            f"teacher cache: {self.root} needs {format_bytes(needed)} more ({estimate.describe()}), but its disk has "
            f"{format_bytes(free)} free and kdet leaves {format_bytes(DISK_RESERVE)} spare. To need less: "
            + "; ".join(ways) + "."
        )

    def build(self, dataset: DetectionDataset, teacher: Detector, groups: dict[str, Group], views: list[int], *,
              batch_size: int, workers: int, log: Log) -> int:
        """Run the teacher on every (view, image) some group lacks and store the outputs.
        Returns the number of images the teacher ran on."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self._lock(log):
            self._check_layouts(groups)
            masks = {(g, v): self.done(g, v) for g in groups for v in views}
            todo = [(v, int(i)) for v in views
                    for i in np.flatnonzero(np.any([~masks[g, v] for g in groups], axis=0))]
            if not todo:
                return 0
            arrays = {(g, v): self._writable(groups[g], v) for g in groups for v in views}
            device = next(teacher.parameters()).device
            loader = DataLoader(_Replay(dataset, todo), batch_size=batch_size, num_workers=workers,
                                collate_fn=_collate_replay, generator=torch.Generator().manual_seed(0))
            last_view, started = None, time.perf_counter()
            for images, batch_views, indices in loader:
                with torch.no_grad():
                    output = teacher(images.to(device))
                rows = {name: self._checked_rows(group.rows(output).cpu(), name) for name, group in groups.items()}
                for view in sorted(set(batch_views.tolist())):
                    if last_view is not None and view != last_view:
                        log(f"teacher cache: view {last_view} done ({time.perf_counter() - started:.0f}s so far)")
                    last_view = view
                    in_view = (batch_views == view).numpy()
                    for name in groups:
                        mask = masks[name, view]
                        index = indices.numpy()[in_view]
                        write = ~mask[index]
                        if not write.any():
                            continue
                        array = arrays[name, view]
                        array[index[write]] = rows[name][in_view][write]
                        array.flush()  # the rows reach the file before the mask says they are there
                        mask[index[write]] = True
                        with atomic_file(self._file(name, view, ".done")) as handle:
                            np.save(handle, mask)
            return len(todo)

    def _checked_rows(self, rows: Tensor, name: str) -> np.ndarray:
        """``rows`` in the storage dtype; an error if they are not finite there."""
        stored = rows.numpy().astype(self.dtype)
        if np.isfinite(stored).all():
            return stored
        if not torch.isfinite(rows).all():
            raise TeacherCacheError(f"teacher cache: the teacher's {name} outputs are not finite on some training images; "
                                    f"check the teacher with `kdet eval`")
        raise TeacherCacheError(f"teacher cache: the teacher's {name} outputs reach {rows.abs().max().item():.3g}, beyond "
                                f"the range of {self.parts['dtype']}; set distill.cache.dtype=fp32")

    def _writable(self, group: Group, view: int) -> np.ndarray:
        path = self._file(group.name, view)
        shape = (self.images, group.row_size)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=shape).flush()
            os.replace(tmp, path)
        array = np.load(path, mmap_mode="r+")
        if array.shape != shape or array.dtype != self.dtype:
            raise TeacherCacheError(f"{path} holds {array.dtype} {array.shape}, expected {np.dtype(self.dtype)} {shape}; "
                                    f"delete {self.path} to rebuild that cache")
        return array

    @contextlib.contextmanager
    def _lock(self, log: Log) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # no advisory locks here; concurrent builds only repeat work
            yield
            return
        with open(self.path / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"teacher cache: another process is building {self.path}; waiting for it")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self, group: Group, view: int, indices: list[int]) -> Tensor:
        """``[len(indices), row_size]`` rows of ``group`` in ``view``, in the stored dtype."""
        array = self._arrays.get((group.name, view))
        if array is None:
            array = self._arrays[group.name, view] = np.load(self._file(group.name, view), mmap_mode="r")
        return torch.from_numpy(np.asarray(array[np.asarray(indices)]))

    def bytes_on_disk(self) -> int:
        return _du(self.path)


class _Replay(Dataset):
    """The augmented images of (view, index) entries, as training makes them."""

    def __init__(self, dataset: DetectionDataset, entries: list[tuple[int, int]]) -> None:
        self.dataset = dataset
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int) -> tuple[Tensor, int, int]:
        view, index = self.entries[item]
        image, _, _ = self.dataset.sample(index, view)
        return image, view, index


def _collate_replay(batch: list) -> tuple[Tensor, Tensor, Tensor]:
    images, views, indices = zip(*batch)
    return torch.stack(images), torch.tensor(views), torch.tensor(indices)


# ---------------------------------------------------------------------------------------------
# The teacher during training
# ---------------------------------------------------------------------------------------------
class CachedTeacher:
    """Stands in for the teacher's forward pass during training: the stored outputs of a batch's
    samples, in the form a live teacher gives them (a :class:`DetectorOutput` holding the stored
    head levels and feature maps only; head levels are ``None`` when no response term is on)."""

    def __init__(self, cache: TeacherCache, groups: dict[str, Group], views: int | None, probe: DetectorOutput) -> None:
        self.cache = cache
        self.groups = groups
        self.views = views
        self._levels = [replace(level, **{part: None if getattr(level, part) is None else getattr(level, part)[:0]
                                          for part in HEAD_PARTS}) for level in probe.head]
        self._strides = {name: fm.stride for name, fm in probe.features.items()}

    def data_epoch(self, epoch: int) -> int:
        """The view (the augmentation of that epoch) training epoch ``epoch`` replays."""
        return replayed_view(epoch, self.views)

    def outputs(self, indices: list[int], epoch: int, device: torch.device) -> DetectorOutput:
        view = self.data_epoch(epoch)
        head: list[HeadLevel | None] = []
        features: dict[str, FeatureMap] = {}
        for name, group in self.groups.items():
            rows = self.cache.read(group, view, indices).to(device, non_blocking=True).float()  # [N, row]
            parts = {a.name: rows[:, a.offset : a.offset + a.numel].view(len(indices), *a.shape) for a in group.arrays}
            if name == "head":
                head = [replace(level, **{part: parts.get(f"{level.name}.{part}") for part in HEAD_PARTS})
                        for level in self._levels]
            else:
                feature = name.removeprefix("feature.")
                features[feature] = FeatureMap(parts[feature], self._strides[feature])
        return DetectorOutput(features=features, head=head)


def prepare(settings: TeacherCacheConfig, *, teacher: Detector, report: PairingReport, dataset: DetectionDataset,
            epochs: int, batch_size: int, workers: int, log: Log, also: tuple[str, ...] = (),
            distilled: tuple[int, int] | None = None) -> tuple[CachedTeacher | None, dict]:
    """Open the cache for this teacher and training set, build what a run of ``epochs`` epochs
    lacks (after checking the disk can hold it), and return what reads it during training, with
    what the build did (``build_time_s``, sizes) for ``results.json``. ``also``: groups stored
    besides those the terms read (``head`` for pseudo-labels). ``distilled``: the first and last
    epoch with distillation terms (:meth:`~kdet.config.DistillConfig.distilled_epochs`); only
    their views are built.

    The teacher runs on the device it is on. Returns ``(None, {...})`` when no active term reads
    the teacher.
    """
    if not settings.dir:
        raise ValueError("prepare: settings.dir is not set")
    names = needed_groups(report)
    names += [name for name in also if names and name not in names]
    if not names:
        log("teacher cache: no active term reads the teacher; the cache is not used")
        return None, {"dir": settings.dir, "used": False}
    first, last = distilled or (1, epochs)
    views = sorted({replayed_view(epoch, settings.views) for epoch in range(first, last + 1)})
    cache = TeacherCache(settings.dir, fingerprint_parts(teacher, dataset, settings.dtype))
    size = dataset.input_size
    with torch.no_grad():
        probe = teacher(torch.zeros(1, 3, size, size, device=next(teacher.parameters()).device))
    groups = group_layouts(probe, names)
    existing = cache.manifest() is not None
    log(f"teacher cache: {cache.path} ({'found' if existing else 'new'}, {settings.dtype}"
        + (f", {settings.views} views replayed over {epochs} epochs" if settings.views and settings.views < epochs else "")
        + ")")
    if not existing:
        others = cache.others()
        if others:
            log(f"teacher cache: {cache.root} holds {len(others)} cache(s) for other settings, left as they are: " + "; ".join(others))
    estimate = cache.estimate(groups, views)
    log(f"teacher cache: {estimate.describe()}")
    cache.check_space(estimate)
    started = time.perf_counter()
    # the build draws no number from the run's generators, so a run with the cache starts from
    # the same state (connectors, batches) as one without
    with torch.random.fork_rng(devices=[]):
        built = cache.build(dataset, teacher, groups, views, batch_size=batch_size, workers=workers, log=log)
    build_time = time.perf_counter() - started
    incomplete = [(g, v) for g in groups for v in views if not cache.done(g, v).all()]
    if incomplete:
        raise TeacherCacheError(f"teacher cache: {cache.path} still lacks entries ({incomplete[:3]} ...) after the build; "
                                f"delete {cache.path} and run again")
    bytes_used = cache.bytes_on_disk()
    log("teacher cache: " + (f"teacher ran on {built} (view, image) entries in {build_time:.1f}s" if built else "every entry present, nothing to build")
        + f"; {format_bytes(bytes_used)} on disk")
    stats = {"dir": str(settings.dir), "path": str(cache.path), "used": True, "fingerprint": cache.fingerprint,
             "dtype": settings.dtype, "views": len(views), "groups": {n: g.row_size * estimate.itemsize for n, g in groups.items()},
             "built_entries": built, "reused_entries": len(views) * cache.images - built, "build_time_s": round(build_time, 2), "bytes": bytes_used}
    return CachedTeacher(cache, groups, settings.views, probe), stats


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def replayed_view(epoch: int, views: int | None) -> int:
    """The view training epoch ``epoch`` replays: its own, or with ``views`` V the views 1..V in turn."""
    return epoch if views is None else (epoch - 1) % views + 1


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _du(path: Path) -> int:
    """Bytes actually allocated under ``path`` (array files are sparse until written)."""
    total = 0
    for file in path.rglob("*"):
        if file.is_file():
            stat = file.stat()
            total += getattr(stat, "st_blocks", 0) * 512 or stat.st_size
    return total


__all__ = ["CachedTeacher", "TeacherCache", "TeacherCacheError", "group_layouts", "needed_groups", "prepare"]
