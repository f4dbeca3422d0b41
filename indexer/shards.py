"""Stable assignment of products to shards by a hash of the product id.

A product always lands in the same shard for a given shard count, whatever the catalogue
order, the machine or the Python process (``hash()`` is salted per process, so it is not
used). Hash: the first 8 bytes of BLAKE2b-64 of the UTF-8 product id, read big-endian, modulo
the shard count. Source: our choice (any keyed-free stable hash would do).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def shard_of(product_id: str, n_shards: int) -> int:
    """Shard number in ``[0, n_shards)`` for ``product_id``. Raises ValueError if n_shards < 1."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.blake2b(product_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_shards


def assign_shards(product_ids: Sequence[str], n_shards: int) -> np.ndarray:
    """``int32 (n,)`` shard number of each product id (see ``shard_of``)."""
    return np.fromiter((shard_of(pid, n_shards) for pid in product_ids), dtype=np.int32, count=len(product_ids))
