"""Letterboxed images kept on disk and shared by every run and seed (``data.cache: disk``).

Decoding a photo and resizing it to the input size costs more than a training step of a small
model on large photos, and the in-memory cache (``data.cache: ram``) lives for one run: every
run and every seed of a benchmark decodes each photo again, and a data set larger than the memory
is decoded at every use. The disk cache decodes each photo once per input size and keeps the
result, ``uint8 [3, S, S]`` exactly as :func:`~kdet.data.pipeline.letterbox_image` makes it, so a
sample read from it is the sample decoded anew, bit for bit.

Entries
  One file per (source image, input size): ``DIR/<S>/<hh>/<sha256 of the resolved path and S>.img``.
  Its header records the source's resolved path, size in bytes and modification time, the input
  size and the letterbox format version; a source whose size or time differs from the header
  is decoded again and its entry rewritten, so an edited or replaced image is never served
  stale, and a new input size gets entries of its own. Files are written under a temporary
  name and renamed into place: concurrent runs, loader workers and torchrun processes may fill
  the same cache, and a reader never sees half an entry (one that is damaged anyway, a
  truncated file, is decoded again).

Size on disk: ``3 * S * S`` bytes per image (300 KB at 320 px, 1.2 MB at 640 px), uncompressed
so that reading it costs no more than a copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MAGIC = b"KDETIMG1"
VERSION = 1  # of the letterbox itself (resize, padding); a change makes every entry stale


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kdet/images``, else ``~/.cache/kdet/images``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdet" / "images"


class DiskImageCache:
    """Letterboxed images on disk under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe.", delete=True)
            probe.close()
        except OSError as error:
            raise OSError(f"data.cache: disk: cannot write to the image cache folder {self.root} ({error}); set "
                          f"data.cache_dir to a writable folder, or use data.cache: ram") from None

    def entry_path(self, source: Path, size: int) -> Path:
        key = hashlib.sha256(f"{source}|{size}".encode()).hexdigest()
        return self.root / str(size) / key[:2] / f"{key}.img"

    def load(self, source: str | Path, size: int, make) -> Tensor:
        """The letterboxed image of ``source`` at input ``size``: read from its entry, or made by
        ``make()`` (``uint8 [3, size, size]``) and stored when the entry is missing or stale."""
        source = Path(source).resolve()
        stat = source.stat()
        header = {"source": str(source), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "size": size,
                  "version": VERSION}
        path = self.entry_path(source, size)
        image = _read(path, header)
        if image is None:
            image = make()
            if tuple(image.shape) != (3, size, size) or image.dtype != torch.uint8:
                raise ValueError(f"image cache: expected uint8 [3, {size}, {size}] for {source}, got {image.dtype} "
                                 f"{list(image.shape)}")
            _write(path, header, image)
        return image


def _read(path: Path, expected: dict) -> Tensor | None:
    """The entry's image when its header is ``expected`` and it is whole; ``None`` otherwise."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                return None
            (length,) = struct.unpack("<I", handle.read(4))
            header = json.loads(handle.read(length))
            if header != expected:
                return None
            size = expected["size"]
            pixels = np.fromfile(handle, dtype=np.uint8, count=3 * size * size)
    except (OSError, ValueError, struct.error):
        return None
    if pixels.size != 3 * size * size:  # truncated
        return None
    return torch.from_numpy(pixels.reshape(3, size, size))


def _write(path: Path, header: dict, image: Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = json.dumps(header).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + struct.pack("<I", len(encoded)) + encoded)
            handle.write(image.contiguous().numpy().tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["DiskImageCache", "default_cache_dir"]
