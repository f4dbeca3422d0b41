"""Resumable item-tower encoding of catalogue products, chunk by chunk.

Products are cut into chunks of ``chunk_size`` (in catalogue order). Inside a chunk they
are sorted by (has image, title length) and cut into batches (length-sorted batching, after
sentence-transformers); DataLoader workers decode and preprocess the images of a batch
(``engine.model.images.load_image`` + the image backbone's ``preprocess``), the main process runs
``model.item_tower.encode``. Each finished chunk is written to the work folder (``.npy``
vectors + ``.json`` outcome, temp name + rename), so a killed job resumes at the first
missing chunk.

Outcome per product: encoded (possibly with flags) or rejected. A product whose image is
missing or cannot be decoded is encoded text-only and flagged (``image_missing`` from the
catalogue reader, ``image_unreadable`` here); it is rejected only when nothing usable is
left for the view (e.g. no title and a corrupt image). Source: our choice.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine.catalog import FLAG_IMAGE_MISSING, Product
from engine.model.errors import InputError
from engine.model.images import load_image
from indexer.chunk_files import load_chunk as _load_chunk, save_chunk as _save_chunk
from indexer.item_graphs import use_onnx_graphs
from indexer.photo_views import add_item_views

FLAG_IMAGE_UNREADABLE = "image_unreadable"
FLAG_TEXT_ONLY = "text_only"
FLAG_IMAGE_ONLY = "image_only"
SOURCE_COUNTS = ("texts_from_cache", "images_from_cache", "texts_from_backbones", "images_from_backbones")


@dataclass
class EncodeOptions:
    """view: "fused" | "text" | "image"; batch_size: samples per tower call; chunk_size:
    products per resumable chunk file; workers: DataLoader processes decoding images
    (0 = in the main process); precision: "fp32" or "bf16" (item tower autocast; ~2.4x
    faster on AVX512-BF16 CPUs, cosine to fp32 >= 0.999, measured; "auto" is resolved by
    the pipeline); token_cache: token cache root whose cached backbone tokens are reused
    (``indexer.token_reuse``; None: run the backbones on every product)."""

    view: str = "fused"
    batch_size: int = 32
    chunk_size: int = 1024
    workers: int = 2
    precision: str = "fp32"
    token_cache: str | None = None


@dataclass
class EncodeResult:
    """vectors: float32 (n_indexed, d), rows L2-normalised, in catalogue order of the
    indexed products; indexed: positions (into the input products) of those rows;
    flags / flag_detail: per input position; rejects: ``{position: reason}``;
    resumed_items: products taken from chunks written by an earlier run; sources: how many
    titles / photos of the indexed products came from the token cache or the backbones
    (``{texts,images}_from_{cache,backbones}``, summed over chunks, resumed ones included);
    cached_seconds: time spent encoding from cached tokens (part of the encode stage)."""

    vectors: np.ndarray
    indexed: list[int]
    flags: dict[int, list[str]] = field(default_factory=dict)
    flag_detail: dict[int, dict[str, str]] = field(default_factory=dict)
    rejects: dict[int, str] = field(default_factory=dict)
    resumed_items: int = 0
    sources: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCE_COUNTS, 0))
    cached_seconds: float = 0.0
    item_views: dict = field(default_factory=dict)


class _BatchImages(Dataset):
    """Dataset whose item ``b`` is batch ``b``: decodes + preprocesses its images.

    Returns ``(batch_number, positions, tensors | None per product, errors | None per product)``.
    """

    def __init__(self, batches: list[list[int]], images: Sequence[str | None], preprocess: Callable):
        self.batches = batches
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        tensors, errors = decode_batch(self.batches[b], self.images, self.preprocess)
        return b, self.batches[b], tensors, errors


def decode_batch(positions: Sequence[int], images: Sequence[str | None], preprocess: Callable
                 ) -> tuple[list, list[str | None]]:
    """The decode stage of one batch (both executors): ``images[pos]`` of each position decoded
    (``engine.model.images.load_image``) and preprocessed. Returns ``(tensors, errors)``, one
    entry per position: a tensor and None, or None and the reason it could not be decoded
    (None, None when the product has no image). Never raises for a bad image."""
    tensors, errors = [], []
    for pos in positions:
        source = images[pos]
        if source is None:
            tensors.append(None)
            errors.append(None)
            continue
        try:
            tensors.append(preprocess(load_image(source, index=pos)))
            errors.append(None)
        except InputError as exc:
            tensors.append(None)
            errors.append(exc.reason)
        except Exception as exc:  # any other decoder failure: flag, never lose the product
            tensors.append(None)
            errors.append(f"{type(exc).__name__}: {exc}")
    return tensors, errors


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _identity(x):
    return x


def _usable(product: Product, view: str) -> tuple[str | None, str | None, str | None]:
    """(text, image, reject reason) for ``view`` before decoding."""
    text = product.title if view in ("fused", "text") else None
    image = product.image if view in ("fused", "image") else None
    if text is None and image is None:
        need = {"fused": "title or image", "text": "title (view text)", "image": "image (view image)"}[view]
        detail = product.flag_detail.get(FLAG_IMAGE_MISSING)
        return None, None, f"no usable {need}" + (f" ({detail})" if detail else "")
    return text, image, None


def encode_products(model, products: Sequence[Product], work: Path, options: EncodeOptions,
                    log: Callable[[str], None] = print, encode_chunks: Callable | None = None) -> EncodeResult:
    """Encode ``products`` with ``model.item_tower`` into ``work`` (created), resuming chunks.

    encode_chunks: the executor of the chunks still to encode, ``f(model, products, inputs,
    todo [(start, count)], options, log) -> iterator of (start, vectors, info)`` (default:
    ``encode_chunks_local``, this process; ``indexer.ray_executor`` runs them on Ray). Each
    chunk is saved to ``work`` as it arrives. Returns EncodeResult (vectors float32
    (n_indexed, d)). Raises ValueError for an unknown view.
    """
    if options.view not in ("fused", "text", "image"):
        raise ValueError(f"unknown view {options.view!r}; expected fused, text or image")
    work.mkdir(parents=True, exist_ok=True)
    dim = int(model.dim)
    n = len(products)
    result = EncodeResult(np.empty((0, dim), np.float32), [])
    chunk_vecs: dict[int, np.ndarray] = {}
    todo_chunks = []
    for start in range(0, n, options.chunk_size):
        count = min(options.chunk_size, n - start)
        loaded = _load_chunk(work, start, count, dim)
        if loaded is None:
            todo_chunks.append((start, count))
            continue
        vecs, info = loaded
        chunk_vecs[start] = vecs
        _merge_chunk_info(result, info)
        result.resumed_items += count
    if result.resumed_items:
        log(f"encode: resuming, {result.resumed_items} of {n} products already encoded in {work}")
    inputs = product_inputs(products, options.view)
    for start, vecs, info in (encode_chunks or encode_chunks_local)(model, products, inputs, todo_chunks, options,
                                                                    log):
        _save_chunk(work, start, vecs, info)
        chunk_vecs[start] = vecs
        _merge_chunk_info(result, info)

    keep = np.ones(n, dtype=bool)
    keep[list(result.rejects)] = False
    all_vecs = np.concatenate([chunk_vecs[s] for s in sorted(chunk_vecs)]) if chunk_vecs else \
        np.empty((0, dim), np.float32)
    result.vectors = np.ascontiguousarray(all_vecs[keep], dtype=np.float32)
    result.indexed = np.flatnonzero(keep).tolist()
    if options.view != "text":  # the model's item photo views, on the rows encoded with a photo
        no_photo = {FLAG_IMAGE_MISSING, FLAG_IMAGE_UNREADABLE}
        add_item_views(model, [products[pos].image if products[pos].image and not no_photo & set(result.flags.get(pos, []))
                               else None for pos in result.indexed], result, options.token_cache, log)
    return result


def product_inputs(products: Sequence[Product], view: str) -> tuple[list[str | None], list[str | None]]:
    """``(texts, images)``: per product, the title and image source the ``view`` uses (None = absent)."""
    texts: list[str | None] = [None] * len(products)
    images: list[str | None] = [None] * len(products)
    for pos, p in enumerate(products):
        texts[pos], images[pos], _ = _usable(p, view)
    return texts, images


def encode_chunks_local(model, products, inputs, todo_chunks, options: EncodeOptions, log):
    """The local executor of the encode stage: chunk by chunk in this process, DataLoader
    workers decoding images. Yields ``(start, float32 (count, d), chunk info)``."""
    texts, images = inputs
    preprocess = model.backbones.image.preprocess
    reuse = _open_reuse(model, options, log) if todo_chunks else None
    done = sum(1 for _ in products) - sum(count for _, count in todo_chunks)
    bar = tqdm(total=len(products), initial=done, unit="item", desc="encode", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    graphs = None  # built when a chunk first needs the backbones (indexer.item_graphs)
    try:
        for start, count in todo_chunks:
            plan = plan_chunk(products, texts, images, start, count, options, reuse)
            bar.update(count - sum(len(b) for b in plan.batches))
            if plan.batches and graphs is None:
                graphs = use_onnx_graphs(model, options.view, options.precision, options.token_cache, log)
            loader = DataLoader(_BatchImages(plan.batches, images, preprocess), batch_size=None, shuffle=False,
                                num_workers=options.workers, collate_fn=_identity, worker_init_fn=_worker_init,
                                prefetch_factor=2 if options.workers else None,
                                persistent_workers=False) if plan.batches else []
            for _b, batch, tensors, errors in loader:
                plan.merge(encode_batch(model, batch, [texts[pos] for pos in batch], tensors, errors, options))
                bar.update(len(batch))
            yield (start, *finish_chunk(plan, texts, images, options.view, int(model.dim)))
    finally:
        bar.close()


def _merge_chunk_info(result: EncodeResult, info: dict) -> None:
    result.rejects.update({int(k): v for k, v in info["rejects"].items()})
    result.flags.update({int(k): v for k, v in info["flags"].items()})
    result.flag_detail.update({int(k): v for k, v in info["detail"].items()})
    for name, value in info.get("sources", {}).items():
        result.sources[name] = result.sources.get(name, 0) + int(value)
    result.cached_seconds += float(info.get("cached_seconds", 0.0))


def _open_reuse(model, options: EncodeOptions, log: Callable[[str], None]):
    """``TokenReuse`` over ``options.token_cache``, or None when no cache is given."""
    if options.token_cache is None:
        return None
    from indexer.token_reuse import TokenReuse

    start = time.perf_counter()
    reuse = TokenReuse(model, options.token_cache, options.precision)
    skipped = "; ".join(f"{name}: {why}" for name, why in reuse.lookup.skipped.items())
    log(f"token cache {options.token_cache}: reusing {reuse.lookup.used or 'no folder'}"
        + (f"; skipped {skipped}" if skipped else "") + f" (scanned in {time.perf_counter() - start:.1f} s)")
    return reuse


@dataclass
class ChunkPlan:
    """One chunk ``[start, start+count)`` being encoded: ``batches`` (positions, length-sorted,
    those the token cache did not answer), the outcome so far (rejects, flags, detail per
    position), ``vectors`` found so far ``{position: float32 (d,)}`` and the token-cache part
    (``cached`` positions, ``cached_seconds``)."""

    start: int
    count: int
    batches: list[list[int]]
    rejects: dict[int, str]
    flags: dict[int, list[str]]
    detail: dict[int, dict[str, str]]
    vectors: dict[int, np.ndarray]
    cached: set[int] = field(default_factory=set)
    cached_seconds: float = 0.0

    def merge(self, outcome: "BatchOutcome") -> None:
        """Add one encoded batch's outcome (``encode_batch``)."""
        self.vectors.update(outcome.vectors)
        self.rejects.update(outcome.rejects)
        for pos, new in outcome.flags.items():
            self.flags.setdefault(pos, []).extend(new)
        for pos, new in outcome.detail.items():
            self.detail.setdefault(pos, {}).update(new)


