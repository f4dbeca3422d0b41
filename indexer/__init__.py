"""ecsearch indexer: catalogue -> item-tower vectors -> sharded faiss IVF-PQ + LMDB metadata,
published as an immutable index version under ``ROOT/versions/<version>`` with ``ROOT/CURRENT``.

Modules, one job each:

- ``shards``: stable product-id -> shard assignment.
- ``encode``: resumable, chunked item-tower encoding; its stages (plan, decode, encode,
  finish a chunk) are functions both executors call. ``chunk_files``: the resumable chunk files.
- ``ray_executor``: the same stages on Ray (Ray Data encode, parallel Ray tasks); optional.
- ``refine``: where the refine vectors live (fp16 in RAM, fp16 memory-mapped, SQ8, none).
- ``build``: IVF-PQ training on a sample, shard indexes, exact fp16 vectors, ANN recall.
- ``metadata``: LMDB records (internal id <-> product id, product records, facets).
- ``manifest``: manifest.json, file checksums and their verification.
- ``publish``: temporary build folders, atomic publish, CURRENT, keep-last-K, cleanup.
- ``pipeline``: the build job wiring the stages together.
- ``search``: ``open_index`` / ``IndexVersion``, the API the gRPC server uses.
- ``cli``: ``ecsearch index``.
"""

import engine as _engine  # noqa: F401  (sets OMP_WAIT_POLICY before faiss loads)
