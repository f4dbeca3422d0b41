"""Backbone token cache: run the frozen backbones once, keep their token outputs on disk.

With frozen backbones (METHOD.md §3: "cache backbone token outputs once (fp16), train
projections and fusion on the cache"), every epoch and every later run (training,
evaluation) reads the tokens from memory-mapped ``.npy`` files instead of running MiniLM /
EfficientNet again. Layout of one cache folder (our choice)::

    <cache_root>/<kind>-<key>/tokens.npy    float16 (N, L, H), row r = sample r, left-aligned
                              lengths.npy   int32 (N,): real tokens of row r (0: no tokens)
                              meta.json     format, kind, fingerprint, keys, errors, timings

``key`` is a sha256 over the backbone fingerprint (content hash of its weights), the
preprocessing (text: tokenizer max_length; image: ``ImagePreprocessor.as_dict()``) and the
sample list (texts themselves; image paths with size and mtime), so a changed backbone,
preprocessing or catalogue gets a new folder and a stale cache is never read. An image folder's
``meta.json`` also holds each file's stat and content digest, so that a later job can reuse its
rows one by one (``engine.tokens.lookup``). Folders are
built under a temporary name and renamed when complete.

Also here: gathering a batch of cached rows into tensors (``TokenTable.gather``) and running
a tower on them view by view (``encode_views``), the one place training and evaluation turn
cached tokens into embeddings.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.model.errors import InputError
from engine.model.images import load_image
from engine.tokens.image_runtime import image_token_encoder

CACHE_FORMAT = "ecsearch-token-cache/1"


@dataclass
class TokenTable:
    """One cached modality for N samples (memory-mapped, read-only).

    keys: sample keys (the text itself, or the image path), row ``r`` = ``keys[r]``.
    tokens: ``float16 (N, L, H)`` memmap, tokens left-aligned; lengths: ``int32 (N,)``.
    errors: ``{key: reason}`` for samples that produced no tokens (missing / corrupt image).
    meta: the folder's ``meta.json``.
    """

    folder: Path
    keys: list[str]
    tokens: np.ndarray
    lengths: np.ndarray
    errors: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rows = {k: i for i, k in enumerate(self.keys)}

    @property
    def hidden_size(self) -> int:
        return int(self.tokens.shape[2])

    def row(self, key: str) -> int:
        """Row of ``key``, or ``-1`` when the key is unknown or produced no tokens."""
        r = self._rows.get(key, -1)
        return r if r >= 0 and self.lengths[r] > 0 else -1

    def rows(self, keys: Sequence[str | None]) -> np.ndarray:
        """``int64 (n,)`` rows of ``keys`` (``None`` / unknown / failed → ``-1``)."""
        return np.array([-1 if k is None else self.row(k) for k in keys], dtype=np.int64)

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens of ``rows`` (``-1``: none) → ``(tokens float32 (B, L, H), mask bool (B, L), present bool (B,))``.

        L is the longest row in the batch (at least 1); absent rows are zeros with an
        all-False mask.
        """
        rows = np.asarray(rows, dtype=np.int64)
        present = rows >= 0
        lengths = np.where(present, self.lengths[np.where(present, rows, 0)], 0)
        width = max(int(lengths.max(initial=0)), 1)
        out = np.zeros((len(rows), width, self.hidden_size), dtype=np.float32)
        idx = np.nonzero(present)[0]
        if len(idx):
            order = np.argsort(rows[idx], kind="stable")  # sorted reads are kinder to the page cache
            src = rows[idx][order]
            out[idx[order]] = self.tokens[src, :width].astype(np.float32)
        mask = np.arange(width)[None, :] < lengths[:, None]
        return torch.from_numpy(out), torch.from_numpy(mask), torch.from_numpy(present)


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def text_cache_key(backbones, keys: Sequence[str]) -> str:
    """Folder key of a text cache: sha256 (24 hex) over the text backbone's fingerprint, spec,
    tokenizer max_length and the distinct texts ``keys`` in order."""
    return _digest({"format": CACHE_FORMAT, "fp": backbones.text_fingerprint, "spec": backbones.text_spec,
                    "max_length": getattr(backbones.text, "max_length", None), "texts": list(keys)})


