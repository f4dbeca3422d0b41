"""``metadata.lmdb`` of an incremental version, copying the base's unchanged records as bytes.

Same layout as ``indexer.metadata.write_metadata`` (see there). An unchanged record is copied
from the base's ``records`` sub-database without decoding it (its ``shard`` field stays right:
the shard count and the product id are unchanged), and its facet entries are the base's,
renumbered; only new and changed records are JSON-encoded. At 1M products this avoids
decoding and re-encoding a million JSON records (about 30 s on 2 busy cores, measured).
Source: our choice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexer.metadata import _DBS, SCHEMA, MetadataReader, facet_key, iid_key, open_new


def _encoded(record: dict[str, Any], shard: int) -> bytes:
    return json.dumps({**record, "shard": int(shard)}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _facets(base: MetadataReader, old_to_new: np.ndarray, records: Sequence[dict[str, Any] | None]
            ) -> dict[bytes, np.ndarray]:
    """Facet lists of the new version: the base's entries renumbered (``old_to_new``: -1 for
    rows not copied as bytes), plus the attributes of the given records; sorted int64 ids."""
    facets: dict[bytes, list[np.ndarray]] = {}
    with base._env.begin() as txn:
        for key, blob in txn.cursor(db=base._dbs[b"facets"]):
            ids = old_to_new[np.frombuffer(blob, dtype="<i8")]
            if (ids >= 0).any():
                facets.setdefault(bytes(key), []).append(ids[ids >= 0])
    for iid, record in enumerate(records):
        if record is None:
            continue
        for attr, value in (record.get("attributes") or {}).items():
            facets.setdefault(facet_key(attr, str(value)), []).append(np.asarray([iid], np.int64))
    return {key: np.sort(np.concatenate(parts)) for key, parts in facets.items()}


def copy_metadata(path: Path, base: MetadataReader, n_base: int, base_row: np.ndarray,
                  records: Sequence[dict[str, Any] | None], product_ids: Sequence[str],
                  shard_of_row: np.ndarray) -> int:
    """Write the new version's ``metadata.lmdb`` at ``path``.

    Row i (internal id i) is ``records[i]`` (a dict: encoded with ``shard_of_row[i]``) or, when
    None, the base record of internal id ``base_row[i]`` (int64 (n,)) copied as bytes; the
    base holds ``n_base`` records. product_ids: the n product ids.
    Returns the ``map_size`` in bytes used. Raises ValueError on a duplicate product id or a
    row with neither a record nor a base row.
    """
    copied = np.fromiter((r is None for r in records), dtype=bool, count=len(records))
    if (base_row[copied] < 0).any():
        raise ValueError("a row has neither a record nor a base row to copy")
    old_to_new = np.full(n_base, -1, np.int64)
    old_to_new[base_row[copied]] = np.flatnonzero(copied)
    with base._env.begin() as txn:  # every base record, in internal id order (one cursor pass)
        base_blobs = list(txn.cursor(db=base._dbs[b"records"]).iternext(keys=False, values=True))
    blobs = [base_blobs[old] if r is None else _encoded(r, shard)
             for old, r, shard in zip(base_row.tolist(), records, shard_of_row.tolist())]
    del base_blobs
    facets = _facets(base, old_to_new, records)
    keys = [iid_key(i) for i in range(len(records))]
    pids = [p.encode("utf-8") for p in product_ids]
    env, map_size = open_new(path, sum(map(len, blobs)), pids, facets)
    try:
        dbs = {name: env.open_db(name) for name in _DBS}
        with env.begin(write=True) as txn:
            txn.put(b"schema", SCHEMA.encode(), db=dbs[b"info"])
            _, added = txn.cursor(db=dbs[b"pid2iid"]).putmulti(sorted(zip(pids, keys)), overwrite=False)
            if added != len(pids):
                raise ValueError(f"{len(pids) - added} duplicate product id(s) in metadata")
            txn.cursor(db=dbs[b"records"]).putmulti(zip(keys, blobs), append=True)
            txn.cursor(db=dbs[b"iid2pid"]).putmulti(zip(keys, pids), append=True)
            for key, ids in sorted(facets.items()):
                txn.put(key, ids.astype("<i8").tobytes(), db=dbs[b"facets"])
        env.sync(True)
    finally:
        env.close()
    Path(str(path) + "-lock").unlink(missing_ok=True)
    return map_size
