"""YOLO txt reader (Ultralytics layout).

Layouts understood:

* a dataset YAML (``data.yaml``, or any ``*.yaml`` at the root with ``names``): ``names`` as a list
  or ``{id: name}``, ``path`` (dataset root; relative to the YAML's folder; when it does not
  exist the YAML's folder is used), and ``train`` / ``val`` / ``test`` pointing to image folders
  or to ``.txt`` lists of image paths (relative to ``path``, or to the YAML's folder; Roboflow's
  ``../train/images`` is also tried without the leading ``../``);
* a folder with ``images/`` and ``labels/`` (optionally ``images/train``, ``images/val``...)
  and a ``classes.txt`` (at the root or in ``labels/``).

Other YAML keys whose value is an existing folder inside the dataset root are read as extra
splits (Ultralytics ignores them; kdet's YOLO export writes VOC's ``trainval`` that way).

The label of ``.../images/x/a.jpg`` is ``.../labels/x/a.txt`` (the last ``images`` folder in the
path replaced by ``labels``), or ``a.txt`` beside the image when the path has no ``images`` folder.
Each line is ``class cx cy w h`` normalised to ``[0, 1]``; segmentation lines
(``class x1 y1 x2 y2 ...``) become their bounding box. An empty label file means an image with
no objects; a missing one is read the same way (as Ultralytics does) but reported, since it
more often means a label file was lost than an image left empty on purpose.

A ``train``, ``val`` or ``test`` folder with images beside the listed ones (``test/images``,
``images/test``...) that the YAML does not name is reported with the line that would add it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ..structures import DatasetIndex, Problem
from .common import (
    DataError,
    PendingImage,
    assemble_index,
    build_records,
    image_id_for,
    list_images,
    read_class_file,
    relative_name,
    split_name,
)

YAML_SPLIT_KEYS = ("train", "val", "test")
NON_SPLIT_KEYS = ("path", "names", "nc", "download", "roboflow", "kpt_shape", "flip_idx", "channels", "yaml_file")


# ---------------------------------------------------------------------------------------------
# Finding the layout
# ---------------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse the YAML ({err}); fix the syntax of the dataset file") from None


def find_dataset_yaml(root: Path) -> Path | None:
    """The dataset YAML in ``root``: ``data.yaml`` when present, else the first ``*.yaml`` that
    has ``names``. ``None`` when there is none."""
    for name in ("data.yaml", "data.yml"):
        if (root / name).is_file():
            return root / name
    for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "names" in data:
            return path
    return None


def _class_file(root: Path) -> Path | None:
    for candidate in (root / "classes.txt", root / "labels" / "classes.txt"):
        if candidate.is_file():
            return candidate
    return None


def is_yolo_folder(root: Path) -> bool:
    """``images/`` and ``labels/`` side by side."""
    return (root / "images").is_dir() and (root / "labels").is_dir()


def label_path_for(image: Path) -> Path:
    """Ultralytics' rule: replace the last ``images`` folder with ``labels``, extension ``.txt``."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


# ---------------------------------------------------------------------------------------------
# The YAML
# ---------------------------------------------------------------------------------------------
def _names(data: dict, yaml_path: Path) -> list[str]:
    names = data.get("names")
    if names is None:
        raise DataError(f"{yaml_path}: no 'names'; add the class names, e.g. names: [cat, dog] or names: {{0: cat, 1: dog}}")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{yaml_path}: 'names' keys must be class ids 0..N-1, got {list(names)}") from None
        if ids != list(range(len(ids))):
            raise DataError(f"{yaml_path}: 'names' must cover class ids 0..{len(ids) - 1} without gaps, got ids {ids}")
        by_id = {int(k): v for k, v in names.items()}
        names = [by_id[k] for k in ids]
    if not isinstance(names, list) or not names:
        raise DataError(f"{yaml_path}: 'names' must be a non-empty list or {{id: name}} mapping, got {names!r}")
    names = [str(n) for n in names]
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{yaml_path}: nc is {data['nc']} but 'names' has {len(names)} entries; make them agree")
    if len(set(names)) != len(names):
        raise DataError(f"{yaml_path}: class names {sorted({n for n in names if names.count(n) > 1})} appear more than once")
    return names


def _resolve(entry: str, base: Path, yaml_dir: Path) -> Path | None:
    candidates = [base / entry, yaml_dir / entry]
    if entry.startswith("../"):  # Roboflow writes ../train/images next to the YAML
        candidates += [base / entry[3:], yaml_dir / entry[3:]]
    return next((c for c in candidates if c.exists()), None)


def _extra_split_target(key: Any, entry: Any, base: Path) -> Path | None:
    """A key other than train/val/test is an extra split (e.g. ``trainval`` written by
    :func:`kdet.data.export.export_yolo`) only when its value is one path to an existing folder
    or ``.txt`` image list under the dataset root; every other key (``download``, ``roboflow``...)
    is left alone."""
    if key in YAML_SPLIT_KEYS or key in NON_SPLIT_KEYS or not isinstance(key, str) or not isinstance(entry, str):
        return None
    if "\n" in entry or len(entry) > 200 or "://" in entry:
        return None
    target = base / entry
    try:
        inside = target.resolve().is_relative_to(base.resolve())
        listed = target.is_file() and target.suffix.lower() == ".txt"
        return target if inside and (target.is_dir() or listed) else None
    except OSError:
        return None


