"""timm networks as kdet backbones: ``model.backbone: timm:NAME``.

Hierarchical networks (ConvNeXt, Swin, EfficientNet, ResNet, MobileViT ...) give their last
stage of stride 8, 16 and 32 through timm's ``forward_intermediates``, timm's feature
extraction (the API behind ``features_only``). A plain Vision Transformer has one map, at the
stride of its patches; a simple feature pyramid turns it into strides 8, 16 and 32 as ViTDet
does: a transposed convolution up, the map itself, a max-pool down, each followed by a 1x1 and a
3x3 convolution with layer norms.

timm is an optional dependency (``pip install kdet[timm]``), imported only when such a
backbone is built. Nothing is downloaded: the network is built without weights and
``model.pretrained_backbone`` may name a local file of the whole timm model (``.pth``, ``.bin``
or ``.safetensors``, as timm saves it), which must fit it completely.

Reference: Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object
Detection" (ViTDet), ECCV 2022; Wightman, timm (github.com/huggingface/pytorch-image-models).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import STAGE_NAMES, STAGE_STRIDES, Backbone, load_weights_file

PREFIX = "timm:"
INSTALL_HINT = "pip install 'kdet[timm]' (or pip install timm)"
PYRAMID_CHANNELS = 256  # ViTDet's channels per pyramid level (fewer when the transformer is narrower)


def import_timm():
    try:
        import timm
    except ImportError:
        raise ValueError(f"model.backbone: timm backbones need the timm package, which is not installed; {INSTALL_HINT}") from None
    return timm


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` map, at every location (ViTDet's norm)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """One ``[N, C, H/p, W/p]`` map (patch size ``p`` of 8, 16 or 32) -> ``c3, c4, c5`` at strides
    8, 16, 32, each with ``out_channels``: x2 transposed convolutions (GELU between two) to go
    finer, 2x2 max-pools to go coarser, then 1x1 conv + LN + 3x3 conv + LN (ViTDet)."""

    def __init__(self, in_channels: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        for stride in STAGE_STRIDES:
            ops: list[nn.Module] = []
            channels = in_channels
            scale = patch
            while scale > stride:  # finer than the patches: transposed convolutions, halving channels
                if ops:
                    ops += [LayerNorm2d(channels), nn.GELU()]
                ops.append(nn.ConvTranspose2d(channels, channels // 2, 2, 2))
                channels //= 2
                scale //= 2
            while scale < stride:
                ops.append(nn.MaxPool2d(2, 2))
                scale *= 2
            ops += [nn.Conv2d(channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.levels.append(nn.Sequential(*ops))

    def forward(self, x: Tensor) -> list[Tensor]:
        return [level(x) for level in self.levels]


class TimmBackbone(Backbone):
    """A timm network cut at its stages of stride 8/16/32 (or a plain ViT through a
    :class:`SimpleFeaturePyramid`). ``image_mean``/``image_std`` are the network's own input
    normalisation (``pretrained_cfg``), which the detector adopts."""

    def __init__(self, name: str, *, input_size: int, pretrained: str | Path | None = None, allow_partial: bool = False,
                 args: dict[str, Any] | None = None) -> None:
        super().__init__()
        timm = import_timm()
        key = f"model.backbone ({PREFIX}{name})"
        if name not in timm.list_models():
            import difflib

            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
            raise ValueError(f"{key}: timm has no model {name!r}.{hint} `python -c \"import timm; print(timm.list_models('vit*'))\"` "
                             f"lists them")
        network = create_network(timm, name, input_size, dict(args or {}), key)
        if pretrained:
            # a timm weights file is the whole classification network: load it before cutting
            load_weights_file(network, pretrained, what=f"model.pretrained_backbone ({PREFIX}{name})", allow_partial=allow_partial)
        info = list(getattr(network, "feature_info", None) or [])
        if not info or not hasattr(network, "forward_intermediates"):
            raise ValueError(f"{key}: this timm model offers no feature extraction (feature_info, forward_intermediates); "
                             f"pick another one")
        reductions = [int(item["reduction"]) for item in info]
        self.plain = len(set(reductions)) == 1
        if self.plain:
            patch = reductions[0]
            if patch not in STAGE_STRIDES:
                raise ValueError(f"{key}: a plain transformer with patches of {patch} px gives a map at stride {patch}; kdet's "
                                 f"simple feature pyramid makes strides 8/16/32 from patch sizes 8, 16 or 32. Pick such a model "
                                 f"(vit_*_patch16_*, vit_*_patch8_*)")
            if input_size % patch:
                raise ValueError(f"{key}: data.input_size {input_size} is not a multiple of the patch size {patch}; use "
                                 f"{max(patch, round(input_size / patch) * patch)}")
            self.indices = [len(info) - 1]
            embed = int(info[-1]["num_chs"])
            self.pyramid = SimpleFeaturePyramid(embed, patch, min(PYRAMID_CHANNELS, embed))
            self.channels = [min(PYRAMID_CHANNELS, embed)] * 3
        else:
            missing = [s for s in STAGE_STRIDES if s not in reductions]
            if missing:
                raise ValueError(f"{key}: the network has no stage of stride {missing} (its stages: strides "
                                 f"{sorted(set(reductions))}); kdet needs strides 8, 16 and 32")
            self.indices = [max(i for i, r in enumerate(reductions) if r == stride) for stride in STAGE_STRIDES]
            self.pyramid = None
            self.channels = [int(info[i]["num_chs"]) for i in self.indices]
        # drop what is never run (the classifier, later blocks) so the weights hold only what is used
        network.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.network = network
        cfg = getattr(network, "pretrained_cfg", None) or {}
        self.image_mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.image_std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self._probe(input_size, key)

    def _probe(self, input_size: int, key: str) -> None:
        """Run the network once at ``input_size``: a size it cannot take fails here, at build
        time, with the config keys to change, not in the first training step."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, 3, input_size, input_size))
        except Exception as error:  # timm raises AssertionError, RuntimeError ... for sizes a model cannot take
            raise ValueError(f"{key} cannot take data.input_size {input_size}: {str(error).rstrip('.')}. Pick an input size the model accepts "
                             f"(windowed transformers need a multiple of patch x window x 8), or another model") from None
        finally:
            self.train(was_training)
        for stride, name in zip(STAGE_STRIDES, STAGE_NAMES):
            expected = -(-input_size // stride)
            got = tuple(out[name].shape[-2:])
            if got != (expected, expected):
                raise ValueError(f"{key}: at data.input_size {input_size} its stage {name} is {got[0]}x{got[1]}, not the "
                                 f"{expected}x{expected} of stride {stride}; use an input size that is a multiple of 32")

    def fix_input_size(self, input_size: int) -> None:
        """Specialise on one input size, for tracing (ONNX export): a transformer that resamples
        its position embeddings at every forward (``dynamic_img_size``, an antialiased bicubic
        interpolation ONNX has no operator for) has them resampled once, here, to the grid of
        ``input_size``; its outputs at that size are unchanged. The position embeddings change
        shape, so this is done on a copy of the model (:func:`kdet.engine.export.for_export`)."""
        if getattr(self.network, "dynamic_img_size", False) and hasattr(self.network, "set_input_size"):
            self.network.set_input_size(img_size=(input_size, input_size))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = self.network.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        if self.pyramid is not None:
            maps = self.pyramid(maps[-1])
        return dict(zip(STAGE_NAMES, maps))


def create_network(timm, name: str, input_size: int, args: dict[str, Any], key: str) -> nn.Module:
    """The timm network, never downloaded. Transformers with position embeddings are built to
    take any size (``dynamic_img_size``, keeping the grid their weights were trained at) or, when
    they cannot, at ``input_size`` (``img_size``); other networks as they are."""
    attempts = [{}] if {"img_size", "dynamic_img_size"} & set(args) else [{"dynamic_img_size": True}, {"img_size": input_size}, {}]
    error: Exception | None = None
    for extra in attempts:
        try:
            return timm.create_model(name, pretrained=False, **{**extra, **args})
        except TypeError as failure:  # the model's constructor does not take that keyword
            error = failure
            if any(word in str(failure) for word in args):
                break
    raise ValueError(f"{key}: timm cannot build it with model.backbone_args {args}: {error}") from None


def build_timm_backbone(name: str, *, input_size: int, pretrained: str | Path | None = None, allow_partial: bool = False,
                        args: dict[str, Any] | None = None) -> TimmBackbone:
    return TimmBackbone(name, input_size=input_size, pretrained=pretrained, allow_partial=allow_partial, args=args)
