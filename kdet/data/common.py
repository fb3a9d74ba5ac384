"""What the VOC, COCO and YOLO readers share: opening images, clipping boxes, the seeded split,
and turning what a reader parsed into a :class:`~kdet.structures.DatasetIndex`.

Every reader works in two passes. First it parses its annotation files into
:class:`PendingImage` entries (boxes still as written, class ids already checked). Then
:func:`build_records` opens all images at once (a pool of two threads), checks them, clips the
boxes to the real image size and reports everything it had to change as a
:class:`~kdet.structures.Problem`. Nothing is dropped without a problem saying so.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ..structures import DatasetIndex, ImageRecord, Problem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# PIL's ``img.format`` for each extension; a file whose content disagrees is reported.
FORMAT_OF_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
}

# Normalised YOLO coordinates written with 6 decimals overshoot the image by up to ~1e-3 px;
# clipping that much is rounding noise, not a problem worth reporting.
CLIP_TOLERANCE_PX = 1e-2

SPLIT_ORDER = ("train", "val", "test")
# EXIF orientation (tag 0x0112) -> how the stored pixels are turned to show the image upright,
# as PIL's ImageOps.exif_transpose does it; 5 to 8 swap width and height.
EXIF_ORIENTATIONS = {
    2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
    5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 90 degrees", 8: "rotated 90 degrees counter-clockwise",
}

# Folder or file names that mean a split, as Roboflow, Ultralytics and COCO spell them.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


class DataError(ValueError):
    """The dataset as a whole cannot be read (no annotations, unknown layout, no class names...).

    Per-item defects are never raised: they become :class:`~kdet.structures.Problem` entries.
    """


@dataclass
class PendingImage:
    """One image as a reader parsed it, before the image file is opened.

    ``boxes``: float64 ``[M, 4]`` xyxy, in pixels, or in units of the image size when
    ``normalized`` (YOLO), not yet clipped. ``labels``: int64 ``[M]``, valid indices into the
    class list (the reader has already dropped and reported unknown classes).
    ``positions``: for each box, ``(line, description)`` used in problems, e.g.
    ``(7, "line 7")`` or ``(12, "annotation #12")``.
    """

    image_id: str
    path: Path
    annotation_file: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray | None = None
    positions: list[tuple[int | None, str]] = field(default_factory=list)
    declared_size: tuple[int, int] | None = None  # (width, height) the annotation claims
    normalized: bool = False

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if not self.positions:
            self.positions = [(None, f"box #{i}") for i in range(len(self.labels))]


@dataclass(frozen=True)
class ImageInfo:
    """What opening one image told us: its upright size (after its EXIF orientation) and
    format, or why it cannot be used."""

    width: int = 0
    height: int = 0
    format: str | None = None
    error_kind: str | None = None  # "unreadable_image" | "truncated_image"
    error: str = ""
    orientation: int = 1  # EXIF orientation tag; 1 (or none): stored upright

    @property
    def stored_size(self) -> tuple[int, int]:
        """``(width, height)`` of the pixels as stored in the file, before the EXIF orientation."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------
def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators (``../`` when it lies outside)."""
    # abspath, not resolve(): a symlinked image keeps its own name instead of its target's
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def image_id_for(path: Path, root: Path) -> str:
    """Stable image id: the image's path relative to the dataset root, without extension."""
    return PurePosixPath(relative_name(path, root)).with_suffix("").as_posix()


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted, by extension, case-insensitive)."""
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def split_name(name: str) -> str:
    """Canonical split name: ``valid`` -> ``val`` and so on; other names pass unchanged."""
    return SPLIT_ALIASES.get(name.lower(), name)


def read_class_file(path: Path) -> list[str]:
    """Class names, one per line (blank lines ignored), as in ``classes.txt``."""
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{path}: the class list is empty; write one class name per line")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: class names {dupes} appear more than once; each name must be listed once")
    return names


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an opened image, 1 when it has none or an invalid one."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1  # unreadable EXIF: the pixels are used as stored
    return value if value in EXIF_ORIENTATIONS else 1


# how ImageOps.exif_transpose turns each orientation upright
UPRIGHT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def open_upright(path: str | Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image, turned upright by its EXIF orientation (as
    ``ImageOps.exif_transpose``, annotation tools and Ultralytics do), so its size is the one
    :func:`probe_image` gives the readers. Every place that shows a model an image or draws on
    one (training, eval, predict, export checks, the report) reads it through here."""
    with Image.open(path) as img:
        orientation = exif_orientation(img)
        image = img.convert("RGB")
    return image.transpose(UPRIGHT_TRANSPOSE[orientation]) if orientation != 1 else image


