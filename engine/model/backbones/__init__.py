"""Frozen backbones that turn raw text / pixels into token sequences with masks.

Both kinds return ``(tokens float32 (B, L, H), mask bool (B, L))`` (METHOD.md §1.1).
Everything is loaded from local paths; ``pkg:<module>/<relative path>`` names a file or
folder shipped inside an installed Python package (the default weights), so model folders
stay portable across machines.
"""
from engine.model.backbones.registry import Backbones, build_backbones, resolve_path, DEFAULT_TEXT_BACKBONE, DEFAULT_IMAGE_BACKBONE

__all__ = ["Backbones", "build_backbones", "resolve_path", "DEFAULT_TEXT_BACKBONE", "DEFAULT_IMAGE_BACKBONE"]
