"""Faiss IVF-PQ over item vectors: choose nlist / PQ, train once on a sample, add to N shards.

All shards share one trained coarse quantizer and PQ codebooks (trained once, cloned per
shard), so their scores are comparable and the search can merge shard results by score.
Metric: inner product on L2-normalised vectors (= cosine). Ids stored in faiss are the
internal int64 ids (row numbers of the exact-vector file). Exact vectors are kept as fp16
for the refine stage. Source: faiss (Jégou et al., "Product quantization for nearest
neighbor search", TPAMI 2011; IVFADC), parameter rules our choice.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.errors import BuildError

# faiss warns below 39 training points per centroid (kmeans); we respect that minimum.
MIN_POINTS_PER_CENTROID = 39
# Training sample cap: this many points per coarse centroid at most (our choice: enough
# for stable k-means, keeps the 1M build within minutes on 2 cores).
MAX_POINTS_PER_CENTROID = 64
AUTO_FACTORY = "auto"


@dataclass
class IndexPlan:
    """What will be built. ``factory`` is the effective faiss factory string."""

    factory_requested: str
    factory: str
    dim: int
    nlist: int
    pq_m: int | None
    pq_nbits: int | None
    train_size: int
    notes: list[str] = field(default_factory=list)


def choose_nlist(n_items: int) -> int:
    """Number of coarse lists for ``n_items`` vectors (our choice).

    The power of two nearest to ``2 * sqrt(n)`` (in log scale), at most ``n / 39`` (faiss's k-means
    minimum of 39 training points per centroid), at least 1.
    """
    target = max(1.0, 2.0 * math.sqrt(max(n_items, 1)))
    nlist = 2 ** int(round(math.log2(target)))
    cap = max(1, n_items // MIN_POINTS_PER_CENTROID)
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


def _default_pq_m(dim: int) -> int:
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m >= 1 and dim % m == 0:
            return m
    return dim


_IVF = re.compile(r"^IVF(\d*|auto)(?=,|$)")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?")


def plan_index(factory: str, n_items: int, dim: int) -> IndexPlan:
    """Resolve ``factory`` ("auto" = IVF-PQ with m = d/8, or IVF-Flat below 9,984 items;
    "IVF1024,PQ32"; "IVF,PQ32" = choose nlist; "IVF256,Flat")
    for ``n_items`` vectors of dimension ``dim``.

    nlist is chosen by ``choose_nlist`` when the string does not fix it, and lowered when
    it exceeds ``n_items / 39``; PQ bits per code are lowered from 8 when there are fewer
    than ``39 * 256`` training vectors. Every change is recorded in ``notes``.
    Raises BuildError for an unusable string, ``n_items < 1`` or a PQ ``m`` not dividing ``dim``.
    """
    if n_items < 1:
        raise BuildError("no vectors to index")
    notes: list[str] = []
    spec = factory.strip()
    if spec == AUTO_FACTORY:
        if n_items >= MIN_POINTS_PER_CENTROID * 256:
            spec = f"IVF,PQ{_default_pq_m(dim)}"
            notes.append(f"factory 'auto' -> IVF<nlist>,PQ{_default_pq_m(dim)} (PQ m = dim/8, 8-bit codes; our choice)")
        else:
            spec = "IVF,Flat"
            notes.append(f"factory 'auto' -> IVF<nlist>,Flat: {n_items} items are too few to train 8-bit PQ "
                         f"codebooks (faiss wants >= {MIN_POINTS_PER_CENTROID * 256}); our choice")
    match = _IVF.match(spec)
    if not match:
        raise BuildError(f"factory {factory!r}: must start with IVF<nlist> (e.g. 'IVF1024,PQ32' or 'IVF,PQ32')")
    cap = max(1, n_items // MIN_POINTS_PER_CENTROID)
    if match.group(1) in ("", "auto"):
        nlist = choose_nlist(n_items)
        notes.append(f"nlist {nlist} chosen for {n_items} items (power of 2 nearest 2*sqrt(n), <= n/39)")
    else:
        nlist = int(match.group(1))
        if nlist > cap:
            notes.append(f"nlist {nlist} lowered to {cap}: faiss needs >= 39 training points per list")
            nlist = cap
    rest = spec[match.end():]
    pq_m = pq_nbits = None
    pq = _PQ.search(rest)
    if pq:
        pq_m = int(pq.group(1))
        pq_nbits = int(pq.group(2) or 8)
        if dim % pq_m:
            raise BuildError(f"factory {factory!r}: PQ{pq_m} does not divide dim {dim}")
        wanted = pq_nbits
        while pq_nbits > 1 and MIN_POINTS_PER_CENTROID * 2 ** pq_nbits > n_items:
            pq_nbits -= 1
        if pq_nbits != wanted:
            notes.append(f"PQ bits lowered {wanted} -> {pq_nbits}: {n_items} items < 39 * 2^{wanted} training points")
        rest = rest[: pq.start()] + f"PQ{pq_m}x{pq_nbits}" + rest[pq.end():]
    effective = f"IVF{nlist}{rest}"
    train_size = min(n_items, max(MAX_POINTS_PER_CENTROID * nlist, MIN_POINTS_PER_CENTROID * 2 ** (pq_nbits or 0)))
    return IndexPlan(factory, effective, dim, nlist, pq_m, pq_nbits, train_size, notes)


def _gpu_count() -> int:
    try:
        return faiss.get_num_gpus()
    except AttributeError:  # faiss-cpu builds without the symbol
        return 0


def train_index(vectors: np.ndarray, plan: IndexPlan, seed: int = 0) -> faiss.Index:
    """Train an empty IVF index from ``plan`` on a random sample of ``vectors``.

    vectors: float32 (n, d), rows L2-normalised. The coarse k-means runs on the GPU when
    ``faiss.get_num_gpus() > 0`` (faiss's clustering_index), otherwise on CPU threads.
    Returns the trained, empty CPU index (metric inner product).
    """
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n = vectors.shape[0]
    rows = np.sort(rng.choice(n, size=plan.train_size, replace=False)) if plan.train_size < n else np.arange(n)
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # the factory turns it on; minutes of CPU for nothing here
    if _gpu_count() > 0:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(plan.dim))
    index.train(sample)
    ivf.clustering_index = None
    return index


@dataclass
class ShardBuild:
    """One written shard: file name, items, seconds spent adding."""

    file: str
    items: int
    add_s: float


def build_shard(trained: faiss.Index, vectors: np.ndarray, rows: np.ndarray, name: str, out_dir: Path,
                batch_size: int = 65536) -> ShardBuild:
    """The add stage of one shard (both executors; a Ray task in ``indexer.ray_executor``):
    rows ``rows`` (int64) of ``vectors`` (float32 (n, d)) added with faiss ids = row numbers
    to a clone of ``trained``, written to ``out_dir/name``. Returns its ShardBuild."""
    t0 = time.perf_counter()
    index = faiss.clone_index(trained)
    for start in range(0, rows.size, batch_size):
        part = rows[start:start + batch_size]
        index.add_with_ids(np.ascontiguousarray(vectors[part], dtype=np.float32), part)
    faiss.write_index(index, str(out_dir / name))
    return ShardBuild(name, int(rows.size), time.perf_counter() - t0)


def shard_rows(shard_of_row: np.ndarray, n_shards: int) -> list[tuple[str, np.ndarray]]:
    """``[(shard_{s:03d}.faiss, rows int64)]`` for every shard, empty ones included (so the
    shard count is always ``n_shards``)."""
    return [(f"shard_{s:03d}.faiss", np.flatnonzero(shard_of_row == s).astype(np.int64)) for s in range(n_shards)]


def write_shards(trained: faiss.Index, vectors: np.ndarray, shard_of_row: np.ndarray, n_shards: int,
                 out_dir: Path, batch_size: int = 65536) -> list[ShardBuild]:
    """Add ``vectors`` (float32 (n, d)) to ``n_shards`` clones of ``trained`` and write them,
    one after the other in this process (``build_shard``). Row ``i`` goes with faiss id ``i``
    to shard ``shard_of_row[i]`` (int32 (n,)). Returns one ShardBuild per shard."""
    return [build_shard(trained, vectors, rows, name, out_dir, batch_size)
            for name, rows in shard_rows(shard_of_row, n_shards)]


def write_exact_vectors(vectors: np.ndarray, path: Path, chunk_rows: int = 65536) -> None:
    """Write ``vectors`` (float32 (n, d)) as an fp16 ``.npy`` file, chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=vectors.shape)
    for start in range(0, vectors.shape[0], chunk_rows):
        out[start:start + chunk_rows] = vectors[start:start + chunk_rows].astype(np.float16)
    out.flush()
    del out
