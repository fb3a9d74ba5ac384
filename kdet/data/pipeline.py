"""From records to batches: letterbox to a fixed square input, augment with
torchvision.transforms.v2 (boxes as tv_tensors.BoundingBoxes), collate.

Geometry lives in :class:`Letterbox`, so predictions made on the model input can be mapped back
to the original image exactly (:meth:`Letterbox.to_original`).

A training sample's augmentation is a pure function of ``(seed, epoch, index)``
(:func:`sample_seed`): the same sample comes out bit for bit in any process, in any batch, with or
without loader workers. Resumed runs, baseline and distilled students, and the teacher-output
cache (:mod:`kdet.distill.cache`, which replays a sample to know what the teacher saw) rely on it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import AugmentConfig
from ..structures import ImageRecord
from .common import open_upright
from .image_cache import DiskImageCache

PAD_VALUE = 114  # grey, as YOLOv5 pads


@dataclass(frozen=True)
class Letterbox:
    """How an image of ``width x height`` was scaled by ``scale`` and padded by ``(pad_x, pad_y)``
    (left, top) into a ``size x size`` input."""

    width: int
    height: int
    size: int
    scale: float
    pad_x: int
    pad_y: int

    @staticmethod
    def fit(width: int, height: int, size: int) -> "Letterbox":
        scale = size / max(width, height)
        new_w, new_h = round(width * scale), round(height * scale)
        return Letterbox(width, height, size, scale, (size - new_w) // 2, (size - new_h) // 2)

    @property
    def resized(self) -> tuple[int, int]:
        return round(self.height * self.scale), round(self.width * self.scale)

    def to_input(self, boxes: np.ndarray | Tensor):
        """Original-image xyxy -> model-input xyxy."""
        offset = boxes.new_tensor([self.pad_x, self.pad_y] * 2) if isinstance(boxes, Tensor) else np.array([self.pad_x, self.pad_y] * 2, np.float32)
        return boxes * self.scale + offset

    def to_original(self, boxes: Tensor) -> Tensor:
        """Model-input xyxy -> original-image xyxy, clipped to the image."""
        offset = boxes.new_tensor([self.pad_x, self.pad_y] * 2)
        out = (boxes - offset) / self.scale
        out[:, 0::2] = out[:, 0::2].clamp(0, self.width)
        out[:, 1::2] = out[:, 1::2].clamp(0, self.height)
        return out


def load_image(path) -> Tensor:
    """``uint8 [3, H, W]`` RGB, turned upright by its EXIF orientation
    (:func:`~kdet.data.common.open_upright`): ``H`` and ``W`` are the sizes the readers record."""
    return TF.pil_to_tensor(open_upright(path))


def letterbox_image(image: Tensor, box: Letterbox) -> Tensor:
    """Resize ``uint8 [3, H, W]`` keeping the aspect ratio and pad to ``[3, size, size]``."""
    resized = TF.resize(image, list(box.resized), antialias=True)
    canvas = torch.full((3, box.size, box.size), PAD_VALUE, dtype=torch.uint8)
    h, w = resized.shape[-2:]
    canvas[:, box.pad_y : box.pad_y + h, box.pad_x : box.pad_x + w] = resized
    return canvas


def build_augmentation(config: AugmentConfig) -> v2.Compose:
    """Photometric and geometric augmentation of a letterboxed ``uint8`` image and its boxes."""
    steps: list = []
    if config.scale != (1.0, 1.0) or config.translate > 0:
        steps.append(
            v2.RandomAffine(degrees=0, translate=(config.translate, config.translate), scale=config.scale, fill=PAD_VALUE)
        )
    if config.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(config.hflip))
    if config.vflip > 0:
        steps.append(v2.RandomVerticalFlip(config.vflip))
    if any((config.brightness, config.contrast, config.saturation, config.hue)):
        steps.append(v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue))
    # boxes pushed (mostly) out of the frame by the affine step are removed here, with their labels
    steps.append(v2.SanitizeBoundingBoxes(min_size=2))
    return v2.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation, a 63-bit integer that depends only on the
    run's ``seed``, the ``epoch`` and the sample's ``index`` (mixed by numpy's SeedSequence, so
    neighbouring epochs and indices get unrelated streams)."""
    high, low = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(2)
    return (int(high) << 31) | (int(low) >> 1)