def _images_of(target: Path, base: Path) -> list[tuple[Path, tuple[str, int] | None]]:
    """Images of one split entry: a folder (recursively) or a .txt list. Each image comes with
    where it was listed (for duplicate reports)."""
    if target.is_dir():
        return [(p, None) for p in list_images(target, recursive=True)]
    if target.suffix.lower() == ".txt":
        rel = relative_name(target, base)
        out = []
        for line_no, line in enumerate(target.read_text(encoding="utf-8-sig").splitlines(), start=1):
            entry = line.strip()
            if not entry:
                continue
            if entry.startswith("./"):
                path = target.parent / entry[2:]
            else:
                path = Path(entry)
                if not path.is_absolute():
                    path = base / entry if (base / entry).exists() or not (target.parent / entry).exists() else target.parent / entry
            out.append((path, (rel, line_no)))
        return out
    return [(target, None)]  # a single image


def _yaml_splits(yaml_path: Path) -> tuple[Path, list[str], dict[str, list[tuple[Path, tuple[str, int] | None]]], str]:
    data = _load_yaml(yaml_path)
    if not isinstance(data, dict):
        raise DataError(f"{yaml_path}: expected a mapping with names and train/val/test, got {type(data).__name__}")
    names = _names(data, yaml_path)
    yaml_dir = yaml_path.parent
    base = yaml_dir
    if data.get("path"):
        candidate = Path(str(data["path"])).expanduser()
        candidate = candidate if candidate.is_absolute() else yaml_dir / candidate
        # Ultralytics resolves a relative path against its own datasets folder, which kdet
        # does not know; the YAML's folder is the useful fallback
        base = candidate if candidate.is_dir() else yaml_dir
    splits: dict[str, list] = {}
    for key in YAML_SPLIT_KEYS:
        entries = data.get(key)
        if not entries:
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            target = _resolve(str(entry), base, yaml_dir)
            if target is None:
                raise DataError(
                    f"{yaml_path}: {key}: {entry} does not exist (looked relative to {base} and {yaml_dir}); "
                    f"fix the path or remove the key"
                )
            splits.setdefault(key, []).extend(_images_of(target, base))
    for key, entry in data.items():
        target = _extra_split_target(key, entry, base)
        if target is not None:
            splits.setdefault(str(key), []).extend(_images_of(target, base))
    if not splits:
        raise DataError(f"{yaml_path}: no train, val or test entry; add e.g. train: images/train and val: images/val")
    return base, names, splits, relative_name(yaml_path, base)


def _folder_splits(root: Path) -> tuple[list[str], dict[str, list] | None, list, str]:
    class_file = _class_file(root)
    if class_file is None:
        raise DataError(
            f"{root}: YOLO folder without class names; add classes.txt (one name per line, in class-id "
            f"order) or a data.yaml with names"
        )
    names = read_class_file(class_file)
    images_dir = root / "images"
    subdirs = {split_name(d.name): d for d in sorted(images_dir.iterdir()) if d.is_dir()}
    if subdirs and any(name in ("train", "val", "test") for name in subdirs):
        splits = {name: [(p, None) for p in list_images(d, recursive=True)] for name, d in subdirs.items()}
        return names, splits, [], relative_name(class_file, root)
    return names, None, [(p, None) for p in list_images(images_dir, recursive=True)], relative_name(class_file, root)


def _unlisted_split_folders(base: Path, yaml_path: Path, splits: dict[str, list], listed: set[Path]) -> list[Problem]:
    """A problem for each ``train``/``val``/``test`` folder of images beside the listed ones
    (``test/``, ``test/images``, ``images/test``, ``valid/``...) when the YAML has no entry for
    that split and none of its images is listed under another key: it is not read."""
    problems = []
    folders = {d.name.lower(): d for root in (base, base / "images") if root.is_dir() for d in root.iterdir() if d.is_dir()}
    for key in YAML_SPLIT_KEYS:
        if key in splits:
            continue
        for name, folder in sorted(folders.items()):
            if split_name(name) != key:
                continue
            images = list_images(folder, recursive=True)
            if not images or any(image in listed for image in images):
                continue
            entry = folder / "images" if (folder / "images").is_dir() else folder
            problems.append(Problem(
                relative_name(yaml_path, base), "unlisted_split_folder",
                f"{relative_name(folder, base)}/ holds {len(images)} image(s) but {yaml_path.name} has no '{key}' entry",
                f"not read; to use it as the {key} split add the line `{key}: {relative_name(entry, base)}` to {yaml_path.name}",
            ))
            break
    return problems


