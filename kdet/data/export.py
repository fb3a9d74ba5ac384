"""Write a :class:`DatasetIndex` out as COCO JSON, YOLO txt or Pascal VOC.

What is written is what the index holds after reading: problems already handled (clipped boxes,
dropped zero-size boxes, skipped images) stay handled, so a converted copy reads back clean.
A split made only of images that other splits hold (VOC's ``trainval``) is not copied a second
time: YOLO lists its images in ``<split>.txt``, VOC in ``ImageSets/Main``; COCO, which has no
way to share images between split folders, leaves it out (re-create it from its parts).

Image files keep their names when those are unique over the whole dataset; otherwise the image
id with ``/`` replaced by ``__`` is used. ``copy_images=False`` links the images (symlinks)
instead of copying them: the export is small but depends on the source staying where it is.
"""
from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import yaml

from ..structures import DatasetIndex, ImageRecord

COCO_FOLDER = {"val": "valid"}  # Roboflow's folder name for the val split


def _file_names(records: list[ImageRecord]) -> dict[str, str]:
    """image id -> file name in the export, with unique stems (YOLO and VOC pair files by stem)."""
    stems = [r.path.stem for r in records]
    out: dict[str, str] = {}
    taken: set[str] = set()
    for record, stem in zip(records, stems):
        candidate = stem if stems.count(stem) == 1 else record.image_id.replace("/", "__")
        unique, n = candidate, 2
        while unique in taken:
            unique, n = f"{candidate}_{n}", n + 1
        taken.add(unique)
        out[record.image_id] = unique + record.path.suffix
    return out