class DetectionDataset(Dataset):
    """Letterboxed (and, for training, augmented) images with their targets.

    Item: ``(image float [3, S, S] in [0, 1], target {"boxes": [M, 4] input px, "labels": [M]},
    index)``. ``cache``: ``"ram"`` (or ``True``) decodes every letterboxed image once, here, and
    keeps it in memory; ``"disk"`` reads it from a :class:`~kdet.data.image_cache.DiskImageCache`
    in ``cache_dir`` (decoded and stored at first use, shared with other runs); ``"none"`` (or
    ``False``) decodes it at every use.

    With ``augment``, ``dataset[i]`` is :meth:`sample` ``(i, epoch)`` for the epoch last given to
    :meth:`set_epoch` (as ``DistributedSampler.set_epoch``; the trainer sets it before every
    epoch): the augmentation draws come from generators seeded by :func:`sample_seed`, never from
    the process's global random state.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        input_size: int,
        *,
        augment: AugmentConfig | None = None,
        cache: bool | str = True,
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.input_size = input_size
        self.boxes = [Letterbox.fit(r.width, r.height, input_size) for r in records]
        self.augment_config = augment
        self.augment = build_augmentation(augment) if augment is not None else None
        self.seed = seed
        self.epoch = 1
        mode = {True: "ram", False: "none"}.get(cache, cache) if isinstance(cache, bool) else cache
        if mode not in ("ram", "disk", "none"):
            raise ValueError(f"cache must be 'ram', 'disk' or 'none', got {cache!r}")
        self.cache_mode = mode
        self._disk = DiskImageCache(cache_dir) if mode == "disk" else None
        self._cache: list[Tensor] | None = [self._load(i) for i in range(len(records))] if mode == "ram" else None

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> Tensor:
        path, box = self.records[index].path, self.boxes[index]
        if self._disk is not None:
            return self._disk.load(path, box.size, lambda: letterbox_image(load_image(path), box))
        return letterbox_image(load_image(path), box)

    def letterboxed(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``uint8`` letterboxed image, boxes in input px and labels, before augmentation."""
        image = self._cache[index] if self._cache is not None else self._load(index)
        record = self.records[index]
        boxes = torch.from_numpy(self.boxes[index].to_input(record.boxes)).float()
        return image, boxes, torch.from_numpy(record.labels)

    def set_epoch(self, epoch: int) -> None:
        """Make ``dataset[i]`` give the augmentation of ``epoch`` (1-based)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], int]:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> tuple[Tensor, dict[str, Tensor], int]:
        """Item ``index`` as epoch ``epoch`` augments it; the same result in any process, in
        any order. Without augmentation, ``epoch`` plays no part."""
        if self.augment is None:
            image, boxes, labels = self.letterboxed(index)
            return image.float() / 255.0, {"boxes": boxes.float(), "labels": labels.long()}, index
        rng = random.Random(sample_seed(self.seed, epoch, index))
        if self.augment_config.mosaic > 0 and rng.random() < self.augment_config.mosaic:
            image, boxes, labels = self._mosaic(index, rng)
        else:
            image, boxes, labels = self.letterboxed(index)
        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
            "labels": labels,
        }
        # torchvision's v2 transforms draw from torch's global generator: seed it for this sample
        # and give the caller's state back afterwards
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            sample = self.augment(sample)
        image, boxes, labels = sample["image"].as_subclass(Tensor), sample["boxes"].as_subclass(Tensor), sample["labels"]
        return image.float() / 255.0, {"boxes": boxes.float(), "labels": labels.long()}, index

    def _mosaic(self, index: int, rng: random.Random) -> tuple[Tensor, Tensor, Tensor]:
        """YOLOv4/v5's mosaic: four letterboxed images meet at a random centre ``(cx, cy)`` in
        ``[S/2, 3S/2]^2`` of a ``2S x 2S`` plane, whose middle ``S x S`` is kept."""
        size = self.input_size
        others = [rng.randrange(len(self)) for _ in range(3)]
        cx, cy = (int(rng.uniform(0.5 * size, 1.5 * size)) for _ in range(2))
        # the plane is drawn on a 3S canvas shifted by S/2 so no image is placed at a negative index
        shift = size // 2
        canvas = torch.full((3, 3 * size, 3 * size), PAD_VALUE, dtype=torch.uint8)
        all_boxes, all_labels = [], []
        # image k's bottom-right, bottom-left, top-right, top-left corner meets the centre
        for k, item in enumerate([index, *others]):
            image, boxes, labels = self.letterboxed(item)
            x0 = shift + (cx - size if k in (0, 2) else cx)
            y0 = shift + (cy - size if k in (0, 1) else cy)
            canvas[:, y0 : y0 + size, x0 : x0 + size] = image
            all_boxes.append(boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
            all_labels.append(labels)
        crop = canvas[:, size : 2 * size, size : 2 * size]
        boxes = (torch.cat(all_boxes) - size).clamp(0, size)  # boxes left empty are sanitised later
        return crop.contiguous(), boxes, torch.cat(all_labels)


def collate(batch: list) -> tuple[Tensor, list[dict[str, Tensor]], list[int]]:
    images, targets, indices = zip(*batch)
    return torch.stack(images), list(targets), list(indices)
