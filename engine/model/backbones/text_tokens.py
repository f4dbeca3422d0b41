"""``TextTokens``: a text tokenized ahead of its batch. Its own module so that code which
only checks for it (``engine.model.towers``) does not import transformers. Our choice."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextTokens:
    """A text tokenized ahead of its batch (``HFTextBackbone.pretokenize``): token ids and
    token type ids, special tokens included, truncated, not padded."""

    ids: tuple[int, ...]
    type_ids: tuple[int, ...]
