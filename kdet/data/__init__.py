"""Where data enters kdet: VOC, COCO and YOLO readers that all produce one
:class:`~kdet.structures.DatasetIndex`, with every defect reported as a
:class:`~kdet.structures.Problem` instead of a crash or a silent drop.

>>> index = read_dataset("path/to/dataset")          # format detected
>>> index.class_names, {k: len(v) for k, v in index.splits.items()}
>>> [p.kind for p in index.problems]
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundled import BUNDLED_DATASETS, resolve_bundled
from ..structures import DatasetIndex, ImageRecord
from .coco import find_annotation_files, read_coco
from .common import DataError, check_fractions
from .voc import is_voc, read_voc
from .yolo import find_dataset_yaml, is_yolo_folder, read_yolo

__all__ = [
    "DataError",
    "bundled_bccd_path",
    "detect_format",
    "keep_classes",
    "read_dataset",
    "remap_classes",
    "resolve_data_path",
]

FORMATS = ("voc", "coco", "yolo")


def bundled_bccd_path() -> Path:
    """The half-resolution BCCD copy shipped with kdet (VOC layout, 364 images, 320x240)."""
    return BUNDLED_DATASETS["bccd"]


def resolve_data_path(path: str | Path) -> Path:
    """``bundled:bccd`` -> the bundled copy; anything else -> that path (``~`` expanded)."""
    return resolve_bundled(path, BUNDLED_DATASETS, "dataset", DataError)


def detect_format(path: str | Path) -> str:
    """``"voc"``, ``"coco"`` or ``"yolo"`` for the dataset at ``path`` (a folder, a COCO JSON file
    or a YOLO dataset YAML). Raises :class:`DataError` listing what was looked for if none fits."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; pass a folder with a VOC, COCO or YOLO dataset, or bundled:bccd")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise DataError(f"{path}: a dataset file must be a COCO .json or a YOLO .yaml, got {path.name}; or pass the dataset folder")
    if find_dataset_yaml(path) is not None:
        return "yolo"
    if (path / "Annotations").is_dir() and is_voc(path):
        return "voc"
    if find_annotation_files(path):
        return "coco"
    if is_yolo_folder(path):
        return "yolo"
    if is_voc(path):
        return "voc"
    raise DataError(
        f"{path}: cannot tell the dataset format. Looked for: a YOLO data.yaml (or *.yaml with names) or "
        f"images/ + labels/ folders; VOC Annotations/*.xml, or *.xml beside the images (also in train/ "
        f"valid/ test/); COCO */_annotations.coco.json, annotations/*.json or *.json. Point kdet at the "
        f"dataset's top folder, or pass the format explicitly"
    )


def read_dataset(
    path: str | Path,
    format: str = "auto",
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    verify_images: bool = True,
) -> DatasetIndex:
    """Read a detection dataset into a :class:`DatasetIndex`.

    ``path``: a dataset folder, a COCO JSON file, a YOLO YAML, or ``bundled:bccd``.
    ``format``: ``"auto"`` (see :func:`detect_format`), ``"voc"``, ``"coco"`` or ``"yolo"``.
    ``seed`` and ``fractions`` (train, val, test) make the split when the dataset has none
    (``split_source == "seeded"``); a dataset's own splits are used as they are (``"dataset"``).
    ``verify_images`` decodes every image fully (catches truncated files); ``False`` reads only
    the headers.

    Guarantees: every record's image opened; boxes are float32 xyxy pixels inside the image with
    positive width and height; labels index ``class_names``; every defect found is in
    ``index.problems`` (never raised). Raises :class:`DataError` only when the dataset as a whole
    cannot be read (missing path, no annotations, unknown format, no class names).
    """
    # absolute, so records stay valid if the working directory changes (not resolved: links kept)
    path = resolve_data_path(path).absolute()
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; pass a folder with a VOC, COCO or YOLO dataset, or bundled:bccd")
    check_fractions(fractions)
    if format == "auto":
        format = detect_format(path)
    readers = {"voc": read_voc, "coco": read_coco, "yolo": read_yolo}
    if format not in readers:
        raise DataError(f"unknown dataset format {format!r}; use one of auto, {', '.join(FORMATS)}")
    if format == "voc" and path.is_file():
        raise DataError(f"{path}: a VOC dataset is a folder; pass the folder that holds Annotations/")
    return readers[format](path, seed=seed, fractions=fractions, verify_images=verify_images)


def remap_classes(records: list[ImageRecord], source_names: Sequence[str], target_names: Sequence[str]) -> list[ImageRecord]:
    """Records whose labels index ``target_names`` (e.g. a model's classes) instead of
    ``source_names`` (the dataset's), matched by name. Records are copied, not changed.

    Raises :class:`DataError` when the dataset has classes the target list does not know:
    evaluating on them would count boxes the model can never predict.
    """
    if list(source_names) == list(target_names):
        return records
    missing = [name for name in source_names if name not in target_names]
    if missing:
        raise DataError(
            f"the dataset has classes {missing} that the model does not know (model classes: {list(target_names)}); "
            f"evaluate on data with the model's classes, or train a model on this dataset"
        )
    lookup = np.array([list(target_names).index(name) for name in source_names], dtype=np.int64)
    return [
        ImageRecord(r.image_id, r.path, r.width, r.height, r.boxes.copy(), lookup[r.labels], r.difficult.copy())
        for r in records
    ]


def keep_classes(index: DatasetIndex, names: Sequence[str]) -> tuple[DatasetIndex, dict[str, int]]:
    """``index`` with the boxes of the classes ``names`` only, and those as its classes in that
    order: the data for a specialist teacher (several teachers, each trained on some of the
    classes, teach one student all of them). Every image stays, also one left without a box (for
    the specialist it shows none of its objects). Returns the new index and the number of boxes
    removed per class left out. Raises :class:`DataError` for a name the dataset does not have
    or given twice."""
    names = list(names)
    unknown = [name for name in names if name not in index.class_names]
    if unknown:
        raise DataError(f"classes {unknown} are not classes of {index.root} (its classes: {index.class_names}); spell them as "
                        "the dataset does")
    if len(set(names)) != len(names) or not names:
        raise DataError(f"give each class to keep once, at least one (got {names})")
    lookup = np.array([names.index(name) if name in names else -1 for name in index.class_names], dtype=np.int64)
    # all_records holds an image in two splits once, so its boxes count once
    left_out = np.concatenate([r.labels[lookup[r.labels] < 0] for r in index.all_records()] or [np.zeros(0, np.int64)])
    removed = {name: int((left_out == i).sum()) for i, name in enumerate(index.class_names) if name not in names}

    def keep(record: ImageRecord) -> ImageRecord:
        labels = lookup[record.labels]
        mask = labels >= 0
        return ImageRecord(record.image_id, record.path, record.width, record.height, record.boxes[mask].copy(),
                           labels[mask], record.difficult[mask].copy())

    splits = {split: [keep(r) for r in records] for split, records in index.splits.items()}
    withheld = {split: [keep(r) for r in records] for split, records in index.withheld.items()}
    return replace(index, class_names=names, splits=splits, withheld=withheld), removed
