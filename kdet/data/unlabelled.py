"""Unlabelled images for distillation (``data.unlabelled``): where they come from, and which of
them join each training batch.

:func:`read_unlabelled` reads a folder of images, or a dataset whose labels are ignored, and
drops every image the labelled dataset's splits hold: its training images are already there with
their labels, and its validation and test images must never be trained on, with labels or
without. The training images ``data.labelled_fraction`` leaves out are not in the training split
a run reads, so they stay, and ``data.unlabelled: train_rest`` names exactly them.

:class:`UnlabelledFeed` gives the unlabelled images of every training step. Each step adds
``per_batch`` of them to the labelled batch, so the labelled batches are those of a run without
them (and of the baseline). They are drawn in passes over the whole set, each pass a seeded
permutation, continuing from one epoch to the next, so every image is used about as often as the
others; which images a step gets depends only on ``(seed, epoch, step)``, and each is augmented
as a training sample of that epoch is (:meth:`~kdet.data.pipeline.DetectionDataset.sample`), so a
resumed run and the teacher cache see the same ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..config import TRAIN_REST, TRAIN_REST_NEEDS_FRACTION
from ..structures import DatasetIndex, ImageRecord
from .common import DataError, image_id_for, list_images, probe_images
from .pipeline import DetectionDataset, collate

Log = Callable[[str], None]


def read_unlabelled(path: str | Path, labelled: DatasetIndex, log: Log = print) -> list[ImageRecord]:
    """Records without boxes for the images at ``path``: a dataset (any format kdet reads; its
    labels are ignored) or else a folder of images, searched recursively; or, for the keyword
    ``train_rest``, the training images ``data.labelled_fraction`` left out of ``labelled``
    (``labelled.withheld``). Images of the labelled splits of ``labelled`` are left out and
    counted in the log (so of the training split, only those a labelled fraction keeps);
    unreadable images are skipped and named. Raises :class:`DataError` when no image is left."""
    from . import detect_format, read_dataset, resolve_data_path

    if str(path) == TRAIN_REST:
        records = [ImageRecord(r.image_id, r.path, r.width, r.height) for rest in labelled.withheld.values() for r in rest]
        if not records:
            raise DataError(TRAIN_REST_NEEDS_FRACTION)
        log(f"data.unlabelled: {len(records)} images of the training split that data.labelled_fraction leaves out "
            f"(train_rest, labels ignored)")
        return records
    root = resolve_data_path(path).absolute()
    if not root.exists():
        raise DataError(f"data.unlabelled: {root} does not exist; give a folder of images or a dataset")
    try:
        detect_format(root)
    except DataError:
        records = _image_folder(root, log)
        source = "images"
    else:
        index = read_dataset(root)
        records = [ImageRecord(r.image_id, r.path, r.width, r.height) for r in index.all_records()]
        source = f"{index.format.upper()} dataset, labels ignored"
    splits = {Path(r.path).absolute(): name for name, members in labelled.splits.items() for r in members}
    kept, dropped = [], {}
    for record in records:
        name = splits.get(Path(record.path).absolute())
        if name is None:
            kept.append(record)
        else:
            dropped[name] = dropped.get(name, 0) + 1
    if dropped:
        log("data.unlabelled: left out the images the labelled dataset holds ("
            + ", ".join(f"{n} of its {name} split" for name, n in sorted(dropped.items())) + ")")
    if not kept:
        raise DataError(f"data.unlabelled: no image of {root} is left to use"
                        + (" (every one is in the labelled dataset)" if dropped else "")
                        + "; give a folder of images the labelled dataset does not hold")
    log(f"data.unlabelled: {len(kept)} images from {root} ({source})")
    return kept


def _image_folder(root: Path, log: Log) -> list[ImageRecord]:
    paths = list_images(root, recursive=True) if root.is_dir() else []
    if not paths:
        raise DataError(f"data.unlabelled: {root} holds no images ({', '.join(('jpg', 'png', 'bmp', 'tif', 'webp'))}) and "
                        f"is no dataset kdet reads")
    infos = probe_images(paths, verify=True)
    records = []
    for path in paths:
        info = infos[path]
        if info.error_kind:
            log(f"data.unlabelled: skipped {path}: {info.error}")
            continue
        records.append(ImageRecord(image_id_for(path, root), path, info.width, info.height))
    return records


class UnlabelledFeed:
    """The unlabelled images each training step adds to its batch (see the module docstring).

    ``dataset``: the augmented unlabelled images; ``per_batch``: how many join each step;
    ``offset``: added to their indices in a batch, so they never collide with the labelled
    training set's (its size).
    """

    def __init__(self, dataset: DetectionDataset, per_batch: int, *, seed: int, offset: int, workers: int = 0) -> None:
        if per_batch < 1:
            raise ValueError(f"UnlabelledFeed: per_batch must be at least 1, got {per_batch}")
        self.dataset = dataset
        self.per_batch = per_batch
        self.seed = seed
        self.offset = offset
        self.workers = workers

    def order(self, epoch: int, steps: int) -> list[int]:
        """The unlabelled indices of epoch ``epoch`` (1-based) of ``steps`` steps, in step order."""
        size, count = len(self.dataset), steps * self.per_batch
        start = (epoch - 1) * count
        out = []
        for position in range(start, start + count):
            permutation = self._permutation(position // size)
            out.append(int(permutation[position % size]))
        return out

    def _permutation(self, sweep: int) -> np.ndarray:
        cached = getattr(self, "_sweep", None)
        if cached is None or cached[0] != sweep:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, 7_211_991, sweep]))
            self._sweep = (sweep, rng.permutation(len(self.dataset)))
        return self._sweep[1]

    def epoch(self, epoch: int, view: int, steps: int, *, rank: int = 0, world: int = 1
              ) -> Iterator[tuple[Tensor, list[dict[str, Tensor]], list[int]]]:
        """The ``steps`` chunks of epoch ``epoch``: ``(images, targets, indices)`` per step, each
        image the augmentation of ``view``, indices offset by :attr:`offset`. Process ``rank`` of
        ``world`` (torchrun) gets its contiguous share of every chunk, as of the labelled batch."""
        order = self.order(epoch, steps)
        chunks = [list(range(k * self.per_batch, (k + 1) * self.per_batch)) for k in range(steps)]
        shares = [chunk[rank * len(chunk) // world : (rank + 1) * len(chunk) // world] for chunk in chunks]
        loader = DataLoader(_Chunk(self.dataset, order, view), batch_sampler=shares, collate_fn=collate, num_workers=self.workers)
        for images, targets, indices in loader:
            yield images, targets, [self.offset + i for i in indices]


class _Chunk(Dataset):
    """Unlabelled images in a given order, augmented as epoch ``view`` does."""

    def __init__(self, dataset: DetectionDataset, order: list[int], view: int) -> None:
        self.dataset, self.order, self.view = dataset, order, view

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, item: int):
        image, target, index = self.dataset.sample(self.order[item], self.view)
        return image, {"boxes": target["boxes"][:0], "labels": target["labels"][:0]}, index


__all__ = ["UnlabelledFeed", "read_unlabelled"]