def _place_image(src: Path, dst: Path, copy_images: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if not copy_images:
        try:
            os.symlink(src.resolve(), dst)
            return
        except OSError:
            pass  # no symlinks here (e.g. Windows without the right): copy instead
    shutil.copyfile(src, dst)


def _coord(value: float) -> str:
    """Shortest text that reads back as the same float32 (``68``, ``226.5``)."""
    return np.format_float_positional(np.float32(value), trim="-")


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------
def union_splits(index: DatasetIndex) -> set[str]:
    """Splits whose every image is also in another split kept for export (e.g. ``trainval``).
    The largest are considered first, so ``train`` and ``val`` are kept and ``trainval`` is not."""
    kept: dict[str, set[str]] = {}
    unions: set[str] = set()
    for split in sorted(index.splits, key=lambda name: -len(index.splits[name])):
        ids = {r.image_id for r in index.splits[split]}
        others = set().union(*(set(r.image_id for r in index.splits[o]) for o in index.splits if o != split and o not in unions))
        if ids and ids <= others:
            unions.add(split)
        else:
            kept[split] = ids
    return unions


def export_coco(index: DatasetIndex, out_dir: str | Path, *, copy_images: bool = True) -> Path:
    """Roboflow-style COCO: ``out/<split>/_annotations.coco.json`` with the images beside it
    (``valid`` for the val split). Category ids are 1..C in ``class_names`` order, boxes
    ``xywh``; VOC's difficult flag is kept as a non-standard ``"difficult": 1`` field. Returns
    ``out_dir``."""
    out = Path(out_dir)
    names = _file_names(index.all_records())
    categories = [{"id": k + 1, "name": name, "supercategory": name} for k, name in enumerate(index.class_names)]
    skipped = union_splits(index)
    for split, records in index.splits.items():
        if split in skipped:
            continue
        folder = out / COCO_FOLDER.get(split, split)
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_number, record in enumerate(records, start=1):
            file_name = names[record.image_id]
            _place_image(record.path, folder / file_name, copy_images)
            images.append({"id": image_number, "file_name": file_name, "width": record.width, "height": record.height})
            for box, label, difficult in zip(record.boxes, record.labels, record.difficult):
                x1, y1, x2, y2 = (float(_coord(v)) for v in box)
                w, h = float(_coord(x2 - x1)), float(_coord(y2 - y1))
                ann = {"id": len(annotations) + 1, "image_id": image_number, "category_id": int(label) + 1,
                       "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}
                if difficult:
                    ann["difficult"] = 1
                annotations.append(ann)
        payload = {"info": {"description": f"exported by kdet from {index.root}"}, "images": images,
                   "annotations": annotations, "categories": categories}
        (folder / "_annotations.coco.json").write_text(json.dumps(payload), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# YOLO
# ---------------------------------------------------------------------------------------------
def export_yolo(index: DatasetIndex, out_dir: str | Path, *, copy_images: bool = True) -> Path:
    """Ultralytics layout: ``out/images/<split>/``, ``out/labels/<split>/`` and ``out/data.yaml``.

    Labels are ``class cx cy w h`` normalised, 6 decimals (about 1e-3 px at 640 px); images
    without boxes get no label file (YOLO's way of saying "no objects"). YOLO has no difficult
    flag, so it is not written. Splits other than train/val/test get their own key in
    ``data.yaml`` (Ultralytics ignores it, kdet reads it). Returns ``out_dir``."""
    out = Path(out_dir)
    names = _file_names(index.all_records())
    listed = union_splits(index)
    where: dict[str, str] = {}  # image id -> its path relative to out
    for split, records in index.splits.items():
        if split in listed:
            continue
        for record in records:
            where.setdefault(record.image_id, f"images/{split}/{names[record.image_id]}")
        label_dir = out / "labels" / split
        label_dir.mkdir(parents=True, exist_ok=True)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for record in records:
            file_name = names[record.image_id]
            _place_image(record.path, out / "images" / split / file_name, copy_images)
            label_path = label_dir / (Path(file_name).stem + ".txt")
            if len(record.labels) == 0:
                label_path.write_text("", encoding="utf-8")  # empty, not missing: no objects, on purpose
                continue
            boxes = record.boxes.astype(np.float64)  # [M, 4]
            scale = np.array([record.width, record.height, record.width, record.height], dtype=np.float64)
            cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1) / scale
            lines = [f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for label, (cx, cy, w, h) in zip(record.labels, cxcywh)]
            label_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    header = (
        f"# YOLO dataset exported by kdet from {index.root}\n"
        "# No 'path' key: split folders are relative to this file's folder (Ultralytics does the same).\n"
    )
    body = {"names": dict(enumerate(index.class_names)), "nc": len(index.class_names)}
    body.update({split: f"images/{split}" for split in index.splits if split not in listed})
    for split in listed:
        (out / f"{split}.txt").write_text("".join(f"./{where[r.image_id]}\n" for r in index.splits[split]), encoding="utf-8")
        body[split] = f"{split}.txt"
    (out / "data.yaml").write_text(header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------
def _voc_xml(record: ImageRecord, file_name: str, class_names: list[str]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(record.width)
    ET.SubElement(size, "height").text = str(record.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for box, label, difficult in zip(record.boxes, record.labels, record.difficult):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bndbox, key).text = _coord(value)
    tree = ET.ElementTree(root)
    ET.indent(tree, space="\t")
    return tree


def export_voc(index: DatasetIndex, out_dir: str | Path, *, copy_images: bool = True) -> Path:
    """VOC devkit layout: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``, plus
    ``classes.txt`` so the class order survives (the VOC reader otherwise sorts names).
    Coordinates are written as the shortest exact text. Returns ``out_dir``."""
    out = Path(out_dir)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    records = index.all_records()
    names = _file_names(records)
    for record in records:
        file_name = names[record.image_id]
        _place_image(record.path, out / "JPEGImages" / file_name, copy_images)
        tree = _voc_xml(record, file_name, index.class_names)
        tree.write(out / "Annotations" / (Path(file_name).stem + ".xml"), encoding="utf-8")
    for split, split_records in index.splits.items():
        ids = [Path(names[r.image_id]).stem for r in split_records]
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in index.class_names), encoding="utf-8")
    return out
