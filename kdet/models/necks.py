"""Necks: fuse backbone stages ``c3..c5`` into pyramid levels ``p3..p5`` (strides 8/16/32)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbones import SIZES, scale_depth, scale_width
from .layers import C3, ConvBNAct


class PAN(nn.Module):
    """YOLOv5's PANet neck: a top-down path then a bottom-up path, C3 blocks at each merge.

    With a CSP-Darknet backbone of the same size this is exactly YOLOv5's head section; any
    backbone's channels are accepted since the first convolutions adapt them.
    """

    def __init__(self, in_channels: list[int], size: str = "s") -> None:
        super().__init__()
        width, depth = SIZES[size]
        c3, c4, c5 = (scale_width(c, width) for c in (256, 512, 1024))
        n = scale_depth(3, depth)
        in3, in4, in5 = in_channels
        self.reduce5 = ConvBNAct(in5, c4, 1)
        self.top_down4 = C3(c4 + in4, c4, n, shortcut=False)
        self.reduce4 = ConvBNAct(c4, c3, 1)
        self.top_down3 = C3(c3 + in3, c3, n, shortcut=False)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bottom_up4 = C3(c3 + c3, c4, n, shortcut=False)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bottom_up5 = C3(c4 + c4, c5, n, shortcut=False)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.channels = [c3, c4, c5]
        self.strides = [8, 16, 32]

    def forward(self, stages: dict[str, Tensor]) -> dict[str, Tensor]:
        lateral5 = self.reduce5(stages["c5"])  # [N, c4, H/32, W/32]
        x = self.top_down4(torch.cat([self.upsample(lateral5), stages["c4"]], 1))
        lateral4 = self.reduce4(x)  # [N, c3, H/16, W/16]
        p3 = self.top_down3(torch.cat([self.upsample(lateral4), stages["c3"]], 1))
        p4 = self.bottom_up4(torch.cat([self.down3(p3), lateral4], 1))
        p5 = self.bottom_up5(torch.cat([self.down4(p4), lateral5], 1))
        return {"p3": p3, "p4": p4, "p5": p5}
