"""Backbones: each maps a normalised image batch to named stages ``c3``, ``c4``, ``c5``
at strides 8, 16 and 32, and says its channel counts up front.

The built-in CSP-Darknet comes in YOLOv5's sizes; the torchvision ones (MobileNetV2/V3,
ResNet-18/34/50) are built without weights and can load a local weights file.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn

from ..registry import Registry
from .layers import C3, SPPF, ConvBNAct
from .weights import Log, load_state, to_stderr

# width multiplier, depth multiplier: the YOLOv5 scaling rules
SIZES: dict[str, tuple[float, float]] = {
    "p": (0.125, 0.33),
    "t": (0.1875, 0.33),
    "n": (0.25, 0.33),
    "s": (0.50, 0.33),
    "m": (0.75, 0.67),
    "l": (1.00, 1.00),
}

STAGE_NAMES = ("c3", "c4", "c5")
STAGE_STRIDES = (8, 16, 32)


def scale_width(channels: int, width: float, divisor: int = 8) -> int:
    return max(divisor, int(math.ceil(channels * width / divisor) * divisor))


def scale_depth(depth: int, multiplier: float) -> int:
    return max(1, round(depth * multiplier))


class Backbone(nn.Module):
    """Base class: ``forward(x) -> {"c3": [N, C3, H/8, W/8], "c4": ..., "c5": ...}``."""

    channels: list[int]
    strides: list[int] = list(STAGE_STRIDES)

    def load_pretrained(self, path: str | Path, *, allow_partial: bool = False) -> None:
        load_weights_file(self, path, what="model.pretrained_backbone", allow_partial=allow_partial)


BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


@BACKBONES.register("cspdarknet")
class CSPDarknet(Backbone):
    """YOLOv5 (v6.0+) CSP-Darknet with SPPF; ``size`` picks width and depth from :data:`SIZES`."""

    def __init__(self, size: str = "s") -> None:
        super().__init__()
        width, depth = SIZES[size]
        ch = [scale_width(c, width) for c in (64, 128, 256, 512, 1024)]
        d = [scale_depth(n, depth) for n in (3, 6, 9, 3)]
        self.stem = ConvBNAct(3, ch[0], 6, 2, 2)  # stride 2
        self.stage2 = nn.Sequential(ConvBNAct(ch[0], ch[1], 3, 2), C3(ch[1], ch[1], d[0]))  # stride 4
        self.stage3 = nn.Sequential(ConvBNAct(ch[1], ch[2], 3, 2), C3(ch[2], ch[2], d[1]))  # stride 8
        self.stage4 = nn.Sequential(ConvBNAct(ch[2], ch[3], 3, 2), C3(ch[3], ch[3], d[2]))  # stride 16
        self.stage5 = nn.Sequential(
            ConvBNAct(ch[3], ch[4], 3, 2), C3(ch[4], ch[4], d[3]), SPPF(ch[4], ch[4])
        )  # stride 32
        self.channels = [ch[2], ch[3], ch[4]]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stage2(self.stem(x))
        c3 = self.stage3(x)
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        return {"c3": c3, "c4": c4, "c5": c5}


class TorchvisionBackbone(Backbone):
    """A torchvision classification network cut at its last layer of stride 8, 16 and 32.

    The cut points are found by running a probe image through the network, so any width
    multiplier works without a table of layer indices.
    """

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers
        cut: dict[int, tuple[int, int]] = {}  # stride -> (layer index, channels)
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64)
            was_training = layers.training
            layers.eval()
            for index, layer in enumerate(layers):
                x = layer(x)
                stride = 64 // x.shape[-1]
                if stride in STAGE_STRIDES:
                    cut[stride] = (index, int(x.shape[1]))
            layers.train(was_training)
        missing = [s for s in STAGE_STRIDES if s not in cut]
        if missing:
            raise ValueError(f"backbone has no layer at stride(s) {missing}; cannot build a pyramid")
        self.cut_index = [cut[s][0] for s in STAGE_STRIDES]
        self.channels = [cut[s][1] for s in STAGE_STRIDES]
        # layers after the stride-32 cut (a classifier's last 1x1 conv) are never run: drop them
        self.layers = nn.Sequential(*list(layers)[: self.cut_index[-1] + 1])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        names = dict(zip(self.cut_index, STAGE_NAMES))
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in names:
                out[names[index]] = x
        return out


def _resnet_layers(net: torchvision.models.ResNet) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
        )
    )


def _torchvision_backbone(name: str, width: float, pretrained: str | Path | None, allow_partial: bool = False) -> TorchvisionBackbone:
    kwargs = {"width_mult": width} if name in {"mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"} else {}
    if name.startswith("resnet") and width != 1.0:
        raise ValueError(f"model.width is not supported for {name}; remove it or use 1.0")
    net = getattr(torchvision.models, name)(weights=None, **kwargs)
    if pretrained:
        # torchvision's weight files are whole classification networks: load before cutting
        load_weights_file(net, pretrained, what=f"model.pretrained_backbone ({name})", allow_partial=allow_partial)
    layers = _resnet_layers(net) if name.startswith("resnet") else net.features
    return TorchvisionBackbone(layers)


for _name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50"):
    BACKBONES.register(_name)(
        lambda width=1.0, pretrained=None, allow_partial=False, _n=_name: _torchvision_backbone(_n, width, pretrained, allow_partial)
    )


def build_backbone(name: str, *, size: str = "s", width: float = 1.0, pretrained: str | Path | None = None,
                   allow_partial: bool = False, input_size: int = 320, args: dict | None = None) -> Backbone:
    """Build a registered backbone, or a timm one (``timm:NAME``, :mod:`kdet.models.timm_backbone`,
    with ``args`` for ``timm.create_model`` and checked at ``input_size``). ``size`` applies to
    ``cspdarknet``, ``width`` to MobileNets; ``pretrained`` is a local weights file (a torchvision
    checkpoint for torchvision backbones, the whole timm model for timm ones, a state dict of the
    backbone itself for ``cspdarknet``), refused unless it fits completely or ``allow_partial``
    (``model.partial_weights``)."""
    if name.startswith("timm:"):
        from .timm_backbone import build_timm_backbone

        return build_timm_backbone(name[len("timm:"):], input_size=input_size, pretrained=pretrained,
                                   allow_partial=allow_partial, args=args)
    if args:
        raise ValueError(f"model.backbone_args is for timm backbones (timm:NAME), not {name}; remove it")
    builder = BACKBONES.get(name)
    if name == "cspdarknet":
        backbone = builder(size=size)
        if pretrained:
            backbone.load_pretrained(pretrained, allow_partial=allow_partial)
        return backbone
    return builder(width=width, pretrained=pretrained, allow_partial=allow_partial)


def load_weights_file(module: nn.Module, path: str | Path, *, what: str, allow_partial: bool = False,
                      option: str = "model.partial_weights", log: Log = to_stderr) -> int:
    """Load a local state dict into ``module`` and say how many tensors it loaded.

    Accepts a bare state dict or a dict holding one under ``state_dict``/``model``. Raises when
    the file is missing or cannot be read, and when it does not fit ``module`` completely unless
    ``allow_partial`` (the config key ``option``); see :func:`kdet.models.weights.load_state`.
    Returns the number of tensors loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {path} not found; give a local weights file (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError(f"{what}: {path} is a .safetensors file, which needs the safetensors package "
                         f"(pip install safetensors)") from None
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise ValueError(f"{what}: {path} cannot be read as a weights file ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict of tensors")
    return load_state(module, state, what=what, source=str(path), allow_partial=allow_partial, option=option, log=log)
