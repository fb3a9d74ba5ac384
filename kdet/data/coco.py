"""COCO JSON reader.

Layouts understood (the first that matches is used):

* Roboflow: ``train/_annotations.coco.json``, ``valid/_annotations.coco.json``,
  ``test/_annotations.coco.json`` with the images beside each file (folder name -> split,
  ``valid`` -> ``val``);
* COCO: ``annotations/instances_train2017.json`` (+ ``instances_val2017.json``) with images in
  ``train2017/``, ``val2017/`` (split from the file name: ``train``, ``val``);
* JSON files in the folder itself (or one JSON file given directly). A file whose name is a
  split (``train.json``, ``val.json``...) gives that split; a single file with no split in its
  name gets a seeded split.

``file_name`` is looked up relative to the JSON's folder, then an ``images/`` folder beside it,
then the dataset root, then the ``train2017/``-style folder named after the JSON.

Classes are the categories sorted by id; several JSON files must have the same category names
(matched by name, so ids may differ between files). A category that has no annotations and is
only the supercategory of the others (Roboflow's id-0 category, e.g. ``cells``) is dropped from
the class list and reported. Boxes are COCO ``xywh``, converted to ``xyxy``; ``iscrowd=1``
annotations are reported and not used. Problems about an annotation or an ``images`` entry
name it by its index (``annotation #12``) and give the line of the JSON file it starts on (none
when the file is all on one line).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..structures import DatasetIndex, Problem
from .common import (
    SPLIT_ORDER,
    DataError,
    PendingImage,
    assemble_index,
    build_records,
    image_id_for,
    relative_name,
    split_name,
)

ROBOFLOW_FILE = "_annotations.coco.json"


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------
def _split_from_stem(stem: str) -> str:
    """``instances_val2017`` -> ``val``, ``train`` -> ``train``, ``my_set`` -> ``my_set``."""
    core = re.sub(r"^(instances|annotations?)_", "", stem)
    core = re.sub(r"[_-]?\d+$", "", core) or stem
    return split_name(core)


def find_annotation_files(path: Path) -> list[tuple[Path, str | None]]:
    """COCO JSON files for the dataset at ``path`` (a folder or one JSON file), each with the
    split it defines, or ``None`` when the split must be made by kdet. Empty when none found."""
    if path.is_file():
        split = _split_from_stem(path.name.removesuffix(".json").removesuffix(".coco"))
        return [(path, split if split in SPLIT_ORDER else None)]
    roboflow = sorted(d / ROBOFLOW_FILE for d in path.iterdir() if (d / ROBOFLOW_FILE).is_file())
    if roboflow:
        return _train_first([(f, split_name(f.parent.name)) for f in roboflow])
    ann_dir = path / "annotations"
    if ann_dir.is_dir():
        files = sorted(ann_dir.glob("instances_*.json")) or sorted(ann_dir.glob("*.json"))
        if files:
            return _train_first(_name_splits(files))
    files = sorted(path.glob("*.json"))
    return _train_first(_name_splits(files)) if files else []


def _train_first(files: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    """train, val, test, then the rest: the first file sets the class order and is the one
    problems about the class list point at."""
    rank = {name: k for k, name in enumerate(SPLIT_ORDER)}
    return sorted(files, key=lambda item: (rank.get(item[1] or "", len(rank)), str(item[0])))


def _name_splits(files: list[Path]) -> list[tuple[Path, str | None]]:
    stems = [f.name.removesuffix(".json").removesuffix(".coco") for f in files]
    if len(files) == 1:
        split = _split_from_stem(stems[0])
        return [(files[0], split if split in SPLIT_ORDER else None)]
    return [(f, _split_from_stem(stem)) for f, stem in zip(files, stems)]


def _dataset_root(path: Path) -> Path:
    if path.is_dir():
        return path
    # annotations/instances_val2017.json given directly: the dataset is the folder above
    return path.parent.parent if path.parent.name == "annotations" else path.parent


def _image_folders(json_path: Path, root: Path) -> list[Path]:
    """Where ``file_name`` may be relative to, most likely first."""
    folders = [json_path.parent, json_path.parent / "images", root]
    core = re.sub(r"^(instances|annotations?)_", "", json_path.stem)
    if core != json_path.stem:
        folders.append(root / core)  # annotations/instances_train2017.json -> train2017/
    return folders


# ---------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _array_lines(text: str, key: str) -> list[int | None]:
    """The 1-based line on which each element of the top-level array ``key`` starts in the JSON
    ``text`` (already known to parse); all ``None`` when the file is on one line, so a line
    would say nothing. Empty when there is no such array."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end()
    if text[pos : pos + 1] != "{":
        return []
    pos = _WHITESPACE.match(text, pos + 1).end()
    while text[pos : pos + 1] == '"':
        name, pos = decoder.raw_decode(text, pos)
        pos = _WHITESPACE.match(text, _WHITESPACE.match(text, pos).end() + 1).end()  # past the ':'
        if name == key and text[pos : pos + 1] == "[":
            starts = []
            pos = _WHITESPACE.match(text, pos + 1).end()
            while text[pos : pos + 1] not in ("]", ""):
                starts.append(pos)
                _, pos = decoder.raw_decode(text, pos)
                pos = _WHITESPACE.match(text, pos).end()
                if text[pos : pos + 1] == ",":
                    pos = _WHITESPACE.match(text, pos + 1).end()
            if "\n" not in text.strip():
                return [None] * len(starts)
            lines, line, previous = [], 1, 0
            for start in starts:
                line += text.count("\n", previous, start)
                lines.append(line)
                previous = start
            return lines
        _, pos = decoder.raw_decode(text, pos)  # a value of another key: skipped
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos : pos + 1] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
    return []