@dataclass
class BatchOutcome:
    """What encoding one batch produced: ``vectors {position: float32 (d,)}`` and the rejects,
    flags and flag details it added."""

    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    rejects: dict[int, str] = field(default_factory=dict)
    flags: dict[int, list[str]] = field(default_factory=dict)
    detail: dict[int, dict[str, str]] = field(default_factory=dict)


def plan_chunk(products, texts, images, start: int, count: int, options: EncodeOptions, reuse=None) -> ChunkPlan:
    """The plan stage of one chunk (both executors): reject products with nothing usable,
    encode those whose tokens ``reuse`` finds in the token cache, sort the others by (has
    image, title length) and cut them into batches of ``options.batch_size`` (length-sorted
    batching, after sentence-transformers)."""
    positions = list(range(start, start + count))
    rejects = {pos: _usable(products[pos], options.view)[2] for pos in positions
               if texts[pos] is None and images[pos] is None}
    flags = {pos: list(products[pos].flags) for pos in positions if products[pos].flags}
    detail = {pos: dict(products[pos].flag_detail) for pos in positions if products[pos].flag_detail}
    live = [pos for pos in positions if pos not in rejects]
    live.sort(key=lambda pos: (images[pos] is not None, len(texts[pos] or "")))
    t_cached = time.perf_counter()
    cached = reuse.encode(live, texts, images, options.batch_size) if reuse is not None else {}
    t_cached = time.perf_counter() - t_cached
    live = [pos for pos in live if pos not in cached]
    batches = [live[i:i + options.batch_size] for i in range(0, len(live), options.batch_size)]
    return ChunkPlan(start, count, batches, rejects, flags, detail, dict(cached), set(cached), t_cached)


