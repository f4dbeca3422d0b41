"""indexer.shards: a product always lands in the same shard."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from indexer.shards import assign_shards, shard_of

REPO = Path(__file__).resolve().parents[1]
IDS = ["1563", "1580", "1584", "1595", "p-ü", ""]


def test_known_assignment_is_stable():
    # blake2b-64 mod 8, computed once and frozen: a change here re-shards every index.
    assert [shard_of(p, 8) for p in IDS] == [1, 0, 3, 6, 3, 4]


def test_same_in_another_process_with_another_hash_seed():
    code = "from indexer.shards import shard_of; print([shard_of(p, 8) for p in %r])" % (IDS,)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([1, 0, 3, 6, 3, 4])


def test_independent_of_order_and_subset():
    ids = [f"sku-{i}" for i in range(2000)]
    full = dict(zip(ids, assign_shards(ids, 5).tolist()))
    rng = np.random.default_rng(0)
    subset = list(rng.permutation(ids)[:700])
    assert dict(zip(subset, assign_shards(subset, 5).tolist())) == {p: full[p] for p in subset}


def test_roughly_uniform_and_in_range():
    counts = Counter(assign_shards([str(i) for i in range(20000)], 4).tolist())
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 0.9 * 5000 and max(counts.values()) < 1.1 * 5000


def test_bad_shard_count():
    with pytest.raises(ValueError, match="n_shards"):
        shard_of("x", 0)
