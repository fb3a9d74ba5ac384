"""torchvision's FCOS behind kdet's detector interface (placeholder until implemented)."""
