"""Builders of tiny dataset trees for the reader tests: a few 32x24 images written with PIL.

Test modules import the ``tree`` fixture from here (``from tiny_trees import tree``) rather than
from a ``conftest.py``: other test folders import ``tests/conftest.py`` by the name ``conftest``,
and a second ``conftest.py`` here would shadow it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

W, H = 32, 24


class Tree:
    """Builders for image and annotation files under one tmp folder."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def image(self, rel: str, size: tuple[int, int] = (W, H), fmt: str | None = None) -> Path:
        """Noise image (so JPEG has real scan data to cut); ``fmt`` overrides the extension."""
        pixels = np.random.default_rng(len(rel)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        path = self.path(rel)
        Image.fromarray(pixels).save(path, format=fmt, quality=95)  # PNG ignores quality
        return path

    def truncated_jpeg(self, rel: str) -> Path:
        """A JPEG whose header is intact but whose scan data stops half-way."""
        buffer = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
        data = buffer.getvalue()
        scan = data.index(b"\xff\xda")
        path = self.path(rel)
        path.write_bytes(data[: scan + (len(data) - scan) // 2])
        return path

    def text(self, rel: str, content: str) -> Path:
        path = self.path(rel)
        path.write_text(content)
        return path

    def json(self, rel: str, payload: dict) -> Path:
        return self.text(rel, json.dumps(payload, indent=1))

    def voc_xml(self, rel: str, objects: list[tuple], size: tuple[int, int] | None = (W, H), filename: str | None = None,
                folder: str | None = None, path: str | None = None) -> Path:
        """``objects``: ``(name, xmin, ymin, xmax, ymax[, difficult])``. Each ``<object>`` starts
        on line ``9 + 10 * k`` (k = 0, 1, ...) when ``size`` is given and neither ``folder`` nor
        ``path`` is (each adds a line before the objects)."""
        lines = ["<annotation>"]
        if folder is not None:
            lines.append(f"\t<folder>{folder}</folder>")
        lines.append(f"\t<filename>{filename or Path(rel).stem + '.jpg'}</filename>")
        if path is not None:
            lines.append(f"\t<path>{path}</path>")
        if size:
            lines += ["\t<size>", f"\t\t<width>{size[0]}</width>", f"\t\t<height>{size[1]}</height>", "\t\t<depth>3</depth>", "\t</size>"]
        lines.append("\t<segmented>0</segmented>")
        for obj in objects:
            name, x1, y1, x2, y2, *rest = obj
            difficult = rest[0] if rest else 0
            lines += [
                "\t<object>", f"\t\t<name>{name}</name>", f"\t\t<difficult>{difficult}</difficult>", "\t\t<bndbox>",
                f"\t\t\t<xmin>{x1}</xmin>", f"\t\t\t<ymin>{y1}</ymin>", f"\t\t\t<xmax>{x2}</xmax>", f"\t\t\t<ymax>{y2}</ymax>",
                "\t\t</bndbox>", "\t</object>",
            ]
        lines.append("</annotation>")
        return self.text(rel, "\n".join(lines) + "\n")


def kinds(index) -> list[tuple[str, str, int | None]]:
    """``(kind, file, line)`` of every problem, sorted, for exact comparisons."""
    return sorted(((p.kind, p.file, p.line) for p in index.problems), key=lambda t: (t[0], t[1], t[2] or 0))


def by_name(index) -> dict:
    """Records of all splits by image file name."""
    return {r.path.name: r for r in index.all_records()}


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """An empty :class:`Tree` at ``tmp_path / "ds"`` (created by the first file written)."""
    return Tree(tmp_path / "ds")