def image_cache_key(backbones, files: Sequence[list]) -> str:
    """Folder key of an image cache: sha256 (24 hex) over the image backbone's fingerprint, spec,
    preprocessing (``as_dict()``) and ``files``: ``[path, size, mtime_ns]`` per distinct image
    (``file_stat``; stored as ``meta["files"]`` so a reader can check each image on its own)."""
    pre = backbones.image.preprocess
    pre = pre.as_dict() if hasattr(pre, "as_dict") else repr(pre)
    return _digest({"format": CACHE_FORMAT, "fp": backbones.image_fingerprint, "spec": backbones.image_spec,
                    "preprocess": pre, "files": [list(f) for f in files]})


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def open_table(folder: Path) -> TokenTable:
    """Open a complete cache folder read-only (memory-mapped). Raises FileNotFoundError, ValueError."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{folder}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    lengths = np.load(folder / "lengths.npy")
    return TokenTable(folder, list(meta["keys"]), tokens, lengths, dict(meta.get("errors", {})), meta)


def _finish(tmp: Path, final: Path, meta: dict) -> TokenTable:
    (tmp / "meta.json").write_text(json.dumps(meta))
    if final.exists():  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return open_table(final)


def cache_texts(backbones, texts: Sequence[str], cache_root: str | Path, *, batch_size: int = 256,
                progress: bool = True) -> TokenTable:
    """Text tokens of every distinct string in ``texts``, from the cache or by running the text backbone once.

    backbones: ``engine.model.backbones.Backbones`` (``.text``, ``.text_fingerprint``, ``.text_spec``).
    texts: non-blank strings (duplicates share a row). Returns a ``TokenTable`` keyed by text.
    Raises ValueError on a blank text (callers reject those first).
    """
    keys = _unique(texts)
    for t in keys:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"cannot cache a blank text: {t!r}")
    text = backbones.text
    key = text_cache_key(backbones, keys)
    final = Path(cache_root) / f"text-{key}"
    if (final / "meta.json").is_file():
        return open_table(final)
    tmp = _fresh_tmp(final)
    start = time.perf_counter()
    lengths = np.asarray(text.token_lengths(keys) if keys else [], dtype=np.int32)
    width = max(int(lengths.max(initial=0)), 1)
    tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16,
                                       shape=(len(keys), width, text.hidden_size))
    order = np.argsort(lengths, kind="stable")  # length-sorted batches: less padding
    with tqdm(total=len(keys), unit="item", desc="text tokens", disable=not progress) as bar, torch.inference_mode():
        for s in range(0, len(keys), batch_size):
            idx = order[s:s + batch_size]
            out, mask = text.encode([keys[i] for i in idx])
            got = mask.sum(dim=1).cpu().numpy()
            _check_prefix_mask(mask)
            n = out.shape[1]
            tokens[idx, :n] = out.cpu().numpy().astype(np.float16)
            lengths[idx] = got
            bar.update(len(idx))
    tokens.flush()
    del tokens
    np.save(tmp / "lengths.npy", lengths)
    elapsed = time.perf_counter() - start
    meta = {"format": CACHE_FORMAT, "kind": "text", "fingerprint": backbones.text_fingerprint, "keys": keys,
            "errors": {}, "build_seconds": elapsed, "items_per_s": len(keys) / elapsed if elapsed else None}
    return _finish(tmp, final, meta)


def start_image_cache(final: Path, n: int) -> tuple[Path, float, dict[str, str], np.ndarray]:
    """A fresh build folder for the ``n``-row image cache ``final``: ``(tmp folder, start time
    (perf_counter s), errors {key: reason}, lengths int32 (n,))``."""
    return _fresh_tmp(final), time.perf_counter(), {}, np.zeros(n, dtype=np.int32)


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _check_prefix_mask(mask: torch.Tensor) -> None:
    lengths = mask.sum(dim=1, keepdim=True)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths
    if not torch.equal(mask.bool(), expected):
        raise ValueError("backbone mask is not left-aligned; the token cache stores lengths only")


def file_digest(path: str) -> str | None:
    """blake2b-128 (hex) of a file's bytes, or None when it cannot be read. Stored per image in
    ``meta["digests"]``, it lets a cached row outlive a changed mtime while the bytes are the
    same (a copied or re-synced catalogue; ``engine.tokens.lookup``). Our choice: 11,882 fashion
    photos (120 MB) hash in about half a second, a small part of decoding them."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except OSError:
        return None


def file_stat(path: str) -> list:
    """``[path, size in bytes, mtime_ns]`` of a file, or ``[path, None, error name]`` when it cannot be stat'ed."""
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError as exc:
        return [path, None, type(exc).__name__]