def encode_batch(model, batch: list[int], texts: list[str | None], tensors: list, errors: list[str | None],
                 options: EncodeOptions) -> BatchOutcome:
    """The encode stage of one decoded batch (both executors): ``texts`` / ``tensors`` /
    ``errors`` per position of ``batch`` (``decode_batch``). An undecodable image is flagged
    ``image_unreadable``; a product left with nothing usable is rejected. Returns its
    BatchOutcome (vectors float32 (d,) per encoded position)."""
    out = BatchOutcome()
    for j, pos in enumerate(batch):
        if errors[j] is not None:
            out.flags.setdefault(pos, []).append(FLAG_IMAGE_UNREADABLE)
            out.detail.setdefault(pos, {})[FLAG_IMAGE_UNREADABLE] = errors[j]
    keep = [j for j in range(len(batch)) if texts[j] is not None or tensors[j] is not None]
    for j, pos in enumerate(batch):
        if j not in keep:
            lack = "no usable title and the image" if options.view == "fused" else "the image (view image)"
            out.rejects[pos] = f"{lack} cannot be used ({errors[j]})"
    vecs = _encode_robust(model, [texts[j] for j in keep], [tensors[j] for j in keep], [batch[j] for j in keep],
                          options, out.rejects, out.flags, out.detail)
    out.vectors = {pos: vec for pos, vec in vecs.items() if pos not in out.rejects}
    return out


