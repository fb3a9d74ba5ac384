"""How far a DFL detector's outputs in training mode (BatchNorm on the batch's statistics) are
from its outputs in eval mode (BatchNorm on its running statistics), for the same weights and
images: the distillation terms a mean teacher (``teacher: {self: ema}``) reads would see this gap
even with a teacher equal to the student, since the teacher runs in eval mode and the student in
training mode.

For each checkpoint, on the first ``--images`` images of a split letterboxed to the model's input
size (one batch, no augmentation), it prints ``ld``'s divergence (KL between the box-edge
distributions at ``--temperature``, times T^2, eval mode as the teacher) over all locations and
over the locations where the eval-mode model is confident (best class probability > 0.3), and the
mean and largest difference in class probability, the mean signed difference of the class logits
(eval minus training mode) and the mean entropy of the box-edge distributions in each mode: a
difference with a sign is a direction a mean teacher would pull its student in at every step.

    python benchmarks/mode_gap.py runs/prove_bccd_vit/baseline-s0/best.pt [MORE.pt ...] \\
        [--data bundled:bccd] [--split val] [--images 16]
"""
from __future__ import annotations

import argparse
import copy

import torch

from kdet.data import read_dataset
from kdet.distill.losses import edge_divergence
from kdet.data.pipeline import Letterbox, letterbox_image, load_image
from kdet.engine.checkpoint import load_detector


def batch(records: list, size: int) -> torch.Tensor:
    images = []
    for record in records:
        image = load_image(record.path)
        images.append(letterbox_image(image, Letterbox.fit(image.shape[-1], image.shape[-2], size)))
    return torch.stack(images).float() / 255


def gap(path: str, images_at: "dict[int, torch.Tensor]", records: list, args: argparse.Namespace) -> str:
    model, payload = load_detector(path, log=lambda _: None)
    size = payload["input_size"]
    if size not in images_at:  # one batch per input size, shared by the checkpoints
        images_at[size] = batch(records, size)
    images = images_at[size]
    with torch.no_grad():
        evaluated = model(images)
        trained = copy.deepcopy(model).train()(images)  # a copy: training mode updates the running statistics
    t = args.temperature
    divergence, confident, probability, shift, entropy = [], [], [], [], []
    for e, s in zip(evaluated.head, trained.head):
        if e.box_dist is None:
            raise SystemExit(f"{path}: its head has no box distributions (a DFL head is needed)")
        kl = edge_divergence(s.box_dist, e.box_dist, t)  # [N, A, H, W], eval mode as the teacher
        p_e, p_s = e.cls_logits.sigmoid(), s.cls_logits.sigmoid()
        divergence.append(kl.flatten())
        confident.append(kl[p_e.amax(2) > 0.3])
        probability.append((p_e - p_s).abs().flatten())
        shift.append((e.cls_logits - s.cls_logits).flatten())
        entropy.append(torch.stack([_entropy(e.box_dist).flatten(), _entropy(s.box_dist).flatten()]))
    divergence, confident, probability = torch.cat(divergence), torch.cat(confident), torch.cat(probability)
    shift, entropy = torch.cat(shift), torch.cat(entropy, dim=1).mean(1)
    sure = f"{confident.mean():.4f} at {confident.numel()} confident locations" if confident.numel() else "no confident location"
    return (f"{path}: ld(eval || train) {divergence.mean():.4f} over all {divergence.numel()} locations, {sure}; "
            f"class probability differs by {probability.mean():.4f} on average, {probability.max():.3f} at most; "
            f"class logits eval minus train {shift.mean():+.3f} on average ({(shift > 0).float().mean():.0%} higher in eval "
            f"mode); box-edge distribution entropy {entropy[0]:.3f} in eval mode, {entropy[1]:.3f} in training mode")


def _entropy(dist: torch.Tensor) -> torch.Tensor:
    """Entropy of each box edge's distribution (``box_dist`` logits ``[N, A, 4, R, H, W]``, over R)."""
    logp = dist.log_softmax(3)
    return -(logp.exp() * logp).sum(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default="bundled:bccd")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=10.0, help="ld's temperature (kdet's default)")
    args = parser.parse_args()
    torch.manual_seed(0)
    index = read_dataset(args.data, verify_images=False)
    if args.split not in index.splits:
        raise SystemExit(f"--split: {index.missing_split_message(args.split)}")
    records, images_at = index.splits[args.split][:args.images], {}
    for path in args.checkpoints:
        print(gap(path, images_at, records, args))


if __name__ == "__main__":
    main()
