"""The query-time BM25 path (``engine.retrieval.lexical``) gives bm25s's own tokens and scores,
bit for bit, on the real fashion catalogue: the regex tokeniser and the dense rows of frequent
tokens are speed-ups only."""
from __future__ import annotations

import numpy as np
import pytest

from engine.retrieval import lexical
from engine.retrieval.lexical import LexicalIndex, product_text, query_tokens, tokenize

N = 2000
QUERIES = ["puma sports shoes", "Navy Blue Tshirts for Men", "black heels for women", "the of and",
           "Wrangler men's jeans 32", "ÉTÉ kurta – cotton/silk", "", "x", "nike nike men"]


@pytest.fixture(scope="module")
def texts(fashion_dir):
    from engine.catalog import read_catalog

    return [product_text(p.title, p.attributes) for p in read_catalog(fashion_dir, limit=N).products]


def test_query_tokens_are_bm25s_tokens(texts):
    for text in texts + QUERIES:
        assert query_tokens(text) == tokenize([text])[0], text


@pytest.mark.parametrize("dense_share", [10 ** 9, 0], ids=["every-token-a-dense-row", "scatter-only"])
def test_scores_and_hits_equal_bm25s_own(texts, monkeypatch, dense_share):
    monkeypatch.setattr(lexical, "DENSE_SHARE", dense_share)
    index = LexicalIndex.build(texts)
    bm25 = index._bm25
    queries = QUERIES + [texts[i][:40] for i in range(0, N, 97)]
    for text in queries:
        ids = bm25.get_tokens_ids(tokenize([text])[0])
        want = (np.asarray(bm25.get_scores_from_ids(ids), dtype=np.float32) if ids
                else np.zeros(N, dtype=np.float32))
        got = index.scores(text)
        assert got.dtype == np.float32 and np.array_equal(got, want), text
        positive = np.flatnonzero(want > 0)
        for k in (1, 50, N + 5):  # the k-th score cut, and every positive document
            hit_scores, hit_ids = index.search(text, k)
            best = positive[np.lexsort((positive, -want[positive]))][:k]
            assert np.array_equal(hit_ids, best) and np.array_equal(hit_scores, want[best]), (text, k)
    assert (len(index._dense_rows) > 0) == (dense_share > 0)


def test_dense_rows_stop_at_their_memory_budget(texts, monkeypatch):
    monkeypatch.setattr(lexical, "DENSE_SHARE", 10 ** 9)
    monkeypatch.setattr(lexical, "DENSE_ROWS_BYTES", 2 * N * 4)  # room for two rows
    index = LexicalIndex.build(texts)
    reference = LexicalIndex.build(texts)
    for text in QUERIES:
        monkeypatch.setattr(lexical, "DENSE_SHARE", 0)
        want = reference.scores(text)
        monkeypatch.setattr(lexical, "DENSE_SHARE", 10 ** 9)
        assert np.array_equal(index.scores(text), want), text
    assert len(index._dense_rows) == 2