def probe_image(path: Path, verify: bool) -> ImageInfo:
    """Open ``path`` with PIL. ``verify`` decodes every pixel to catch truncated files;
    otherwise only the header (size, format, EXIF orientation) is read. The size is the
    upright one: an EXIF orientation of 5 to 8 swaps the stored width and height, as
    ``ImageOps.exif_transpose`` (and so :func:`kdet.data.pipeline.load_image`) will."""
    if not path.is_file():
        return ImageInfo(error_kind="unreadable_image", error="image file not found")
    try:
        with Image.open(path) as img:
            width, height, fmt = img.width, img.height, img.format
            orientation = exif_orientation(img)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if verify:
                try:
                    img.load()
                except (OSError, SyntaxError, ValueError) as err:
                    return ImageInfo(width, height, fmt, "truncated_image", f"image data is truncated or corrupt ({err})", orientation)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return ImageInfo(error_kind="unreadable_image", error=f"cannot decode the image ({err})")
    return ImageInfo(width, height, fmt, orientation=orientation)


def probe_images(paths: Sequence[Path], verify: bool) -> dict[Path, ImageInfo]:
    """:func:`probe_image` for each distinct path, two threads (decoding releases the GIL)."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=2) as pool:
        infos = list(pool.map(lambda p: probe_image(p, verify), unique))
    return dict(zip(unique, infos))


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------
def _fmt_box(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in box) + ")"


def clean_boxes(
    pending: PendingImage, width: int, height: int, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Problem]]:
    """Scale (if normalised) and clip ``pending``'s boxes to a ``width x height`` image.

    Returns ``boxes`` float32 ``[K, 4]`` xyxy pixels inside the image with positive width and
    height, the matching ``labels`` ``[K]`` and ``difficult`` ``[K]``, and one problem per box
    that was clipped (``box_clipped``), dropped for lying outside (``box_outside``), dropped for
    zero or negative size (``zero_size_box``) or for non-finite numbers (``malformed_annotation``).
    """
    boxes = pending.boxes.copy()  # [M, 4]
    if pending.normalized:
        boxes *= np.array([width, height, width, height], dtype=np.float64)
    finite = np.isfinite(boxes).all(axis=1)  # [M]
    # decide sizes on the float32 values the record will hold, so "positive size" stays true there
    safe = np.where(finite[:, None], boxes, 0.0).astype(np.float32)
    has_size = (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
    clipped = safe.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    moved = np.abs(clipped - safe).max(axis=1, initial=0.0) > CLIP_TOLERANCE_PX
    keep = finite & has_size & inside

    problems: list[Problem] = []
    for i in np.flatnonzero(~keep | moved):
        line, where = pending.positions[i]
        name = class_names[pending.labels[i]]
        box = _fmt_box(pending.boxes[i] if not finite[i] else safe[i])
        if not finite[i]:
            kind, what, action = "malformed_annotation", f"box {box} of class {name} has non-finite coordinates", "box dropped"
        elif not has_size[i]:
            kind, what, action = "zero_size_box", f"box {box} of class {name} has zero or negative width or height", "box dropped"
        elif not inside[i]:
            kind, what, action = "box_outside", f"box {box} of class {name} lies entirely outside the {width}x{height} image", "box dropped"
        else:
            kind, what, action = "box_clipped", f"box {box} of class {name} extends past the {width}x{height} image", f"clipped to {_fmt_box(clipped[i])}"
        problems.append(Problem(pending.annotation_file, kind, f"{where}: {what}", action, line))
    return clipped[keep], pending.labels[keep], pending.difficult[keep], problems


# ---------------------------------------------------------------------------------------------
# Records and the index
# ---------------------------------------------------------------------------------------------
def build_records(
    pending: Sequence[PendingImage],
    class_names: Sequence[str],
    root: Path,
    *,
    verify_images: bool,
    problems: list[Problem],
) -> dict[str, ImageRecord]:
    """Open every pending image and turn it into an :class:`ImageRecord` (keyed by image id).

    Images that cannot be used are left out, each with an ``unreadable_image`` or
    ``truncated_image`` problem; a content format that differs from the extension is reported
    (``extension_mismatch``) and the image kept; an image with an EXIF orientation is turned
    upright, as annotation tools and Ultralytics show it, and reported (``exif_orientation``); an
    annotated size that differs from the real (upright) one is reported (``size_mismatch``) and the
    real size used. Problems are appended to ``problems``.
    """
    infos = probe_images([p.path for p in pending], verify_images)
    reported: set[Path] = set()  # one image problem per file, even if several entries share it
    oriented: set[Path] = set()
    records: dict[str, ImageRecord] = {}
    for item in pending:
        info = infos[item.path]
        image_file = relative_name(item.path, root)
        if info.error_kind:
            if item.path not in reported:
                lost = f"; its {len(item.labels)} box(es) in {item.annotation_file} are not used" if len(item.labels) else ""
                problems.append(Problem(image_file, info.error_kind, f"{info.error}{lost}", "image skipped"))
                reported.add(item.path)
            continue
        expected = FORMAT_OF_SUFFIX.get(item.path.suffix.lower())
        if expected and info.format and info.format != expected and item.path not in reported:
            problems.append(Problem(
                image_file, "extension_mismatch",
                f"the file holds a {info.format} image but its extension {item.path.suffix} says {expected}",
                f"read as {info.format}",
            ))
            reported.add(item.path)
        if info.orientation != 1 and item.path not in oriented:
            stored_w, stored_h = info.stored_size
            problems.append(Problem(
                image_file, "exif_orientation",
                f"the image carries EXIF orientation {info.orientation} ({EXIF_ORIENTATIONS[info.orientation]}): "
                f"stored as {stored_w}x{stored_h}, upright {info.width}x{info.height}",
                f"turned upright as the tag says (as annotation tools and Ultralytics do): its boxes are read on the "
                f"{info.width}x{info.height} upright image, which training, eval, predict and the report also see",
            ))
            oriented.add(item.path)
        if item.declared_size and item.declared_size != (info.width, info.height):
            w, h = item.declared_size
            unturned = info.orientation != 1 and item.declared_size == info.stored_size
            why = (f"; {w}x{h} is its size before the EXIF orientation is applied, so its boxes may have been drawn "
                   f"on the unturned pixels: check them") if unturned else ""
            problems.append(Problem(
                item.annotation_file, "size_mismatch",
                f"the annotation gives the size of {image_file} as {w}x{h} but the image is {info.width}x{info.height}{why}",
                "used the image's real size" + (" (upright)" if info.orientation != 1 else ""),
            ))
        boxes, labels, difficult, box_problems = clean_boxes(item, info.width, info.height, class_names)
        problems.extend(box_problems)
        records[item.image_id] = ImageRecord(item.image_id, item.path, info.width, info.height, boxes, labels, difficult)
    return records


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, val, test)`` split fractions: three non-negative numbers summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6 or values[0] == 0:
        raise DataError(
            f"split fractions must be three non-negative numbers (train, val, test) summing to 1 with "
            f"train > 0, got {tuple(fractions)}; e.g. (0.8, 0.1, 0.1)"
        )
    return values  # type: ignore[return-value]


def seeded_split(image_ids: Sequence[str], seed: int, fractions: Sequence[float]) -> dict[str, list[str]]:
    """Split ``image_ids`` into train/val/test, the same way for the same ids and ``seed``.

    Ids are sorted first, so the split does not depend on file-system order. Every split with a
    positive fraction gets at least one image when there are enough images; a split with
    fraction 0 is left out.
    """
    fractions = check_fractions(fractions)
    ids = sorted(image_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    counts = [int(np.floor(f * n)) for f in fractions]
    # hand out the images lost to flooring by largest remainder, so counts sum to n
    remainders = sorted(range(3), key=lambda k: fractions[k] * n - counts[k], reverse=True)
    for k in remainders[: n - sum(counts)]:
        counts[k] += 1
    # a tiny dataset must still get a val and test image if they were asked for
    for k in (1, 2):
        if fractions[k] > 0 and counts[k] == 0 and counts[0] > 1:
            counts[k], counts[0] = 1, counts[0] - 1
    out: dict[str, list[str]] = {}
    start = 0
    for name, count, fraction in zip(SPLIT_ORDER, counts, fractions):
        if fraction > 0:
            out[name] = sorted(ids[i] for i in order[start : start + count])
        start += count
    return out


def order_splits(splits: dict[str, list]) -> dict[str, list]:
    """train, val, test first, then any other split names alphabetically."""
    known = [name for name in SPLIT_ORDER if name in splits]
    return {name: splits[name] for name in known + sorted(set(splits) - set(known))}


def assemble_index(
    root: Path,
    format: str,
    class_names: list[str],
    records: dict[str, ImageRecord],
    split_ids: dict[str, list[str]] | None,
    problems: list[Problem],
    *,
    candidates: Sequence[str],
    seed: int,
    fractions: Sequence[float],
    class_source: str,
    split_sources: dict[str, str] | None = None,
    lost_splits: dict[str, str] | None = None,
) -> DatasetIndex:
    """The final :class:`DatasetIndex`: the dataset's own splits (``split_ids``) when it has
    them, else a seeded split; plus an ``unused_class`` problem for every class without a box
    (``class_source`` is the file that defines the class list), and a ``split_lost`` problem for
    every split the dataset names that has no usable image: those the reader already lost
    (``lost_splits``: name -> why) and those whose every image was skipped.
    ``split_sources`` names the file or folder that defines each split, for the problems.

    The seeded split is drawn over ``candidates``, the ids of every image the reader found,
    before skipped images are removed: an image that fails to open (say only when
    ``verify_images`` is on) must not move the other images to different splits.
    """
    if split_ids:
        source = "dataset"
    else:
        source = "seeded"
        split_ids = seeded_split(candidates, seed, fractions)
    splits = order_splits({name: [records[i] for i in ids if i in records] for name, ids in split_ids.items()})
    lost = dict(lost_splits or {})
    for name, ids in split_ids.items():
        if not splits[name] and source == "dataset":
            lost[name] = (f"none of its {len(ids)} image(s) could be used (see the image problems)" if ids
                          else "it lists no image")
    for name, why in lost.items():
        splits.pop(name, None)
        problems.append(Problem(
            (split_sources or {}).get(name, "."), "split_lost", f"split {name!r} has no usable image: {why}",
            "split left out",
        ))

    counts = np.zeros(len(class_names), dtype=np.int64)
    for record in records.values():
        counts += np.bincount(record.labels, minlength=len(class_names))
    for k in np.flatnonzero(counts == 0):
        problems.append(Problem(
            class_source, "unused_class",
            f"class {class_names[k]!r} (id {k}) has no boxes in any image",
            "kept in the class list",
        ))
    return DatasetIndex(root, format, class_names, splits, problems, source, order_splits(lost))
