"""Training loop, evaluation (COCO and VOC mAP), checkpoints and hooks."""
