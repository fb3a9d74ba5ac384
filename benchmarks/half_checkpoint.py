"""Write a fp16 copy of a kdet checkpoint (weights only) for shipping: half the size, and
`load_detector` casts it back to fp32.  python benchmarks/half_checkpoint.py IN.pt OUT.pt"""
from __future__ import annotations

import sys

from kdet.engine.checkpoint import half_precision, load_checkpoint, save_atomic


def main(source: str, target: str) -> None:
    save_atomic(half_precision(load_checkpoint(source)), target)


if __name__ == "__main__":
    main(*sys.argv[1:3])
