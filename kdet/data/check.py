"""What ``kdet data check`` shows: a JSON-able summary of a :class:`DatasetIndex` and its
rendering as rich tables. The summary holds every problem; the tables show the first
:data:`SHOWN_PER_KIND` of each kind."""
from __future__ import annotations

from collections import Counter

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..structures import DatasetIndex

SHOWN_PER_KIND = 20
# a class with at most this many boxes over the whole dataset cannot be both learned and scored
RARE_CLASS_BOXES = 2


def _stats(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    return {"min": round(float(values.min()), 2), "median": round(float(np.median(values)), 2), "max": round(float(values.max()), 2)}


def summarize(index: DatasetIndex) -> dict:
    """Counts and problems of ``index`` as plain JSON types.

    Keys: ``path``, ``format``, ``class_names``, ``images`` (unique images over all splits),
    ``images_without_boxes``, ``boxes``, ``difficult_boxes``, ``classes`` (name -> box count,
    every class, zero included), ``splits`` (name -> ``{"images", "boxes"}``), ``split_source``,
    ``image_sizes`` (``[{"width", "height", "count"}]``, most common first), ``box_sizes``
    (``{"width": {"min", "median", "max"}, "height": {...}}`` in pixels, ``None`` without boxes),
    ``problems`` (every :meth:`Problem.to_dict`), ``problem_counts`` (kind -> count),
    ``lost_splits`` (name -> why, for splits the dataset names that have no usable image),
    ``warnings`` (:func:`class_warnings`) and ``errors``: why the dataset cannot be trained on as
    it is (no usable image, a lost split); ``kdet data check`` exits 1 when there is one.
    """
    records = index.all_records()
    num_classes = len(index.class_names)
    per_class = np.zeros(num_classes, dtype=np.int64)
    for record in records:
        per_class += np.bincount(record.labels, minlength=num_classes)
    boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), np.float32)  # [B, 4]
    sizes = Counter((r.width, r.height) for r in records)
    return {
        "path": str(index.root),
        "format": index.format,
        "class_names": list(index.class_names),
        "images": len(records),
        "images_without_boxes": sum(1 for r in records if len(r.labels) == 0),
        "boxes": int(per_class.sum()),
        "difficult_boxes": int(sum(r.difficult.sum() for r in records)),
        "classes": {name: int(count) for name, count in zip(index.class_names, per_class)},
        "splits": {
            name: {"images": len(split), "boxes": int(sum(len(r.labels) for r in split))}
            for name, split in index.splits.items()
        },
        "split_source": index.split_source,
        "image_sizes": [{"width": w, "height": h, "count": n} for (w, h), n in sizes.most_common()],
        "box_sizes": None if len(boxes) == 0 else {
            "width": _stats(boxes[:, 2] - boxes[:, 0]),
            "height": _stats(boxes[:, 3] - boxes[:, 1]),
        },
        "problems": [p.to_dict() for p in index.problems],
        "problem_counts": dict(Counter(p.kind for p in index.problems).most_common()),
        "lost_splits": dict(index.lost_splits),
        "warnings": class_warnings(index),
        "errors": dataset_errors(index),
    }


def dataset_errors(index: DatasetIndex) -> list[str]:
    """Why ``index`` cannot be used as it is: no usable image at all, or a split it names lost."""
    errors = []
    if not index.all_records():
        errors.append(f"no usable image in {index.root}: every image was skipped or none was found (see the problems)")
    for name, why in index.lost_splits.items():
        errors.append(f"split {name!r} is lost: {why}")
    return errors


def class_warnings(index: DatasetIndex) -> list[dict]:
    """One ``{"kind": "rare_class", "class", "boxes", "splits", "message"}`` per class that has
    boxes but too few to be learned and scored: at most :data:`RARE_CLASS_BOXES` in all, or none
    in the train split, or none in the test split (its test AP is then undefined, and left out of
    the means). ``splits`` counts its boxes per split."""
    warnings = []
    num_classes = len(index.class_names)
    per_split = {
        name: sum((np.bincount(r.labels, minlength=num_classes) for r in records), np.zeros(num_classes, np.int64))
        for name, records in index.splits.items()
    }
    total = np.zeros(num_classes, dtype=np.int64)
    for record in index.all_records():
        total += np.bincount(record.labels, minlength=num_classes)
    for k, name in enumerate(index.class_names):
        if total[k] == 0:
            continue  # an unused_class problem says so already
        counts = {split: int(c[k]) for split, c in per_split.items() if c[k] > 0}
        why = []
        if total[k] <= RARE_CLASS_BOXES:
            why.append(f"only {total[k]} box(es): too few to learn it or to score it")
        for split, consequence in (("train", "it cannot be learned"), ("test", "its test AP is undefined and left out of the means")):
            if split in index.splits and split not in counts:
                why.append(f"no box in the {split} split: {consequence}")
        if why:
            where = ", ".join(f"{split}: {n}" for split, n in counts.items())
            warnings.append({
                "kind": "rare_class", "class": name, "boxes": int(total[k]), "splits": counts,
                "message": f"class {name!r} has {total[k]} box(es) ({where}); " + "; ".join(why)
                           + ". Add boxes of it, or merge or remove the class",
            })
    return warnings