def _load(json_path: Path, root: Path, problems: list[Problem]) -> tuple[dict, str] | None:
    """The parsed COCO file and its text; ``None`` (with a problem) when it cannot be used."""
    rel = relative_name(json_path, root)
    try:
        text = json_path.read_text(encoding="utf-8-sig")
        data = json.loads(text)
    except json.JSONDecodeError as err:
        problems.append(Problem(rel, "malformed_annotation", f"not valid JSON: {err.msg} (column {err.colno})", "file skipped", err.lineno))
        return None
    except UnicodeDecodeError as err:
        problems.append(Problem(rel, "malformed_annotation", f"not UTF-8 text ({err})", "file skipped"))
        return None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        problems.append(Problem(rel, "malformed_annotation", "not a COCO detection file: needs 'images' and 'categories' lists", "file skipped"))
        return None
    if not isinstance(data.get("annotations", []), list):
        problems.append(Problem(rel, "malformed_annotation", "'annotations' is not a list", "file skipped"))
        return None
    return data, text


def _categories(data: dict, rel: str, problems: list[Problem]) -> list[dict[str, Any]]:
    """Valid category entries sorted by id; duplicate names or ids are a dataset error."""
    out = []
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            problems.append(Problem(rel, "malformed_annotation", f"categories entry #{k} needs an integer 'id' and a string 'name', got {cat!r}", "category skipped"))
            continue
        out.append(cat)
    for key in ("id", "name"):
        values = [c[key] for c in out]
        dupes = sorted({v for v in values if values.count(v) > 1}, key=str)
        if dupes:
            raise DataError(f"{rel}: category {key}s {dupes} appear more than once in 'categories'; each category needs a unique id and name")
    return sorted(out, key=lambda c: c["id"])


def _number_list(value: Any, length: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value]


