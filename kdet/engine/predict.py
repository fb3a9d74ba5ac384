"""Detections on arbitrary images, drawn and listed."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from ..data.pipeline import Letterbox, letterbox_image, load_image
from ..models import Detector

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080"]


@torch.no_grad()
def predict_images(
    model: Detector, images: list[Path], input_size: int, out_dir: Path, *, score_thresh: float = 0.25, nms_iou: float = 0.6
) -> tuple[list[dict], list[dict]]:
    """Run ``model`` on each image, write the image with its boxes drawn into ``out_dir`` (same
    name) and all detections, in original pixels, to ``out_dir/predictions.json``.

    Returns ``(results, skipped)``: one result per image predicted, and ``{"image", "error"}``
    for each image that could not be read (skipped; the others are still predicted)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    device = next(model.parameters()).device
    results, skipped = [], []
    for path in images:
        try:
            image = load_image(path)  # uint8 [3, H, W]
        except Exception as error:  # decoders raise several types
            skipped.append({"image": str(path), "error": f"cannot be read as an image ({error})"})
            continue
        box = Letterbox.fit(image.shape[2], image.shape[1], input_size)
        batch = letterbox_image(image, box)[None].float().div(255).to(device)
        det = model(batch, decode=True, score_thresh=score_thresh, nms_iou=nms_iou).detections[0]
        boxes = box.to_original(det.boxes.float().cpu())
        labels = [model.class_names[i] for i in det.labels.tolist()]
        captions = [f"{name} {score:.2f}" for name, score in zip(labels, det.scores.tolist())]
        colors = [PALETTE[i % len(PALETTE)] for i in det.labels.tolist()]
        drawn = draw_bounding_boxes(image, boxes, captions, colors=colors, width=2) if len(boxes) else image
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_dir / path.name, quality=90)
        results.append(
            {
                "image": str(path),
                "width": image.shape[2],
                "height": image.shape[1],
                "detections": [
                    {"box_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "label": name}
                    for b, s, name in zip(boxes.tolist(), det.scores.tolist(), labels)
                ],
            }
        )
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=1))
    return results, skipped