def render_summary(summary: dict, console: Console) -> None:
    """Print a :func:`summarize` result as tables. User text (file names, messages) is printed
    as plain text so brackets in it are not taken for rich markup."""
    split_note = "the dataset's own" if summary["split_source"] == "dataset" else "seeded by kdet"
    console.print(Text.assemble(
        ("Dataset ", "bold"), (summary["path"], "bold cyan"), f"  ({summary['format'].upper()})\n",
        f"{summary['images']} images ({summary['images_without_boxes']} without boxes), {summary['boxes']} boxes "
        f"({summary['difficult_boxes']} difficult), {len(summary['classes'])} classes; splits: {split_note}",
    ))

    splits = Table(title="Splits", title_justify="left")
    splits.add_column("split")
    splits.add_column("images", justify="right")
    splits.add_column("boxes", justify="right")
    for name, counts in summary["splits"].items():
        splits.add_row(Text(name), str(counts["images"]), str(counts["boxes"]))
    console.print(splits)
    labelled = summary.get("labelled")
    if labelled:  # kdet data check --labelled-fraction
        console.print(Text(f"data.labelled_fraction {labelled['fraction']:g} (seed {labelled['seed']}): {labelled['images']} "
                           f"of the {labelled['of']} images of split {labelled['split']!r} keep their labels; the other "
                           f"{labelled['of'] - labelled['images']} are data.unlabelled: train_rest (image ids sha256 "
                           f"{labelled['ids_sha256'][:12]})"))

    classes = Table(title="Classes", title_justify="left")
    classes.add_column("id", justify="right")
    classes.add_column("class")
    classes.add_column("boxes", justify="right")
    for k, (name, count) in enumerate(summary["classes"].items()):
        classes.add_row(str(k), Text(name), Text(str(count), style="red" if count == 0 else ""))
    console.print(classes)

    shapes = Table(title="Sizes (pixels)", title_justify="left")
    shapes.add_column("")
    shapes.add_column("value")
    image_sizes = summary["image_sizes"]
    shown = ", ".join(f"{s['width']}x{s['height']} ({s['count']})" for s in image_sizes[:5])
    more = f", and {len(image_sizes) - 5} other sizes" if len(image_sizes) > 5 else ""
    shapes.add_row("image sizes", (shown or "-") + more)
    if summary["box_sizes"]:
        for axis in ("width", "height"):
            s = summary["box_sizes"][axis]
            shapes.add_row(f"box {axis}", f"min {s['min']:g}, median {s['median']:g}, max {s['max']:g}")
    console.print(shapes)

    for warning in summary["warnings"]:
        console.print(Text(f"warning: {warning['message']}", style="yellow"))
    for error in summary["errors"]:
        console.print(Text(f"error: {error}", style="bold red"))
    if not summary["problems"]:
        console.print(Text("No problems found.", style="green"))
        return
    console.print(Text(f"{len(summary['problems'])} problem(s), by kind:", style="bold yellow"))
    by_kind: dict[str, list[dict]] = {}
    for problem in summary["problems"]:
        by_kind.setdefault(problem["kind"], []).append(problem)
    for kind, problems in by_kind.items():
        table = Table(title=f"{kind} ({len(problems)})", title_justify="left")
        table.add_column("where", overflow="fold")
        table.add_column("problem", overflow="fold")
        table.add_column("action", overflow="fold")
        for problem in problems[:SHOWN_PER_KIND]:
            where = problem["file"] + (f":{problem['line']}" if "line" in problem else "")
            table.add_row(Text(where), Text(problem["message"]), Text(problem["action"]))
        console.print(table)
        if len(problems) > SHOWN_PER_KIND:
            console.print(Text(f"... and {len(problems) - SHOWN_PER_KIND} more {kind} problem(s); the full list is in --json"))