def finish_chunk(plan: ChunkPlan, texts, images, view: str, dim: int) -> tuple[np.ndarray, dict]:
    """The end of one chunk (both executors): ``(float32 (count, d) with zero rows for
    rejects, chunk info dict)`` as ``_save_chunk`` writes them."""
    vecs = np.zeros((plan.count, dim), dtype=np.float32)
    for pos, vec in plan.vectors.items():
        if pos not in plan.rejects:
            vecs[pos - plan.start] = vec
    positions = range(plan.start, plan.start + plan.count)
    sources = _finish_flags(positions, texts, images, view, plan.rejects, plan.flags, plan.cached)
    info = {"start": plan.start, "count": plan.count, "view": view,
            "rejects": {str(k): v for k, v in plan.rejects.items()},
            "flags": {str(k): v for k, v in plan.flags.items()},
            "detail": {str(k): v for k, v in plan.detail.items()}, "sources": sources,
            "cached_seconds": plan.cached_seconds}
    return vecs, info


def _finish_flags(positions, texts, images, view: str, rejects: dict, flags: dict, cached: set) -> dict[str, int]:
    """Add the text-only / image-only flags of the indexed products; returns their source counts."""
    sources = dict.fromkeys(SOURCE_COUNTS, 0)
    for pos in positions:
        if pos in rejects:
            continue
        has_text = texts[pos] is not None and view != "image"
        has_image = images[pos] is not None and FLAG_IMAGE_UNREADABLE not in flags.get(pos, [])
        if view == "fused" and has_text and not has_image:
            flags.setdefault(pos, []).append(FLAG_TEXT_ONLY)
        elif view == "fused" and has_image and not has_text:
            flags.setdefault(pos, []).append(FLAG_IMAGE_ONLY)
        where = "cache" if pos in cached else "backbones"
        sources[f"texts_from_{where}"] += has_text
        sources[f"images_from_{where}"] += has_image
    return sources


def _encode_robust(model, texts: list, images: list, positions: list[int], options: EncodeOptions,
                   rejects: dict, flags: dict, detail: dict) -> dict[int, np.ndarray]:
    """``item_tower.encode`` on one batch; a per-sample InputError drops that sample's
    image (flagged) or rejects it, and the batch is retried. Returns ``{position: vector}``."""
    texts, images, positions = list(texts), list(images), list(positions)
    for _attempt in range(2 * len(positions) + 1):
        if not positions:
            return {}
        try:
            out = model.item_tower.encode(texts, images, view=options.view, batch_size=options.batch_size,
                                          precision=options.precision)
            return {pos: out[j] for j, pos in enumerate(positions)}
        except InputError as exc:
            j = exc.index
            if j is None or not 0 <= j < len(positions):
                raise
            pos = positions[j]
            if images[j] is not None and texts[j] is not None and options.view == "fused":
                images[j] = None
                flags.setdefault(pos, []).append(FLAG_IMAGE_UNREADABLE)
                detail.setdefault(pos, {})[FLAG_IMAGE_UNREADABLE] = exc.reason
            else:
                rejects[pos] = f"item tower cannot encode this product: {exc.reason}"
                del texts[j], images[j], positions[j]
    raise RuntimeError("encode retry loop did not converge")  # unreachable: each retry removes a cause
