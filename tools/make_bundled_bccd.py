"""Make the half-resolution BCCD copy bundled in kdet/assets/bccd/.

    python tools/make_bundled_bccd.py [--source /work/shared/datasets/bccd] [--out kdet/assets/bccd]

Images are resized to half size (640x480 -> 320x240, PIL LANCZOS, JPEG quality 90) under the
same names; boxes are scaled by 0.5 and kept to one decimal; <size> is updated. Everything else
in the XML is kept, including the two zero-size boxes of the source (kdet reports them). The
split files and LICENSE are copied verbatim; SOURCE.md keeps the attribution.
"""
from __future__ import annotations

import argparse
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

SCALE = 0.5
JPEG_QUALITY = 90
REPO = Path(__file__).resolve().parent.parent

SOURCE_MD = """\
# BCCD (Blood Cell Count and Detection), half-resolution copy

- 364 microscope images, 320x240 JPEG (quality 90), Pascal VOC XML annotations.
- 3 classes: RBC (4155 boxes), WBC (372), Platelets (361).
- Splits in ImageSets/Main: train 205, val 87, test 72 (trainval 292), as in the source.
- Source: the public repository Shenggan/BCCD_Dataset on GitHub, MIT licence (see LICENSE here,
  copied verbatim). Keep LICENSE and this attribution next to any copy of the data.
- This is a half-resolution copy of the original 640x480 data, made by
  tools/make_bundled_bccd.py in the kdet repository: images resized with PIL LANCZOS, box
  coordinates scaled by 0.5 and rounded to one decimal, <size> updated; file names, the other
  XML fields and the split files are unchanged.
- Some annotations are imperfect (two boxes have zero size, in BloodImage_00338 and
  BloodImage_00343, and not every RBC is labelled). They are kept as in the source;
  `kdet data check` reports them.
"""


def scale_annotation(src: Path, dst: Path, width: int, height: int) -> None:
    """Copy one VOC XML with its <size> set to ``width x height`` and its boxes scaled."""
    tree = ET.parse(src)
    root = tree.getroot()
    size = root.find("size")
    if size is None:
        raise ValueError(f"{src}: no <size> element; expected a VOC annotation")
    size.find("width").text = str(width)
    size.find("height").text = str(height)
    for bndbox in root.iter("bndbox"):
        for key in ("xmin", "ymin", "xmax", "ymax"):
            element = bndbox.find(key)
            element.text = f"{float(element.text) * SCALE:.1f}"
    tree.write(dst, encoding="utf-8")


def make_copy(source: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    for image_path in sorted((source / "JPEGImages").glob("*.jpg")):
        with Image.open(image_path) as img:
            small = img.convert("RGB").resize((round(img.width * SCALE), round(img.height * SCALE)), Image.LANCZOS)
        # optimize=True only rebuilds the Huffman tables: same pixels, ~4% fewer bytes
        small.save(out / "JPEGImages" / image_path.name, quality=JPEG_QUALITY, optimize=True)
        xml_name = image_path.with_suffix(".xml").name
        scale_annotation(source / "Annotations" / xml_name, out / "Annotations" / xml_name, small.width, small.height)
    for split_file in sorted((source / "ImageSets" / "Main").glob("*.txt")):
        shutil.copyfile(split_file, out / "ImageSets" / "Main" / split_file.name)
    shutil.copyfile(source / "LICENSE", out / "LICENSE")
    (out / "SOURCE.md").write_text(SOURCE_MD, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/work/shared/datasets/bccd"), help="the original BCCD (VOC layout)")
    parser.add_argument("--out", type=Path, default=REPO / "kdet" / "assets" / "bccd")
    args = parser.parse_args()
    if not (args.source / "Annotations").is_dir():
        raise SystemExit(f"{args.source}: no Annotations/ folder; pass --source pointing at the original BCCD (VOC layout)")
    make_copy(args.source, args.out)


if __name__ == "__main__":
    main()
