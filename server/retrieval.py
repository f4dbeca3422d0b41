"""Dense, lexical and hybrid retrieval of one request, with metadata filters, exact k and a
page window; runs in the server's search thread pool.

- **dense**: the query vector's nearest items (``IndexVersion.search_served``: widened until
  it holds ``min(depth, allowed)`` hits).
- **lexical**: BM25 over titles and attribute values (``IndexVersion.search_lexical``);
  hits are the allowed products sharing a word with the text.
- **dense, two stages** (photo-only queries of a model with an image-private block): the whole
  vector's ``instance_first`` best items, then the ranking of the vector without its image-private
  block (``engine.retrieval.instance_first``; two searches, each widened as above).
- **hybrid**: the dense and the lexical top ``max(depth, HYBRID_MIN_CANDIDATES)`` fused
  (``engine.retrieval.fusion``: reciprocal rank fusion, or weighted min-max scores), cut to
  ``depth``. The dense side alone holds ``min(depth, allowed)`` items, so exact k holds.

The whole ranked list (``depth`` = the request's top_k) is computed for every page and only
the page's window is read from the metadata store, so the pages of one query on one index
version concatenate to the single-request list. Source: our choice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.retrieval.fusion import RRF_K, reciprocal_rank_fusion, weighted_score_fusion
from engine.retrieval.instance_first import merge_instance_first, without_instance
from server.filters import FilteredSearchResult, allowed_ids, dense_served, found_hits

DENSE, LEXICAL, HYBRID = "dense", "lexical", "hybrid"
# each side of a hybrid search contributes at least this many candidates (our choice: RRF
# needs some depth to reward items both rankings place well; 100 keeps the dense side
# within the probed lists of the fashion index at nprobe 4)
HYBRID_MIN_CANDIDATES = 100


@dataclass(frozen=True)
class HybridConfig:
    """Fusion of RETRIEVAL_HYBRID: ``fusion`` "rrf" or "weighted", the two weights (>= 0,
    not both 0) and the RRF constant (>= 1)."""

    fusion: str = "rrf"
    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    rrf_k: int = RRF_K


def query_kind_nprobe(manifest: dict, has_text: bool, has_image: bool) -> int | None:
    """nprobe for a request that names none: the index version's own figure for its kind
    (``index.nprobe_by_query_kind`` of the manifest, "text" / "image" / "text+image", written
    by ``indexer.version``), or None (the version's ``nprobe_default``) when the manifest has no
    figure for it (versions built before it, or with a fixed ``--nprobe``)."""
    kind = "text+image" if has_text and has_image else "text" if has_text else "image"
    value = manifest.get("index", {}).get("nprobe_by_query_kind", {}).get(kind)
    return None if value is None else int(value)


@dataclass(frozen=True)
class SearchJob:
    """What one request searches: an open index version (``IndexVersion``) and its
    ``VersionCache`` (or None), the ranking depth ``top_k``, metadata filters, nprobe (None:
    the index default), the retrieval mode, the query text (lexical and hybrid), the fusion
    options, and the page window: hits ``offset`` to ``offset + count`` (count None: all).
    ``instance``: the query vector's image-private columns when the job is a photo-only query
    ranked in two stages (``engine.retrieval.instance_first``), with ``instance_first`` leading hits."""

    index: Any
    cache: Any
    top_k: int
    filters: tuple = ()
    nprobe: int | None = None
    retrieval: str = DENSE
    text: str | None = None
    hybrid: HybridConfig = HybridConfig()
    offset: int = 0
    count: int | None = None
    instance: tuple[int, int] | None = None
    instance_first: int = 0

    @property
    def dense_depth(self) -> int:
        """How many dense candidates the job needs: top_k, or the hybrid side's depth."""
        return self.top_k if self.retrieval != HYBRID else max(self.top_k, HYBRID_MIN_CANDIDATES)

    @property
    def hybrid_unfiltered(self) -> bool:
        """A hybrid job without filters: its dense side may share one faiss call with others."""
        return self.retrieval == HYBRID and not self.filters

    @property
    def plain(self) -> bool:
        """Dense, unfiltered, whole list: may share one faiss call with others."""
        return (self.retrieval == DENSE and not self.filters and self.offset == 0 and self.count is None
                and not self.two_stage)

    @property
    def two_stage(self) -> bool:
        """A dense photo-only job ranked in two stages (searched on its own)."""
        return self.retrieval == DENSE and self.instance is not None and self.instance_first > 0


def run_job(job: SearchJob, vector: np.ndarray | None, shared: tuple[Any, int, float] | None = None
            ) -> FilteredSearchResult:
    """Search ``job`` with its query vector (``float32 (d,)``; None for lexical retrieval).
    ``shared``: ``(SearchServed, row, search_ms)`` of a dense search already made for this job
    with ``job.dense_depth`` (a hybrid job's dense side searched with others in one faiss call).

    Returns the page's hits and the stage times. Raises the index's errors (e.g.
    ``indexer.errors.SearchArgumentError``, ``indexer.lexical.LexicalUnavailableError``).
    """
    t0 = time.perf_counter()
    allowed = allowed_ids(job.index, job.filters, job.cache)
    metadata_ms = (time.perf_counter() - t0) * 1e3
    depth, side = job.top_k, job.dense_depth
    search_ms = lexical_ms = fusion_ms = 0.0
    dense = None
    lists = []
    if job.retrieval in (DENSE, HYBRID):
        t1 = time.perf_counter()
        if job.two_stage:
            (dense, found), search_ms = _two_stage(job, vector, side, allowed), None
        else:
            served, row, search_ms = shared or (
                job.index.search_served(vector.reshape(1, -1), side, job.nprobe, allowed=allowed, names=False), 0, None)
            dense, keep = dense_served(served, row), served.ids[row] >= 0
            found = served.ids[row][keep], served.scores[row][keep]
        search_ms = (time.perf_counter() - t1) * 1e3 if search_ms is None else search_ms
        lists.append(found)
    if job.retrieval in (LEXICAL, HYBRID):
        t1 = time.perf_counter()
        scores, ids = job.index.search_lexical(job.text, side, allowed)
        lexical_ms = (time.perf_counter() - t1) * 1e3
        lists.append((ids, scores))
    t1 = time.perf_counter()
    ids, scores = _fuse(lists, job.hybrid) if job.retrieval == HYBRID else lists[0]
    ids, scores = ids[:depth], scores[:depth]
    fusion_ms = (time.perf_counter() - t1) * 1e3 if job.retrieval == HYBRID else 0.0
    t1 = time.perf_counter()
    end = len(ids) if job.count is None else job.offset + job.count
    window = ids[job.offset:end]
    hits = found_hits(job.index, job.index.product_ids(window), scores[job.offset:end], job.cache)
    metadata_ms += (time.perf_counter() - t1) * 1e3
    return FilteredSearchResult(hits, search_ms=search_ms, metadata_ms=metadata_ms,
                                allowed_count=None if allowed is None else int(len(allowed)),
                                total_hits=int(len(ids)), lexical_ms=lexical_ms, fusion_ms=fusion_ms, dense=dense)


def _two_stage(job: SearchJob, vector: np.ndarray, depth: int, allowed) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
    """A photo-only job's dense list in two stages (``engine.retrieval.instance_first``): the whole
    vector's ``job.instance_first`` best, then the similar stage's ``depth`` best that are not among them.
    Returns ``(DenseServed of the similar stage, (ids int64, scores float32))``, ``min(depth, allowed)`` hits."""
    q = vector.reshape(1, -1)
    # the instance stage searched as deep as a one-stage query (its refine re-ranks k_factor * depth
    # candidates), so its leading hits are the one-stage list's
    first = job.index.search_served(q, depth, job.nprobe, allowed=allowed, names=False)
    rest = job.index.search_served(without_instance(q, job.instance), depth, job.nprobe, allowed=allowed, names=False)
    found = merge_instance_first(first.ids[0], first.scores[0], rest.ids[0], rest.scores[0], job.instance_first, depth)
    return dense_served(rest, 0), found


def _fuse(lists: list[tuple[np.ndarray, np.ndarray]], config: HybridConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the fused ranking of ``lists`` = [dense, lexical] (each best first)."""
    weights = (config.dense_weight, config.lexical_weight)
    if config.fusion == "weighted":
        return weighted_score_fusion(lists, weights)
    return reciprocal_rank_fusion([ids for ids, _ in lists], weights, config.rrf_k)
