"""Errors raised by the engine for bad input, each naming the sample it is about.

Every per-sample error is an ``InputError`` (a ``ValueError``) carrying ``.index``, the
position of the offending sample in the call's input lists, so callers (the indexer's
rejects report, the server's gRPC status detail) can say exactly which sample failed.
Source: our choice.
"""
from __future__ import annotations


class InputError(ValueError):
    """A sample cannot be encoded. ``index`` is its position in the input lists (or None)."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        self.reason = message
        super().__init__(f"sample {index}: {message}" if index is not None else message)


class EmptySampleError(InputError):
    """The sample has neither text nor image (or lacks the modality its view needs)."""


class BlankTextError(InputError):
    """The sample's text is empty or whitespace only."""


class ImageDecodeError(InputError):
    """The sample's image is missing, unreadable, truncated, or not an image."""


class ImageTooLargeError(InputError):
    """The sample's image exceeds the pixel limit (decompression-bomb guard)."""


class ModelFolderError(RuntimeError):
    """A model folder is missing, incomplete, corrupt, or its backbones changed."""
