"""The runtime that runs the frozen image backbone while photo token caches are built.

Token caches (``engine.tokens.cache``: training's clean photos and augmented views,
evaluation) run the image backbone over thousands of photos in fp32.
PyTorch's eager CPU kernels are slow for EfficientNet-Lite0's depthwise convolutions, ONNX
Runtime's (MLAS) are not: on this host, AVX2 emulated and AMX, batches of 32 real photos,
ORT ran 3.5 to 5x the photos/s of the eager folded channels-last network (figures in
docs/results.md, "Time"). So the cache writer exports the backbone (pixels → tokens, mask)
to ONNX once per build and runs it in ONNX Runtime, after checking it on the first real
photos of the build: every token must agree with PyTorch's within the float16 step of the
stored tokens (``max |Δ| ≤ max |tokens| · 2⁻¹⁰``). Any failure (onnxruntime not installed,
export refused, check failed) falls back to PyTorch with a warning. The runtime does not
enter the cache key: both write the same float16 tokens up to that rounding step.

``ECSEARCH_TOKEN_RUNTIME`` = ``auto`` (default: ONNX Runtime when it passes) | ``torch`` |
``onnxruntime`` (an error instead of the fallback). Source: our choice (issue 11).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

RUNTIME_ENV = "ECSEARCH_TOKEN_RUNTIME"
RUNTIMES = ("auto", "torch", "onnxruntime")
# tokens are stored as float16: 10 mantissa bits
TOLERANCE = 2.0 ** -10

ImageTokenFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class TokenRuntimeError(RuntimeError):
    """ONNX Runtime was asked for (``ECSEARCH_TOKEN_RUNTIME=onnxruntime``) and cannot run the backbone."""


class _Tokens(nn.Module):
    def __init__(self, image: nn.Module):
        super().__init__()
        self.image = image

    def forward(self, pixels: torch.Tensor):
        tokens, mask = self.image.encode(pixels)
        return tokens, mask


class OnnxImageTokens:
    """An ONNX Runtime session of an image backbone's ``encode``: pixels ``float32 (B, 3, S, S)``
    → ``(tokens float32 (B, L, H), mask bool (B, L))``, like ``backbone.encode``."""

    name = "onnxruntime"

    def __init__(self, session, image: nn.Module | None = None):
        self._session = session
        self._image = image  # its ``calls`` counter counts the batches run here too

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._image is not None and hasattr(self._image, "calls"):
            self._image.calls += 1
        feed = {"pixels": np.ascontiguousarray(pixels.detach().float().numpy())}
        tokens, mask = self._session.run(["tokens", "mask"], feed)
        return torch.from_numpy(tokens), torch.from_numpy(mask).bool()


def runtime_choice() -> str:
    """``ECSEARCH_TOKEN_RUNTIME`` (default ``auto``); raises ValueError on another value."""
    choice = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if choice not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV} must be one of {', '.join(RUNTIMES)}, got {choice!r}")
    return choice


def export_image_tokens(image: nn.Module, probe: torch.Tensor, path: str | Path) -> Path:
    """Export ``image.encode`` (fp32) to the ONNX file ``path``: input ``pixels float32 (B, 3, S, S)``,
    outputs ``tokens float32 (B, L, H)`` and ``mask bool (B, L)``; B dynamic. ``probe``: an example batch."""
    from engine.model.tower_onnx import OPSET

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        torch.onnx.export(_Tokens(image).eval(), (probe.detach().clone().contiguous(),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["pixels"], output_names=["tokens", "mask"],
                          dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}, "mask": {0: "batch"}})
    return Path(path)


def check_tokens(reference: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]) -> str | None:
    """None when ``got`` matches ``reference`` (same mask, every token within ``max |ref| · 2⁻¹⁰``),
    else the reason."""
    ref, out = reference[0].float(), got[0].float()
    if ref.shape != out.shape or not torch.equal(reference[1].bool(), got[1].bool()):
        return f"shape or mask differs: {tuple(ref.shape)} vs {tuple(out.shape)}"
    diff, limit = float((ref - out).abs().max()), float(ref.abs().max()) * TOLERANCE
    if not diff <= limit:
        return f"max abs difference {diff:.3g} over the float16 step {limit:.3g}"
    return None


def image_token_encoder(image: nn.Module, probe: torch.Tensor, threads: int | None = None) -> ImageTokenFn:
    """What runs ``image`` (an image backbone with ``encode``) over the batches of a token cache
    build: an ``OnnxImageTokens`` that passed its check on ``probe`` (real preprocessed pixels
    ``float32 (k, 3, S, S)``, k ≥ 1), else ``image.encode`` itself (``.name`` says which).
    ``threads``: ORT intra-op threads (default ``torch.get_num_threads()``).

    Raises:
        TokenRuntimeError: ``ECSEARCH_TOKEN_RUNTIME=onnxruntime`` and ONNX Runtime cannot run it.
        ValueError: a bad ``ECSEARCH_TOKEN_RUNTIME``.
    """
    choice = runtime_choice()
    if choice == "torch" or torch.is_autocast_enabled("cpu"):
        return _torch_encoder(image)
    try:
        return _onnx_encoder(image, probe, threads or torch.get_num_threads())
    except Exception as exc:  # best effort: PyTorch writes the same tokens, slower
        if choice == "onnxruntime":
            raise TokenRuntimeError(f"ONNX Runtime cannot run the image backbone: {exc}") from exc
        log.warning("image tokens run in PyTorch: ONNX Runtime refused (%s)", exc)
        return _torch_encoder(image)


def _torch_encoder(image: nn.Module) -> ImageTokenFn:
    def encode(pixels: torch.Tensor):
        return image.encode(pixels)
    encode.name = "torch"
    return encode


def _onnx_encoder(image: nn.Module, probe: torch.Tensor, threads: int) -> OnnxImageTokens:
    if importlib.util.find_spec("onnxruntime") is None:
        raise TokenRuntimeError("onnxruntime is not installed")
    import onnxruntime as ort

    from engine.model.tower_onnx import session_options

    calls = getattr(image, "calls", None)  # the export's trace and the check are not cache batches
    with tempfile.TemporaryDirectory(prefix="ecsearch-image-tokens-") as folder:
        path = export_image_tokens(image, probe, Path(folder) / "image_tokens.onnx")
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        reason = check_tokens(image.encode(probe), OnnxImageTokens(session)(probe))
    if calls is not None:
        image.calls = calls
    runner = OnnxImageTokens(session, image)
    if reason is not None:
        raise TokenRuntimeError(f"its tokens disagree with PyTorch's on {len(probe)} real photos: {reason}")
    log.info("image tokens run in ONNX Runtime %s (%d threads)", ort.__version__, threads)
    return runner
