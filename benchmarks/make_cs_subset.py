"""Write the seeded construction-safety subset the benchmarks train on: SIZE images of the
training split drawn with SEED (all of valid and test), as an Ultralytics data.yaml with a
.txt list of training images, pointing at the copy in ../shared/datasets/construction-safety
(CC BY 4.0: see its SOURCE.md; nothing is copied).

    python benchmarks/make_cs_subset.py [SIZE] [SEED]     (default 500 0)
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "shared" / "datasets" / "construction-safety"


def main(size: int = 500, seed: int = 0) -> Path:
    images = sorted(p.name for p in (SOURCE / "train" / "images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if size > len(images):
        raise SystemExit(f"the training split has {len(images)} images, fewer than {size}")
    chosen = sorted(random.Random(seed).sample(images, size))
    out = HERE / "data" / f"construction-safety-{size}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("".join(f"train/images/{name}\n" for name in chosen))
    names = ["helmet", "no-helmet", "no-vest", "person", "vest"]
    (out / "data.yaml").write_text(
        f"# {size} of the {len(images)} construction-safety training images, drawn with seed {seed} by\n"
        f"# benchmarks/make_cs_subset.py; valid and test whole. Images and labels stay in the shared copy\n"
        f"# (CC BY 4.0, see its SOURCE.md).\n"
        f"path: {Path('..') / '..' / '..' / '..' / 'shared' / 'datasets' / 'construction-safety'}\n"
        f"train: train.txt\n"
        f"val: valid/images\ntest: test/images\nnc: {len(names)}\nnames: {names}\n"
    )
    return out


if __name__ == "__main__":
    print(main(*(int(a) for a in sys.argv[1:3])))
