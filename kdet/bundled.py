"""What ships with kdet, named ``bundled:NAME``: the BCCD data and checkpoints trained on it."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_DATASETS = {"bccd": ASSETS / "bccd"}
# fp16 weights; BENCHMARKS.md says how each was made and how it scores
BUNDLED_MODELS = {"bccd_teacher": ASSETS / "models" / "bccd_teacher.pt",            # CSP-Darknet-s, anchor head
                  "bccd_teacher_dfl": ASSETS / "models" / "bccd_teacher_dfl.pt"}    # CSP-Darknet-s, DFL head


def resolve_bundled(path: str | Path, table: dict[str, Path], what: str, error: type[Exception] = FileNotFoundError) -> Path:
    """``bundled:NAME`` -> ``table[NAME]``; any other path is returned as a ``Path`` (``~`` expanded).
    An unknown name raises ``error`` listing the bundled ones."""
    text = str(path)
    if not text.startswith("bundled:"):
        return Path(text).expanduser()
    name = text.removeprefix("bundled:")
    if name not in table:
        raise error(f"no bundled {what} {text!r}; bundled {what}s: {', '.join('bundled:' + n for n in table)}")
    return table[name]
