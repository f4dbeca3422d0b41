"""Product metadata of an index version in LMDB: internal id <-> product id, records, facets.

Layout (one LMDB environment, file ``metadata.lmdb``, ``subdir=False``), explicit encoding:

| sub-database | key | value |
|---|---|---|
| ``records`` | internal id, uint64 big-endian (8 bytes) | product record, UTF-8 JSON object |
| ``pid2iid`` | product id, UTF-8 | internal id, uint64 big-endian |
| ``iid2pid`` | internal id, uint64 big-endian | product id, UTF-8 |
| ``facets`` | ``attribute`` + ``\\x1f`` + ``value``, UTF-8 | internal ids, int64 little-endian, sorted |
| ``info`` | ``schema`` | ``ecsearch-metadata-v1`` |

A record is ``{"product_id", "title", "image", "attributes", "extra", "flags", "shard", "row"}``.
``map_size`` is computed from the encoded size (x2 + 16 MiB, our choice) and recorded in the
manifest. The server opens it read-only without locking (index versions are immutable).
Source: our choice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lmdb
import numpy as np

from indexer.errors import IndexIntegrityError, IndexVersionError

SCHEMA = "ecsearch-metadata-v1"
FACET_SEP = "\x1f"
_DBS = (b"records", b"pid2iid", b"iid2pid", b"facets", b"info")


def iid_key(internal_id: int) -> bytes:
    """8-byte big-endian key of an internal id (sorts like the integer)."""
    return int(internal_id).to_bytes(8, "big")


def facet_key(attribute: str, value: str) -> bytes:
    """Key of the facet ``attribute = value``."""
    return f"{attribute}{FACET_SEP}{value}".encode("utf-8")


def open_new(path: Path, record_bytes: int, pids: Sequence[bytes], facets: Mapping[bytes, list]
             ) -> tuple[lmdb.Environment, int]:
    """A new metadata LMDB file at ``path``, its map sized for records of ``record_bytes`` in all,
    the product ids ``pids`` and the ``facets`` lists (twice the payload plus 16 MiB, page
    aligned; our choice). Returns ``(environment, map_size in bytes)``."""
    payload = record_bytes + sum(2 * len(p) + 48 for p in pids)
    payload += sum(len(k) + 8 * len(v) + 32 for k, v in facets.items())
    map_size = (2 * payload + (16 << 20) + 4095) // 4096 * 4096
    env = lmdb.open(str(path), subdir=False, map_size=map_size, max_dbs=len(_DBS), lock=True, sync=True)
    return env, map_size


def write_metadata(path: Path, records: Sequence[Mapping[str, Any]]) -> int:
    """Write ``records`` (record ``i`` has internal id ``i``) to a new LMDB file at ``path``.

    Each record needs ``product_id``; ``attributes`` (str -> str) feed the facets.
    Returns the ``map_size`` in bytes that was used. Raises ValueError on a duplicate product id.
    """
    encoded = [json.dumps(dict(r), ensure_ascii=False, separators=(",", ":")).encode("utf-8") for r in records]
    facets: dict[bytes, list[int]] = {}
    for iid, r in enumerate(records):
        for attr, value in (r.get("attributes") or {}).items():
            facets.setdefault(facet_key(attr, str(value)), []).append(iid)
    env, map_size = open_new(path, sum(len(e) for e in encoded),
                             [str(r["product_id"]).encode() for r in records], facets)
    try:
        dbs = {name: env.open_db(name) for name in _DBS}
        with env.begin(write=True) as txn:
            txn.put(b"schema", SCHEMA.encode(), db=dbs[b"info"])
            for iid, (r, blob) in enumerate(zip(records, encoded)):
                key, pid = iid_key(iid), str(r["product_id"]).encode("utf-8")
                if not txn.put(pid, key, db=dbs[b"pid2iid"], overwrite=False):
                    raise ValueError(f"duplicate product id {r['product_id']!r} in metadata")
                txn.put(key, blob, db=dbs[b"records"], append=True)
                txn.put(key, pid, db=dbs[b"iid2pid"], append=True)
            for key, ids in sorted(facets.items()):
                txn.put(key, np.asarray(ids, dtype="<i8").tobytes(), db=dbs[b"facets"])
        env.sync(True)
    finally:
        env.close()
    lock = Path(str(path) + "-lock")
    if lock.exists():
        lock.unlink()
    return map_size


class MetadataReader:
    """Read-only view of a version's ``metadata.lmdb``. Thread-safe for concurrent reads."""

    def __init__(self, path: Path):
        """Open ``path`` read-only.

        Raises:
            IndexVersionError: the file is missing or not an LMDB with our sub-databases.
            IndexIntegrityError: its schema is not ``SCHEMA``.
        The environment is closed again whenever opening fails.
        """
        if not Path(path).is_file():
            raise IndexVersionError(f"{path}: metadata file missing")
        try:
            self._env = lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                                  max_dbs=len(_DBS), readahead=False)
        except lmdb.Error as exc:
            raise IndexVersionError(f"{path}: not a readable metadata LMDB ({exc})") from exc
        try:
            self._check(path)
        except BaseException:
            self._env.close()
            raise

    def _check(self, path: Path) -> None:
        try:
            self._dbs = {name: self._env.open_db(name, create=False) for name in _DBS}
            with self._env.begin() as txn:
                schema = txn.get(b"schema", db=self._dbs[b"info"])
        except lmdb.Error as exc:
            raise IndexVersionError(f"{path}: not a readable metadata LMDB ({exc})") from exc
        if schema != SCHEMA.encode():
            raise IndexIntegrityError(f"{path}: metadata schema {schema!r}, expected {SCHEMA!r}")

    def internal_ids(self, product_ids: Iterable[str]) -> np.ndarray:
        """``int64 (n,)`` internal ids of ``product_ids``; ``-1`` for an unknown id."""
        db = self._dbs[b"pid2iid"]
        limit = self._env.max_key_size()
        with self._env.begin(buffers=True) as txn:
            keys = [str(p).encode("utf-8") if p is not None else b"" for p in product_ids]
            out = [txn.get(key, db=db) if 0 < len(key) <= limit else None for key in keys]
        return np.asarray([int.from_bytes(v, "big") if v is not None else -1 for v in out], dtype=np.int64)

    def product_ids(self, internal_ids: np.ndarray) -> list[list[str | None]]:
        """Product ids for ``int64 (n, k)`` internal ids, as n lists of k; ``-1`` -> None."""
        ids = np.atleast_2d(np.asarray(internal_ids, dtype=np.int64))
        db = self._dbs[b"iid2pid"]
        with self._env.begin() as txn:
            return [[txn.get(iid_key(i), db=db).decode("utf-8") if i >= 0 else None for i in row]
                    for row in ids.tolist()]

    def records(self, internal_ids: Iterable[int]) -> list[dict | None]:
        """Records for internal ids (None for an id out of range or -1)."""
        db = self._dbs[b"records"]
        with self._env.begin(buffers=True) as txn:
            blobs = [txn.get(iid_key(i), db=db) if i >= 0 else None for i in internal_ids]
            return [json.loads(bytes(b)) if b is not None else None for b in blobs]

    def facet_ids(self, attribute: str, value: str) -> np.ndarray:
        """Sorted ``int64`` internal ids whose ``attribute`` equals ``value`` (empty if none)."""
        with self._env.begin() as txn:
            blob = txn.get(facet_key(attribute, value), db=self._dbs[b"facets"])
        return np.frombuffer(blob, dtype="<i8").astype(np.int64) if blob else np.empty(0, np.int64)

    def facet_values(self) -> dict[str, list[str]]:
        """``{attribute: [values...]}`` of every facet stored."""
        out: dict[str, list[str]] = {}
        with self._env.begin() as txn:
            for key in txn.cursor(db=self._dbs[b"facets"]).iternext(keys=True, values=False):
                attr, _, value = bytes(key).decode("utf-8").partition(FACET_SEP)
                out.setdefault(attr, []).append(value)
        return out

    def close(self) -> None:
        """Close the LMDB environment (no read may be running: ``IndexVersion`` ensures it)."""
        self._env.close()