def cache_images(backbones, paths: Sequence[str], cache_root: str | Path, *, batch_size: int = 32,
                 progress: bool = True) -> TokenTable:
    """Image tokens of every distinct image path, from the cache or by running the image backbone once.

    backbones: ``engine.model.backbones.Backbones`` (``.image`` with ``preprocess`` / ``encode``,
    ``.image_fingerprint``). Images that cannot be used (missing, corrupt, too large) get no
    tokens (``row() == -1``) and their reason in ``TokenTable.errors``; the rest is cached.
    Decoding runs in a helper thread, overlapping the backbone (our choice).
    """
    keys = _unique([str(p) for p in paths])
    image = backbones.image
    files = [file_stat(p) for p in keys]
    key = image_cache_key(backbones, files)
    final = Path(cache_root) / f"image-{key}"
    if (final / "meta.json").is_file():
        return open_table(final)
    tmp, start, errors, lengths = start_image_cache(final, len(keys))
    tokens, todo = _reuse_image_rows(Path(cache_root), backbones, keys, tmp, lengths)
    load = lambda batch: _load_batch(image, keys, batch, errors)  # noqa: E731
    write_image_tokens(image, load, todo, len(keys), tmp, lengths, tokens, batch_size=batch_size,
                       desc="image tokens", unit="item", progress=progress)
    del tokens  # the memmap of the copied rows, flushed by write_image_tokens
    np.save(tmp / "lengths.npy", lengths)
    elapsed = time.perf_counter() - start
    meta = {"format": CACHE_FORMAT, "kind": "image", "fingerprint": backbones.image_fingerprint, "keys": keys,
            "files": files, "digests": [file_digest(k) if f[1] is not None else None for k, f in zip(keys, files)],
            "errors": errors, "build_seconds": elapsed, "items_per_s": len(keys) / elapsed if elapsed else None}
    return _finish(tmp, final, meta)


def write_image_tokens(image, load, todo: list[int], n: int, tmp: Path, lengths: np.ndarray,
                       tokens: np.ndarray | None, *, batch_size: int, desc: str, unit: str,
                       progress: bool) -> None:
    """Run the image backbone over rows ``todo`` of an ``n``-row cache being built in ``tmp`` and
    write ``tmp/tokens.npy`` (``float16 (n, L, H)``, memmap; ``tokens`` when rows were already
    copied in) and ``lengths``. ``load(batch) -> (ok rows, pixels (k, 3, S, S) | None)`` decodes
    a batch; it runs in a helper thread one batch ahead, overlapping the backbone (our choice).
    The backbone runs in ONNX Runtime where its tokens match PyTorch's on the first batch
    (``engine.tokens.image_runtime``). Rows that ``load`` leaves out keep length 0 (no tokens)."""
    with tqdm(total=n, initial=n - len(todo), unit=unit, desc=desc, disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
        batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
        encode = None
        pending = pool.submit(load, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            ok, pixels = pending.result()
            pending = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
            if pixels is not None:
                if encode is None:  # ONNX Runtime where it matches PyTorch (engine.tokens.image_runtime)
                    encode = image_token_encoder(image, pixels[:2])
                out, mask = encode(pixels)
                _check_prefix_mask(mask)
                if tokens is None:
                    tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16,
                                                       shape=(n, out.shape[1], out.shape[2]))
                tokens[ok] = out.cpu().numpy().astype(np.float16)
                lengths[ok] = mask.sum(dim=1).cpu().numpy()
            bar.update(len(batch))
    if tokens is None:  # no image could be used at all: an empty (n, 1, H) table
        tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16,
                                           shape=(n, 1, int(getattr(image, "hidden_size", 1))))
    tokens.flush()


def _reuse_image_rows(root: Path, backbones, keys: list[str], tmp: Path,
                      lengths: np.ndarray) -> tuple[np.ndarray | None, list[int]]:
    """Copy the rows of ``keys`` that finished image caches under ``root`` already hold, found
    by ``engine.tokens.lookup.TokenLookup`` (same backbone and preprocessing, file unchanged;
    our choice: the whole-catalogue cache of ``ecsearch eval --robust`` reuses the split
    caches). Fills ``lengths``; returns ``(tokens memmap or None, indices still to encode)``.
    Images that failed in the other caches are not copied: they are tried again."""
    from engine.tokens.lookup import TokenLookup  # lookup reads this module's folders

    lookup = TokenLookup(backbones, root)
    tokens, todo = None, []
    for i, key in enumerate(keys):
        found = lookup.image(key)
        if found is not None and tokens is None:
            tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16,
                                               shape=(len(keys),) + found[0].tokens.shape[1:])
        if found is None or found[0].tokens.shape[1:] != tokens.shape[1:]:
            todo.append(i)
            continue
        table, row = found
        tokens[i], lengths[i] = table.tokens[row], table.lengths[row]
    return tokens, todo


def _load_batch(image, keys: list[str], batch: list[int], errors: dict[str, str]):
    """Decode + preprocess one batch; returns ``(ok indices, pixels (n, 3, S, S) | None)``."""
    ok, pixels = [], []
    for i in batch:
        try:
            pixels.append(image.preprocess(load_image(keys[i], index=i)))
            ok.append(i)
        except InputError as exc:
            errors[keys[i]] = exc.reason
        except OSError as exc:  # e.g. permission denied
            errors[keys[i]] = f"cannot read image: {exc}"
    return ok, (torch.stack(pixels) if pixels else None)


# ----------------------------------------------------------------------------- views
