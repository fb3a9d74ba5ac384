"""Run a detector over records and score it: predictions mapped back to original pixels."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..data.pipeline import DetectionDataset, collate
from ..models import Detector
from ..structures import ImageRecord
from .metrics import ImagePredictions, evaluate


@torch.no_grad()
def predict(
    model: Detector,
    records: list[ImageRecord],
    input_size: int,
    *,
    batch_size: int = 16,
    score_thresh: float = 0.001,
    nms_iou: float = 0.6,
    max_det: int = 300,
    dataset: DetectionDataset | None = None,
) -> list[ImagePredictions]:
    """Detections for every record, in original-image pixels. ``dataset`` may be passed to reuse
    its image cache; it must hold ``records`` without augmentation."""
    dataset = dataset or DetectionDataset(records, input_size, augment=None, cache=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[ImagePredictions] = []
    try:
        for images, _, indices in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            result = model(images.to(device), decode=True, score_thresh=score_thresh, nms_iou=nms_iou, max_det=max_det)
            for index, det in zip(indices, result.detections):
                boxes = dataset.boxes[index].to_original(det.boxes.float().cpu())
                out.append(
                    ImagePredictions(
                        dataset.records[index].image_id, boxes.numpy(), det.scores.cpu().numpy(), det.labels.cpu().numpy()
                    )
                )
    finally:
        model.train(was_training)
    return out


def evaluate_model(model: Detector, records: list[ImageRecord], input_size: int, **kwargs) -> dict:
    """COCO- and VOC-style metrics of ``model`` on ``records`` (see :func:`kdet.engine.metrics.evaluate`)."""
    predictions = predict(model, records, input_size, **kwargs)
    return evaluate(records, predictions, model.class_names)
