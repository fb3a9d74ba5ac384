"""Pascal VOC XML reader.

Layouts understood:

* the VOC devkit layout: ``Annotations/*.xml``, ``JPEGImages/``, and ``ImageSets/Main/<split>.txt``
  (one image id per line; each such file becomes a split, ``trainval`` included; the per-class
  files ``<class>_<split>.txt`` with two columns are ignored). Without split files every XML in
  ``Annotations/`` is used and kdet makes a seeded split;
* a flat folder with images and XML files side by side (seeded split), or split folders
  (``train/``, ``valid/``, ``test/``) each holding images and XML files side by side, as
  Roboflow exports VOC;
* an annotation folder beside an image folder: ``images/`` + ``annotations/`` (or ``annots/``,
  ``xml/``... any folder of XML files without images), at the root (seeded split) or inside
  split folders (``train/images`` + ``train/annotations``). The annotation folder is never a
  split. Each XML's image is found by the XML's own name, then by its ``<filename>`` (in the
  image folders beside it, or the one its ``<folder>`` names), then by its ``<path>``.

Class order: the names in ``classes.txt`` or ``labels.txt`` at the root when one exists (boxes
of other classes are reported and dropped), else all names found, sorted alphabetically so the
order does not depend on which file was read first.

Coordinates are taken as written (VOC's 1-based pixel convention is not shifted), may be
floats, and are clipped to the real image size.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Sequence
from xml.parsers import expat

import numpy as np

from ..structures import DatasetIndex, Problem
from .common import (
    SPLIT_ORDER,
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

CLASS_FILES = ("classes.txt", "labels.txt")
# folders that hold annotations only, by their usual names; the images are in a sibling folder
ANNOTATION_FOLDERS = {"annotations", "annotation", "annots", "annot", "xml", "xmls", "labels"}
# the usual names of that sibling image folder, preferred over other folders of images
IMAGE_FOLDERS = {"jpegimages", "images", "imgs", "img", "pictures", "photos"}


@dataclass
class _Object:
    name: str
    box: list[float]  # xyxy as written
    difficult: bool
    line: int | None
    index: int  # 1-based position among the file's <object> elements


@dataclass
class _Parsed:
    xml_file: str  # root-relative
    image: Path
    objects: list[_Object]
    declared_size: tuple[int, int] | None


class _MalformedXML(Exception):
    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line = line


# ---------------------------------------------------------------------------------------------
# One XML file
# ---------------------------------------------------------------------------------------------
def _parse_with_lines(data: bytes) -> tuple[ET.Element, dict[ET.Element, int]]:
    """ElementTree parse that also records the line each element starts on, so problems can
    point at the ``<object>`` they are about (the C ElementTree parser does not keep lines)."""
    parser = expat.ParserCreate()
    builder = ET.TreeBuilder()
    lines: dict[ET.Element, int] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise _MalformedXML(err.lineno, f"not well-formed XML: {expat.errors.messages[err.code]}") from None
    return builder.close(), lines


def _text(element: ET.Element, path: str) -> str | None:
    found = element.find(path)
    return found.text.strip() if found is not None and found.text else None


def _declared_size(root: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = int(float(_text(root, "size/width") or 0)), int(float(_text(root, "size/height") or 0))
    except ValueError:
        return None
    # labelling tools write 0 when they did not know the size: nothing to compare then
    return (width, height) if width > 0 and height > 0 else None


def _parse_objects(tree: ET.Element, lines: dict[ET.Element, int], xml_file: str, problems: list[Problem]) -> list[_Object]:
    objects = []
    for index, element in enumerate(tree.findall("object"), start=1):
        line = lines.get(element)
        name = _text(element, "name")
        coords = [_text(element, f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
        try:
            if not name:
                raise ValueError("it has no <name>")
            if any(c is None for c in coords):
                raise ValueError("its <bndbox> lacks one of xmin, ymin, xmax, ymax")
            box = [float(c) for c in coords]  # type: ignore[arg-type]
        except ValueError as err:
            reason = str(err) if str(err).startswith("it") else f"a coordinate is not a number ({err})"
            problems.append(Problem(xml_file, "malformed_annotation", f"object #{index}: cannot read the object, {reason}", "box dropped", line))
            continue
        difficult = (_text(element, "difficult") or "0").lower() in ("1", "true", "yes")
        objects.append(_Object(name, box, difficult, line, index))
    return objects


def _image_index(folders: Sequence[Path]) -> dict[str, list[Path]]:
    """Images in ``folders`` by file stem (a stem may have several extensions or folders)."""
    index: dict[str, list[Path]] = {}
    for folder in folders:
        for path in list_images(folder):
            index.setdefault(path.stem, []).append(path)
    return index


def _find_image(xml_path: Path, tree: ET.Element, images: dict[str, list[Path]], image_dirs: Sequence[Path]) -> Path:
    """The image an XML file describes. The image with the XML's stem wins (``<filename>`` is
    often stale after files were renamed); then ``<filename>`` in the image folders (and in the
    folder ``<folder>`` names, beside the annotation folder); then ``<path>`` as written, or its
    file name in the image folders. When nothing exists, the path the XML names (reported
    as not found when opened)."""
    filename = _text(tree, "filename")
    candidates = images.get(xml_path.stem, [])
    by_filename = [p for p in candidates if p.name == filename]
    if by_filename or candidates:
        return (by_filename or candidates)[0]
    folders = list(image_dirs)
    named_folder = _text(tree, "folder")
    if named_folder and "/" not in named_folder and "\\" not in named_folder:
        folders.append(xml_path.parent.parent / named_folder)
    if filename:
        for folder in folders:
            if (folder / filename).is_file():
                return folder / filename
    written = _text(tree, "path")
    if written:
        as_path = Path(written)
        for candidate in (as_path, xml_path.parent / as_path):
            if candidate.is_file():
                return candidate
        name = PureWindowsPath(written).name  # labelImg writes the labeller's own absolute path
        for folder in folders:
            if name and (folder / name).is_file():
                return folder / name
    return folders[0] / (filename or f"{xml_path.stem}.jpg")


def _parse_xml(xml_path: Path, root: Path, images: dict[str, list[Path]], image_dirs: Sequence[Path], problems: list[Problem]) -> _Parsed | None:
    """Parse one VOC XML file; ``None`` (with a problem) when it cannot be read at all."""
    xml_file = relative_name(xml_path, root)
    try:
        tree, lines = _parse_with_lines(xml_path.read_bytes())
    except _MalformedXML as err:
        problems.append(Problem(xml_file, "malformed_annotation", f"cannot parse the annotation: {err}", "image skipped", err.line))
        return None
    image = _find_image(xml_path, tree, images, image_dirs)
    return _Parsed(xml_file, image, _parse_objects(tree, lines, xml_file, problems), _declared_size(tree))


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def _is_split_file(path: Path) -> bool:
    """``ImageSets/Main/train.txt`` lists one id per line; ``dog_train.txt`` has ``id  1/-1``."""
    rows = [line.split() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return all(len(row) == 1 for row in rows)  # an empty file is an empty split


def _report_unannotated(images: dict[str, list[Path]], used: set[Path], ann_dir: Path, root: Path, problems: list[Problem]) -> None:
    for paths in images.values():
        for path in paths:
            if path not in used:
                expected = relative_name(ann_dir / path.with_suffix(".xml").name, root)
                where = "next to it" if ann_dir == path.parent else f"in {relative_name(ann_dir, root)}/"
                problems.append(Problem(
                    relative_name(path, root), "missing_annotation",
                    f"image has no XML annotation {where} (expected {expected}, or an XML whose <filename> names it)",
                    "image skipped",
                ))


def _is_annotation_folder(folder: Path) -> bool:
    """A folder of XML files that is not a split: named like one (``annotations/``, ``annots/``,
    ``xml/``...), or holding no images and not named like a split."""
    if folder.name.lower() in ANNOTATION_FOLDERS:
        return True
    return split_name(folder.name) not in SPLIT_ORDER and not list_images(folder)


def _image_folders_beside(ann_dir: Path) -> list[Path]:
    """Folders of images beside the annotation folder ``ann_dir``: those with the usual names
    (``images/``, ``JPEGImages/``...) when there are any, else every sibling holding images."""
    siblings = [d for d in sorted(ann_dir.parent.iterdir())
                if d.is_dir() and d != ann_dir and d.name.lower() not in ANNOTATION_FOLDERS and list_images(d)]
    usual = [d for d in siblings if d.name.lower() in IMAGE_FOLDERS]
    return usual or siblings


def _devkit_annotations(root: Path) -> Path | None:
    """``Annotations/`` of the devkit layout; also ``annotations/`` (any case) beside ``ImageSets/Main``."""
    if (root / "Annotations").is_dir():
        return root / "Annotations"
    if (root / "ImageSets" / "Main").is_dir():
        return next((d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() == "annotations"), None)
    return None


def _devkit_layout(root: Path, ann_dir: Path, problems: list[Problem]) -> tuple[list[_Parsed], dict[str, list[str]] | None]:
    """``Annotations/`` (``ann_dir``) + ``JPEGImages/`` (+ ``ImageSets/Main``). Returns the parsed
    files in reading order and, per split file, the image ids it lists (``None`` without split
    files)."""
    image_dirs = [root / "JPEGImages"] if (root / "JPEGImages").is_dir() else (_image_folders_beside(ann_dir) or [root / "JPEGImages"])
    images = _image_index(image_dirs)
    main = root / "ImageSets" / "Main"
    split_files = [f for f in sorted(main.glob("*.txt")) if _is_split_file(f)] if main.is_dir() else []

    parsed: dict[str, _Parsed | None] = {}  # VOC id -> parse result (None: skipped, reported)
    if not split_files:
        for xml_path in sorted(ann_dir.glob("*.xml")):
            parsed[xml_path.stem] = _parse_xml(xml_path, root, images, image_dirs, problems)
        _report_unannotated(images, {p.image for p in parsed.values() if p}, ann_dir, root, problems)
        return [p for p in parsed.values() if p], None

    splits: dict[str, list[_Parsed]] = {}
    for split_file in split_files:
        name = split_name(split_file.stem)
        listed: dict[str, int] = {}
        members = splits.setdefault(name, [])
        rel = relative_name(split_file, root)
        for line_no, line in enumerate(split_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
            voc_id = line.strip()
            if not voc_id:
                continue
            if voc_id in listed:
                problems.append(Problem(
                    rel, "duplicate_image_id", f"image id {voc_id!r} is listed again (first on line {listed[voc_id]})",
                    "second occurrence skipped", line_no,
                ))
                continue
            listed[voc_id] = line_no
            if voc_id not in parsed:
                xml_path = ann_dir / f"{voc_id}.xml"
                if xml_path.is_file():
                    parsed[voc_id] = _parse_xml(xml_path, root, images, image_dirs, problems)
                else:
                    parsed[voc_id] = None
                    problems.append(Problem(
                        rel, "missing_annotation",
                        f"image id {voc_id!r} is listed but {relative_name(xml_path, root)} does not exist",
                        "image skipped", line_no,
                    ))
            if parsed[voc_id] is not None:
                members.append(parsed[voc_id])
    ordered = [p for p in parsed.values() if p]
    return ordered, {name: [image_id_for(p.image, root) for p in members] for name, members in splits.items()}


def _annotation_folders(root: Path) -> list[tuple[str | None, Path, list[Path]]]:
    """Every folder of XML files outside the devkit layout: ``(split or None, folder, image
    folders)``. XML in the root itself; split folders holding images and XML side by side;
    annotation folders beside image folders, in the root or in a split folder."""
    if any(root.glob("*.xml")):
        return [(None, root, [root])]
    found: list[tuple[str | None, Path, list[Path]]] = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        if any(folder.glob("*.xml")):
            if _is_annotation_folder(folder):
                found.append((None, folder, _image_folders_beside(folder)))
            else:
                found.append((split_name(folder.name), folder, [folder]))
        elif split_name(folder.name) in SPLIT_ORDER:
            for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
                if any(sub.glob("*.xml")) and _is_annotation_folder(sub):
                    found.append((split_name(folder.name), sub, _image_folders_beside(sub)))
    return found


def _flat_layout(root: Path, problems: list[Problem]) -> tuple[list[_Parsed], dict[str, list[str]] | None]:
    """Images and XML side by side, or in sibling folders; in the root (seeded split) or in
    split folders."""
    ordered: list[_Parsed] = []
    splits: dict[str, list[str]] = {}
    for name, ann_dir, image_dirs in _annotation_folders(root):
        images = _image_index(image_dirs)
        parsed = [_parse_xml(x, root, images, image_dirs or [ann_dir.parent / "images"], problems) for x in sorted(ann_dir.glob("*.xml"))]
        parsed = [p for p in parsed if p]
        _report_unannotated(images, {p.image for p in parsed}, ann_dir, root, problems)
        ordered += parsed
        if name is not None:
            splits.setdefault(name, []).extend(image_id_for(p.image, root) for p in parsed)
    return ordered, (splits or None)


def is_voc(root: Path) -> bool:
    """True when ``root`` looks like a VOC dataset (devkit layout or XML beside images)."""
    if (root / "Annotations").is_dir() and any((root / "Annotations").glob("*.xml")):
        return True
    if any(root.glob("*.xml")):
        return True
    return bool(_annotation_folders(root))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def read_voc(root: Path, *, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1), verify_images: bool = True) -> DatasetIndex:
    """Read a Pascal VOC dataset at ``root`` into a :class:`DatasetIndex` (``format="voc"``).

    Guarantees: every image in the index was opened successfully, its boxes lie inside it with
    positive size, ``difficult`` is VOC's flag; everything that was not usable as written is in
    ``index.problems``.
    """
    if not is_voc(root):
        raise DataError(
            f"{root}: no VOC XML annotations found (looked in Annotations/, in the folder itself and in "
            f"its split folders); point kdet at the folder that holds Annotations/ and JPEGImages/"
        )
    problems: list[Problem] = []
    ann_dir = _devkit_annotations(root)
    if ann_dir is not None:
        parsed, split_ids = _devkit_layout(root, ann_dir, problems)
    else:
        parsed, split_ids = _flat_layout(root, problems)

    class_file = next((root / f for f in CLASS_FILES if (root / f).is_file()), None)
    if class_file is not None:
        class_names = read_class_file(class_file)
        class_source = relative_name(class_file, root)
    else:
        class_names = sorted({obj.name for p in parsed for obj in p.objects})
        class_source = relative_name(ann_dir, root) if ann_dir is not None else "."
    class_ids = {name: k for k, name in enumerate(class_names)}

    pending: dict[str, PendingImage] = {}
    for item in parsed:
        image_id = image_id_for(item.image, root)
        if image_id in pending:
            problems.append(Problem(
                item.xml_file, "duplicate_image_id",
                f"describes image {image_id!r}, already described by {pending[image_id].annotation_file}",
                "second occurrence skipped",
            ))
            continue
        kept = []
        for obj in item.objects:
            if obj.name in class_ids:
                kept.append(obj)
            else:
                problems.append(Problem(
                    item.xml_file, "unknown_class",
                    f"object #{obj.index}: class {obj.name!r} is not in {class_source} ({', '.join(class_names)})",
                    "box dropped", obj.line,
                ))
        pending[image_id] = PendingImage(
            image_id, item.image, item.xml_file,
            boxes=np.array([obj.box for obj in kept], dtype=np.float64).reshape(-1, 4),
            labels=np.array([class_ids[obj.name] for obj in kept], dtype=np.int64),
            difficult=np.array([obj.difficult for obj in kept], dtype=bool),
            positions=[(obj.line, f"object #{obj.index}") for obj in kept],
            declared_size=item.declared_size,
        )
    records = build_records(list(pending.values()), class_names, root, verify_images=verify_images, problems=problems)
    main = root / "ImageSets" / "Main"
    if ann_dir is not None and main.is_dir():
        split_sources = {split_name(f.stem): relative_name(f, root) for f in sorted(main.glob("*.txt"))}
    else:
        split_sources = {name: relative_name(folder, root) for name, folder, _ in _annotation_folders(root) if name}
    return assemble_index(root, "voc", class_names, records, split_ids, problems,
                          candidates=list(pending), seed=seed, fractions=fractions, class_source=class_source,
                          split_sources=split_sources)