# ---------------------------------------------------------------------------------------------
# Label files
# ---------------------------------------------------------------------------------------------
def _parse_labels(label: Path, root: Path, num_classes: int, problems: list[Problem]) -> tuple[list, list, list]:
    """Boxes (normalised xyxy), class ids and ``(line, description)`` positions from one label
    file; every line that cannot be used is reported with its 1-based line number."""
    rel = relative_name(label, root)

    def report(kind: str, message: str, action: str, line: int | None = None) -> None:
        problems.append(Problem(rel, kind, message, action, line))

    boxes: list[list[float]] = []
    labels: list[int] = []
    positions: list[tuple[int | None, str]] = []
    try:
        lines = label.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        report("malformed_annotation", f"cannot read the label file ({err})", "image kept with no objects")
        return boxes, labels, positions
    if not any(line.strip() for line in lines):
        return boxes, labels, positions  # an image with no objects, said explicitly
    for line_no, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue  # blank lines are harmless
        where = f"line {line_no}"
        is_box = len(fields) == 5
        is_polygon = len(fields) >= 7 and len(fields) % 2 == 1
        if not (is_box or is_polygon):
            report("malformed_annotation", f"{where}: expected 5 fields (class cx cy w h) or a polygon (class x1 y1 x2 y2 "
                   f"x3 y3 ...), got {len(fields)}: {line.strip()!r}", "line skipped", line_no)
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            report("malformed_annotation", f"{where}: not all fields are numbers: {line.strip()!r}", "line skipped", line_no)
            continue
        if not values[0].is_integer():
            report("malformed_annotation", f"{where}: class id {fields[0]!r} is not an integer", "line skipped", line_no)
            continue
        class_id = int(values[0])
        if not 0 <= class_id < num_classes:
            report("unknown_class", f"{where}: class id {class_id} is not in the class list (ids 0..{num_classes - 1})",
                   "box dropped", line_no)
            continue
        if is_box:
            cx, cy, w, h = values[1:]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = values[1::2], values[2::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
            report("polygon_converted", f"{where}: a segmentation polygon of {len(xs)} points",
                   "converted to its bounding box", line_no)
        boxes.append(box)
        labels.append(class_id)
        positions.append((line_no, where))
    return boxes, labels, positions


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def read_yolo(path: Path, *, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1), verify_images: bool = True) -> DatasetIndex:
    """Read a YOLO txt dataset (a folder, or its dataset YAML) into a :class:`DatasetIndex`
    (``format="yolo"``). Boxes are converted from normalised ``cx cy w h`` to ``xyxy`` pixels
    of the real image size; same guarantees as the other readers."""
    problems: list[Problem] = []
    yaml_path = path if path.is_file() else find_dataset_yaml(path)
    if yaml_path is not None:
        root, class_names, splits, class_source = _yaml_splits(yaml_path)
        flat: list = []
    elif is_yolo_folder(path):
        root = path
        class_names, splits, flat, class_source = _folder_splits(path)
    else:
        raise DataError(
            f"{path}: no YOLO dataset found (looked for data.yaml or a *.yaml with names, and for "
            f"images/ + labels/ folders with classes.txt)"
        )

    groups = splits if splits is not None else {None: flat}
    pending: dict[str, PendingImage] = {}
    split_ids: dict[str, list[str]] = {}
    for split, images in groups.items():
        listed: dict[str, str] = {}
        members = []
        for image, origin in images:
            image_id = image_id_for(image, root)
            if image_id in listed:
                file, line = origin if origin else (relative_name(image, root), None)
                problems.append(Problem(
                    file, "duplicate_image_id",
                    f"image {relative_name(image, root)} has the same id {image_id!r} as {listed[image_id]} in split {split or 'all'}",
                    "second occurrence skipped", line,
                ))
                continue
            listed[image_id] = relative_name(image, root)
            members.append(image_id)
            if image_id in pending:
                continue  # the same image in two splits: one record, shared
            label = label_path_for(image)
            if label.is_file():
                boxes, labels, positions = _parse_labels(label, root, len(class_names), problems)
            else:
                boxes, labels, positions = [], [], []
                if image.is_file():  # a missing image is reported when it is opened
                    problems.append(Problem(
                        relative_name(image, root), "missing_label_file",
                        f"no label file {relative_name(label, root)} for this image",
                        "kept as an image with no objects; if it has objects, restore its label file, "
                        "and write an empty one for an image that has none",
                    ))
            pending[image_id] = PendingImage(
                image_id, image, relative_name(label, root),
                boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
                labels=np.array(labels, dtype=np.int64),
                positions=positions,
                normalized=True,
            )
        if split is not None:
            split_ids[split] = members
    if not pending and not problems:
        raise DataError(f"{path}: the YOLO dataset lists no images; check the image folders in {yaml_path or path / 'images'}")
    if yaml_path is not None:
        problems += _unlisted_split_folders(root, yaml_path, splits, {p.path for p in pending.values()})

    records = build_records(list(pending.values()), class_names, root, verify_images=verify_images, problems=problems)
    split_sources = {name: class_source if yaml_path is not None else "images" for name in split_ids}
    return assemble_index(root, "yolo", class_names, records, split_ids or None, problems,
                          candidates=list(pending), seed=seed, fractions=fractions, class_source=class_source,
                          split_sources=split_sources)
