"""The labelled part of the training split (``data.labelled_fraction``): a seeded choice of the
training images that keep their labels; the others can be the unlabelled images of
``kdet distill`` (``data.unlabelled: train_rest``).

The choice is the prefix of one seeded order of the split's images: each image id is ranked by
the SHA-256 of ``(seed, id)``, so the order depends on the seed and the ids alone (not on the
platform, a random-number library's version or the file-system order), and with one seed the
images a fraction keeps are among those every larger fraction keeps. A fraction ``f`` of ``n``
images keeps ``round(f * n)`` of them, at least 1.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Sequence

from ..structures import DatasetIndex, ImageRecord


def labelled_order(image_ids: Sequence[str], seed: int) -> list[str]:
    """``image_ids`` (each once) in the seeded order whose prefixes the fractions keep."""
    def rank(image_id: str) -> tuple[bytes, str]:
        return hashlib.sha256(f"{int(seed)}\0{image_id}".encode()).digest(), image_id

    return sorted(sorted(set(image_ids)), key=rank)


def labelled_count(images: int, fraction: float) -> int:
    """How many of ``images`` a fraction keeps: ``round(fraction * images)``, at least 1."""
    if fraction >= 1:
        return images
    return min(images, max(1, round(fraction * images)))


def split_labelled(records: Sequence[ImageRecord], fraction: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(kept, left out)``: the records whose labels a fraction keeps and the others, each in
    the order of ``records``."""
    order = labelled_order([r.image_id for r in records], seed)
    chosen = set(order[: labelled_count(len(order), fraction)])
    kept = [r for r in records if r.image_id in chosen]
    return kept, [r for r in records if r.image_id not in chosen]


def keep_labelled(index: DatasetIndex, split: str, fraction: float, seed: int) -> DatasetIndex:
    """``index`` whose ``split`` holds the records a fraction keeps, the rest in
    :attr:`~kdet.structures.DatasetIndex.withheld`; the other splits as they are."""
    if fraction >= 1:
        return index
    kept, rest = split_labelled(index.split(split), fraction, seed)
    return replace(index, splits={**index.splits, split: kept}, withheld={**index.withheld, split: rest})


def labelled_record(index: DatasetIndex, split: str, fraction: float, seed: int, *, ids: bool = True) -> dict:
    """What a run trains on, as its files record it: the split, fraction and seed, how many of the
    split's images keep their labels, the SHA-256 of their sorted ids and, with ``ids``, the ids."""
    kept = sorted(r.image_id for r in index.split(split))
    out = {"split": split, "fraction": fraction, "seed": seed, "images": len(kept),
           "of": len(kept) + len(index.withheld.get(split, [])),
           "ids_sha256": hashlib.sha256("\n".join(kept).encode()).hexdigest()}
    return {**out, "image_ids": kept} if ids else out


def labelled_line(record: dict) -> str:
    """The log line of a :func:`labelled_record`."""
    return (f"data.labelled_fraction {record['fraction']:g} (seed {record['seed']}): {record['images']} of {record['of']} "
            f"training images keep their labels; the other {record['of'] - record['images']} are left out "
            f"(data.unlabelled: train_rest gives them to kdet distill as unlabelled images)")


__all__ = ["keep_labelled", "labelled_count", "labelled_line", "labelled_order", "labelled_record", "split_labelled"]
