"""Find, sample by sample, backbone tokens that a token cache already holds (exact-safe reuse).

Cache folders (``engine.tokens.cache``) are keyed by their whole sample list, so a job over
another sample list (the index build over the whole catalogue, after training cached the
train split) cannot find them by key. ``TokenLookup`` scans the complete folders under a
cache root instead and keeps a folder only when its key, recomputed with *this* model's
backbones, equals its name:

- text folder: ``text_cache_key(backbones, meta["keys"])``, i.e. same text backbone
  fingerprint, spec and tokenizer max_length;
- image folder: ``image_cache_key(backbones, meta["files"])``, i.e. same image backbone
  fingerprint, spec and preprocessing; then each image is reused only while its file still
  has the size and mtime it had when cached, or, where the folder recorded content digests
  (``meta["digests"]``), the same size and bytes (a copied or re-synced catalogue keeps its
  cache; a changed photo is encoded again). A folder
  written before ``meta["files"]`` existed is checked with today's size and mtime of all its
  images and used all or nothing.

Only samples that produced tokens are found (an image that failed to decode in the cache is
not found, so the caller's own handling of bad images applies). Non-local images (URIs) are
never reused. Tokens are stored in float16: the item vectors built from them agree with a
fresh encode to cosine >= 0.999 (measured, see ``indexer.token_reuse``). Source: our choice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.tokens.cache import (CACHE_FORMAT, TokenTable, file_digest, file_stat, image_cache_key, open_table,
                                 text_cache_key)

Entry = tuple[TokenTable, int]


class TokenLookup:
    """Token rows of single texts / image paths across the usable cache folders under ``root``.

    Attributes:
        used: names of the folders whose rows can be reused.
        skipped: ``{folder name: reason}`` for complete folders that cannot be (other backbone,
            other preprocessing, images changed since).
    Raises nothing for a missing or empty root (nothing is found); an unreadable folder is skipped.
    """

    def __init__(self, backbones, root: str | Path):
        self.root = Path(root)
        self.used: list[str] = []
        self.skipped: dict[str, str] = {}
        self._texts: dict[str, Entry] = {}
        self._images: dict[str, tuple[TokenTable, int, list | None, str | None]] = {}
        folders = sorted(self.root.glob("*-*/meta.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True) \
            if self.root.is_dir() else []
        for meta_file in folders:
            folder = meta_file.parent
            if folder.name.startswith("."):
                continue
            reason = self._add(backbones, folder)
            if reason is None:
                self.used.append(folder.name)
            else:
                self.skipped[folder.name] = reason

    def _add(self, backbones, folder: Path) -> str | None:
        """Index ``folder``'s rows; returns why it cannot be used, or None."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable meta.json ({exc})"
        kind, name_key = folder.name.split("-", 1)
        if meta.get("format") == CACHE_FORMAT and meta.get("kind") == "image-aug":
            return "augmented photo views, not catalogue tokens (read by the item photo views step)"
        if meta.get("format") != CACHE_FORMAT or meta.get("kind") != kind or kind not in ("text", "image"):
            return f"not a {CACHE_FORMAT} text or image folder"
        if meta.get("fingerprint") != getattr(backbones, f"{kind}_fingerprint"):
            return f"other {kind} backbone (fingerprint differs)"
        keys = list(meta.get("keys", []))
        if kind == "text":
            if text_cache_key(backbones, keys) != name_key:
                return "other text backbone spec or max_length"
            files = None
        else:
            files, digests = meta.get("files"), meta.get("digests") or []
            check = files if files is not None else [file_stat(k) for k in keys]
            if image_cache_key(backbones, check) != name_key:
                return ("other image backbone spec or preprocessing" if files is not None
                        else "other image preprocessing, or images changed since (folder without per-image stats)")
        try:
            table = open_table(folder)
        except (OSError, ValueError) as exc:
            return f"cannot open ({exc})"
        for r, key in enumerate(keys):
            if table.lengths[r] <= 0:
                continue
            if kind == "text":
                self._texts.setdefault(key, (table, r))
            elif files is None or files[r][1] is not None:
                self._images.setdefault(os.path.realpath(key), (table, r, list(files[r]) if files else None,
                                                                digests[r] if r < len(digests) else None))
        return None

    def text(self, text: str | None) -> Entry | None:
        """``(table, row)`` holding the tokens of ``text``, or None."""
        return None if text is None else self._texts.get(text)

    def image(self, path: str | None) -> Entry | None:
        """``(table, row)`` holding the tokens of the image file ``path``, or None (not cached,
        a URI, or the file changed since it was cached: other size, or other mtime and no
        recorded digest or other bytes)."""
        if path is None or "://" in path:
            return None
        real = os.path.realpath(path)
        found = self._images.get(real)
        if found is None:
            return None
        table, row, stat, digest = found
        if stat is not None:
            now = file_stat(stat[0])
            if now[1:] != stat[1:] and (digest is None or now[1] != stat[1] or file_digest(real) != digest):
                return None
        return table, row


def gather_entries(entries: Sequence[Entry | None], hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of B entries from any tables → ``(float32 (B, L, H), mask bool (B, L), present bool (B,))``.

    ``None`` entries are absent (zeros, all-False mask). L is the longest row (at least 1).
    """
    by_table: dict[int, tuple[TokenTable, list[int], list[int]]] = {}
    for i, entry in enumerate(entries):
        if entry is not None:
            table, row = entry
            group = by_table.setdefault(id(table), (table, [], []))
            group[1].append(i)
            group[2].append(row)
    parts = [(idx, table.gather(np.asarray(rows, dtype=np.int64))) for table, idx, rows in by_table.values()]
    width = max([p[1][0].shape[1] for p in parts], default=1)
    tokens = torch.zeros((len(entries), width, hidden_size), dtype=torch.float32)
    mask = torch.zeros((len(entries), width), dtype=torch.bool)
    for idx, (t, m, _present) in parts:
        rows = torch.as_tensor(idx, dtype=torch.long)
        tokens[rows, : t.shape[1]] = t
        mask[rows, : m.shape[1]] = m
    present = torch.tensor([e is not None for e in entries], dtype=torch.bool)
    return tokens, mask, present
