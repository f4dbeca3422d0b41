"""The micro-batch search stage (server.search_stage) on a real index of fashion products."""
from __future__ import annotations

import numpy as np

from indexer.errors import SearchArgumentError
from server.filters import VersionCache, parse_filters, search_filtered
from server.search_stage import SearchJob, search_batch
from tests.test_server_support import index_root, server_model, subset  # noqa: F401


def _as_pairs(result):
    return [(hit.product_id, round(hit.score, 5)) for hit in result.hits]


def test_a_batch_gets_what_each_query_gets_alone_and_a_bad_query_fails_alone(index_root):
    from indexer.search import open_index

    with open_index(index_root) as index:
        cache = VersionCache(index)
        rng = np.random.default_rng(0)
        vectors = index.vectors(np.arange(8)) + 0.2 * rng.standard_normal((8, index.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors[6] = np.nan                                 # a broken query vector, in a shared call
        women = parse_filters([("gender", ["Women"])], index.facet_values())
        jobs = [SearchJob(index, cache, 5), SearchJob(index, cache, 5), SearchJob(index, None, 5),
                SearchJob(index, cache, 3),                 # another top_k: its own call
                SearchJob(index, cache, 5, women),          # filtered: searched alone
                SearchJob(index, cache, 5, nprobe=1),
                SearchJob(index, cache, 5), SearchJob(index, cache, 5)]
        results = search_batch(jobs, vectors)

        assert len(results) == len(jobs)
        assert isinstance(results[6], SearchArgumentError) and "NaN" in str(results[6])
        for row, (job, result) in enumerate(zip(jobs, results)):
            if row == 6:
                continue
            alone = search_filtered(index, vectors[row], job.top_k, job.filters, nprobe=job.nprobe, cache=cache)
            assert _as_pairs(result) == _as_pairs(alone) and len(result.hits) == job.top_k
            assert [hit.record for hit in result.hits] == [hit.record for hit in alone.hits]
        assert all(hit.record["gender"] == "Women" for hit in results[4].hits)
        assert results[4].allowed_count == len(index.ids_with({"gender": "Women"}))
        clean = search_batch(jobs[:2] + jobs[7:], vectors[[0, 1, 7]])
        assert clean[0].search_ms == clean[1].search_ms == clean[2].search_ms  # one shared call
        assert [_as_pairs(r) for r in clean] == [_as_pairs(results[0]), _as_pairs(results[1]), _as_pairs(results[7])]


def test_an_empty_batch_and_a_single_query(index_root):
    from indexer.search import open_index

    with open_index(index_root) as index:
        assert search_batch([], np.zeros((0, index.dim), np.float32)) == []
        [result] = search_batch([SearchJob(index, None, 4)], index.vectors(np.arange(1)))
        assert len(result.hits) == 4 and result.hits[0].score >= result.hits[-1].score


def test_hybrid_jobs_of_a_batch_share_one_dense_call_and_get_what_they_get_alone(index_root):
    """Unfiltered hybrid jobs share one faiss call for their dense sides (server/search_stage.py);
    each gets exactly the fused hits it gets when run alone, and a broken vector fails its job only."""
    from indexer.search import open_index
    from server.retrieval import HYBRID, run_job

    with open_index(index_root) as index:
        cache = VersionCache(index)
        rng = np.random.default_rng(1)
        vectors = index.vectors(np.arange(5)) + 0.2 * rng.standard_normal((5, index.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = ["shirt", "black shoes", "women watch", "blue jeans", "red dress"]
        jobs = [SearchJob(index, cache, 8, retrieval=HYBRID, text=t) for t in texts]
        results = search_batch(jobs, vectors)
        for job, vector, result in zip(jobs, vectors, results):
            assert _as_pairs(result) == _as_pairs(run_job(job, vector)) and len(result.hits) == 8
        assert len({r.search_ms for r in results}) == 1  # one shared dense call
        broken = vectors.copy()
        broken[2] = np.nan
        again = search_batch(jobs, broken)
        assert isinstance(again[2], SearchArgumentError)
        assert [_as_pairs(r) for i, r in enumerate(again) if i != 2] == \
            [_as_pairs(r) for i, r in enumerate(results) if i != 2]