def _read_file(
    data: dict, text: str, rel: str, folders: list[Path], root: Path, cat_to_class: dict[Any, int | None], problems: list[Problem]
) -> list[PendingImage]:
    """Images of one COCO file with their boxes (xyxy), in the order of its ``images`` list.
    ``text`` is the file's text, for the lines problems point at."""
    annotations = data.get("annotations", [])
    found_lines: dict[str, list[int | None]] = {}

    def line_of(key: str, k: int) -> int | None:
        if key not in found_lines:
            found_lines[key] = _array_lines(text, key)
        lines = found_lines[key]
        return lines[k] if k < len(lines) else None

    def report(kind: str, message: str, action: str, line: int | None = None) -> None:
        problems.append(Problem(rel, kind, message, action, line))

    images: dict[Any, PendingImage | None] = {}  # COCO image id -> entry (None: a skipped duplicate)
    entry_of_id: dict[Any, int] = {}
    entry_of_image: dict[str, int] = {}
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            report("malformed_annotation", f"images entry #{k} needs 'id' and 'file_name', got {entry!r}", "image skipped",
                   line_of("images", k))
            continue
        if entry["id"] in entry_of_id:
            report("duplicate_image_id", f"images entry #{k} repeats image id {entry['id']!r} "
                   f"(first used by images entry #{entry_of_id[entry['id']]})", "second occurrence skipped", line_of("images", k))
            continue
        entry_of_id[entry["id"]] = k
        candidates = [folder / entry["file_name"] for folder in folders]
        image_path = next((c for c in candidates if c.is_file()), candidates[0])  # missing: reported when opened
        image_id = image_id_for(image_path, root)
        if image_id in entry_of_image:
            images[entry["id"]] = None
            count = sum(1 for a in annotations if isinstance(a, dict) and a.get("image_id") == entry["id"])
            report("duplicate_image_id", f"images entry #{k} ({entry['file_name']}) is the same image as images entry "
                   f"#{entry_of_image[image_id]}; its {count} annotation(s) are not used", "second occurrence skipped",
                   line_of("images", k))
            continue
        entry_of_image[image_id] = k
        size = (entry.get("width"), entry.get("height"))
        declared = size if all(isinstance(v, int) and v > 0 for v in size) else None
        images[entry["id"]] = PendingImage(image_id, image_path, rel, declared_size=declared)  # type: ignore[arg-type]

    rows: dict[Any, list] = {coco_id: [] for coco_id, item in images.items() if item is not None}
    for k, ann in enumerate(annotations):
        where = f"annotation #{k}"
        if not isinstance(ann, dict) or "image_id" not in ann:
            report("malformed_annotation", f"{where}: needs 'image_id', 'category_id' and 'bbox', got {ann!r}", "box dropped", line_of("annotations", k))
            continue
        if ann["image_id"] not in images:
            report("malformed_annotation", f"{where}: refers to image id {ann['image_id']!r}, which is not in 'images'", "box dropped", line_of("annotations", k))
            continue
        if images[ann["image_id"]] is None:
            continue  # its image was a duplicate; counted in that problem
        if ann.get("iscrowd", 0):
            report("crowd_annotation", f"{where}: iscrowd=1 region (a group of objects, not one box)", "ignored", line_of("annotations", k))
            continue
        box = _number_list(ann.get("bbox"), 4)
        if box is None:
            report("malformed_annotation", f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {ann.get('bbox')!r}", "box dropped", line_of("annotations", k))
            continue
        if cat_to_class.get(ann.get("category_id")) is None:
            report("unknown_class", f"{where}: category id {ann.get('category_id')!r} is not in 'categories'", "box dropped", line_of("annotations", k))
            continue
        x, y, w, h = box
        rows[ann["image_id"]].append(([x, y, x + w, y + h], cat_to_class[ann["category_id"]], bool(ann.get("difficult", 0)), k))

    out = []
    for coco_id, item in images.items():
        if item is None:
            continue
        found = rows[coco_id]
        item.boxes = np.array([r[0] for r in found], dtype=np.float64).reshape(-1, 4)  # [M, 4] xyxy
        item.labels = np.array([r[1] for r in found], dtype=np.int64)
        item.difficult = np.array([r[2] for r in found], dtype=bool)
        item.positions = [(line_of("annotations", r[3]), f"annotation #{r[3]}") for r in found]
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def read_coco(path: Path, *, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1), verify_images: bool = True) -> DatasetIndex:
    """Read a COCO-JSON dataset (a folder or one JSON file) into a :class:`DatasetIndex`
    (``format="coco"``). Same guarantees as the other readers: only images that opened, boxes
    clipped inside them with positive size, every change in ``index.problems``."""
    root = _dataset_root(path)
    files = find_annotation_files(path)
    if not files:
        raise DataError(
            f"{path}: no COCO JSON found (looked for */{ROBOFLOW_FILE}, annotations/*.json and *.json); "
            f"point kdet at the folder holding them or at the JSON file itself"
        )
    problems: list[Problem] = []
    loaded: list[tuple[Path, str | None, dict, str]] = []
    unreadable: list[tuple[str | None, Problem]] = []  # split of each file that cannot be read, and why
    for f, split in files:
        parsed = _load(f, root, problems)
        if parsed is None:
            unreadable.append((split, problems[-1]))
        else:
            loaded.append((f, split, *parsed))
    if not loaded:
        raise DataError(f"{path}: none of the COCO JSON files could be read; see the problems: " +
                        "; ".join(f"{p.file}{f', line {p.line}' if p.line else ''}: {p.message}" for p in problems))
    # a split whose only file cannot be read is lost, and says why (kdet train names the cause)
    read_splits = {split for _, split, _, _ in loaded}
    lost_splits = {split: f"{problem.file}{f', line {problem.line}' if problem.line else ''} cannot be read: {problem.message}"
                   for split, problem in unreadable if split is not None and split not in read_splits}

    # --- one class list for all files, matched by name -----------------------------------------
    categories = {f: _categories(data, relative_name(f, root), problems) for f, _, data, _ in loaded}
    first = loaded[0][0]
    first_names = [c["name"] for c in categories[first]]
    for f, cats in categories.items():
        if {c["name"] for c in cats} != set(first_names):
            raise DataError(
                f"{relative_name(first, root)} has categories {first_names} but {relative_name(f, root)} has "
                f"{[c['name'] for c in cats]}; every split file must name the same categories (fix or re-export them)"
            )
    used_names: set[str] = set()
    for f, _, data, _ in loaded:
        by_id = {c["id"]: c["name"] for c in categories[f]}
        used_names.update(by_id[a["category_id"]] for a in data.get("annotations", [])
                          if isinstance(a, dict) and a.get("category_id") in by_id)
    class_source = relative_name(first, root)
    class_names = []
    for cat in categories[first]:
        children = sorted(c["name"] for c in categories[first] if c is not cat and c.get("supercategory") == cat["name"])
        if children and cat["name"] not in used_names:
            # Roboflow writes the project name as category 0, parent of all real classes
            problems.append(Problem(
                class_source, "unused_class",
                f"category {cat['name']!r} (id {cat['id']}) has no annotations and is only the supercategory of {', '.join(children)}",
                "dropped from the class list",
            ))
        else:
            class_names.append(cat["name"])
    class_ids = {name: k for k, name in enumerate(class_names)}

    # --- images and their annotations ----------------------------------------------------------
    pending: dict[str, PendingImage] = {}
    split_ids: dict[str, list[str]] = {}
    for f, split, data, text in loaded:
        rel = relative_name(f, root)
        cat_to_class = {c["id"]: class_ids.get(c["name"]) for c in categories[f]}
        items = _read_file(data, text, rel, _image_folders(f, root), root, cat_to_class, problems)
        for item in items:
            if item.image_id in pending:
                problems.append(Problem(
                    rel, "duplicate_image_id",
                    f"{item.path.name} is also annotated in {pending[item.image_id].annotation_file}; the annotations there are used",
                    "second occurrence skipped",
                ))
            else:
                pending[item.image_id] = item
        if split is not None:
            split_ids.setdefault(split, []).extend(item.image_id for item in items)

    records = build_records(list(pending.values()), class_names, root, verify_images=verify_images, problems=problems)
    split_sources = {split: relative_name(f, root) for f, split in reversed(files) if split is not None}
    return assemble_index(root, "coco", class_names, records, split_ids or None, problems,
                          candidates=list(pending), seed=seed, fractions=fractions, class_source=class_source,
                          split_sources=split_sources, lost_splits=lost_splits)
