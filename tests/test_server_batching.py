"""Micro-batcher in front of the real (tiny, random) query tower."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine.model.errors import ImageDecodeError, InputError
from server.batching import BatchConfig, BatchDeadlineError, MicroBatcher


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 48), color).save(buf, format="JPEG")
    return buf.getvalue()


def _run_batcher(tiny_model, samples, config: BatchConfig, deadlines=None):
    """Submit all samples concurrently; return (results or exceptions, batch sizes seen)."""
    sizes: list[int] = []

    async def main():
        batcher = MicroBatcher(lambda t, i: tiny_model.query_tower.encode(t, i), config,
                               on_batch=lambda n, _s: sizes.append(n))
        batcher.start()
        try:
            calls = [batcher.encode(text, image, None if deadlines is None else deadlines[n])
                     for n, (text, image) in enumerate(samples)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.close()
    return asyncio.run(main()), sizes


def test_concurrent_queries_share_tower_calls_and_match_direct_encoding(tiny_model):
    samples = [("black heels", None), (None, _jpeg((200, 10, 10))), ("blue shirt", _jpeg((10, 10, 200))),
               ("watch", None), ("red dress for women", _jpeg((250, 250, 0)))]
    results, sizes = _run_batcher(tiny_model, samples, BatchConfig(max_batch_size=8, max_wait_ms=200))
    assert sizes == [2, 3]  # one call for the text-only queries, one for those with an image
    direct = tiny_model.query_tower.encode([t for t, _ in samples], [i for _, i in samples])
    for n, result in enumerate(results):
        assert result.batch_size == (2 if samples[n][1] is None else 3)
        assert result.vector.dtype == np.float32 and result.vector.shape == (tiny_model.dim,)
        np.testing.assert_allclose(result.vector, direct[n], atol=1e-5)


def test_text_only_and_image_queries_go_in_separate_calls_with_their_own_limits(tiny_model):
    samples = [("black heels", None), (None, _jpeg((200, 10, 10))), ("blue shirt", _jpeg((10, 10, 200))),
               ("watch", None), (None, _jpeg((250, 250, 0)))]
    results, sizes = _run_batcher(tiny_model, samples, BatchConfig(max_batch_size=8, max_image_batch_size=1))
    assert sizes == [2, 1, 1, 1]  # the two text-only queries, then one call per image query
    assert [r.batch_size for r in results] == [2, 1, 1, 2, 1]
    direct = tiny_model.query_tower.encode([t for t, _ in samples], [i for _, i in samples])
    for n, result in enumerate(results):
        np.testing.assert_allclose(result.vector, direct[n], atol=1e-5)


def test_max_batch_size_splits_batches(tiny_model):
    samples = [(f"query number {n}", None) for n in range(7)]
    results, sizes = _run_batcher(tiny_model, samples, BatchConfig(max_batch_size=3, max_wait_ms=100))
    assert sum(sizes) == 7 and max(sizes) <= 3
    assert all(not isinstance(r, Exception) for r in results)


def test_bad_sample_fails_alone_and_does_not_poison_the_batch(tiny_model):
    samples = [("black heels", None), ("shirt", b"this is not an image"), (None, _jpeg((0, 128, 0))),
               (None, b"\xff\xd8\xff\xe0 truncated jpeg"), ("watch", None)]
    config = BatchConfig(max_batch_size=8, max_wait_ms=200, max_image_batch_size=8)
    results, sizes = _run_batcher(tiny_model, samples, config)
    assert isinstance(results[1], ImageDecodeError) and results[1].index == 0
    assert isinstance(results[3], ImageDecodeError)
    good = [0, 2, 4]
    direct = tiny_model.query_tower.encode([samples[n][0] for n in good], [samples[n][1] for n in good])
    for row, n in enumerate(good):
        np.testing.assert_allclose(results[n].vector, direct[row], atol=1e-5)
    # a later batch is unaffected
    later, _ = _run_batcher(tiny_model, [("black heels", None)], BatchConfig())
    np.testing.assert_allclose(later[0].vector, results[0].vector, atol=1e-5)


def test_sample_past_its_deadline_is_not_encoded(tiny_model):
    past = time.monotonic() - 1.0
    results, sizes = _run_batcher(tiny_model, [("late", None), ("on time", None)],
                                  BatchConfig(max_batch_size=4, max_wait_ms=50), deadlines=[past, None])
    assert isinstance(results[0], BatchDeadlineError)
    assert not isinstance(results[1], Exception) and sizes == [1]


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchConfig(max_wait_ms=-1)
    assert issubclass(ImageDecodeError, InputError)


def test_greedy_default_encodes_at_once_and_batches_what_queued_meanwhile(tiny_model):
    assert BatchConfig().max_wait_ms == 0
    gate = threading.Event()
    sizes: list[int] = []

    def encode(texts, images):
        gate.wait(10)  # the first call holds the tower until the others are queued
        return tiny_model.query_tower.encode(texts, images)

    async def main():
        batcher = MicroBatcher(encode, BatchConfig(), on_batch=lambda n, _s: sizes.append(n))
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.encode("first", None))
            await asyncio.sleep(0.1)  # the tower thread has taken "first" alone: no waiting
            rest = [asyncio.ensure_future(batcher.encode(f"sample {n}", None)) for n in range(10)]
            await asyncio.sleep(0.1)
            gate.set()
            return await first, await asyncio.gather(*rest)
        finally:
            await batcher.close()

    first, rest = asyncio.run(main())
    assert sizes == [1, 10]
    assert first.batch_size == 1 and all(r.batch_size == 10 for r in rest)
    assert all(r.queue_ms >= 50 for r in rest)  # they waited for the running call, not for a timer


def test_close_fails_queued_samples_and_later_calls(tiny_model):
    from server.batching import BatcherClosedError

    gate = threading.Event()

    def encode(texts, images):
        gate.wait(10)
        return tiny_model.query_tower.encode(texts, images)

    async def main():
        batcher = MicroBatcher(encode, BatchConfig())
        batcher.start()
        running = asyncio.ensure_future(batcher.encode("running", None))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(batcher.encode("queued", None))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        gate.set()
        await closing
        results = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(BatcherClosedError):
            await batcher.encode("after", None)
        return results

    running, queued = asyncio.run(main())
    assert running.vector.shape == (tiny_model.dim,)  # the call in progress finished
    assert isinstance(queued, BatcherClosedError)


def test_post_encode_stage_results_ride_with_the_vectors_and_fail_alone(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    calls: list[tuple[list, np.ndarray]] = []

    def post_encode(payloads, vectors):
        calls.append((list(payloads), vectors.copy()))
        return [ValueError(f"bad {p}") if p == "poison" else f"searched {p}" for p in payloads]

    gate = threading.Event()

    def encode(texts, images):
        gate.wait(10)
        return tiny_model.query_tower.encode(texts, images)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(encode, BatchConfig(), post_encode_fn=post_encode, post_encode_executor=pool)
            batcher.start()
            try:
                first = asyncio.ensure_future(batcher.encode("first", None, payload="p0"))
                await asyncio.sleep(0.1)
                rest = [asyncio.ensure_future(batcher.encode(f"sample {n}", None, payload=p))
                        for n, p in enumerate(["p1", "poison", "p3"])]
                await asyncio.sleep(0.1)
                gate.set()
                return await asyncio.gather(first, *rest, return_exceptions=True)
            finally:
                await batcher.close()

    first, one, poisoned, three = asyncio.run(main())
    assert [c[0] for c in calls] == [["p0"], ["p1", "poison", "p3"]]  # one post-encode call per batch, in order
    assert first.result == "searched p0" and one.result == "searched p1" and three.result == "searched p3"
    assert isinstance(poisoned, ValueError) and str(poisoned) == "bad poison"
    np.testing.assert_array_equal(calls[1][1][0], one.vector)  # the post-encode stage saw the delivered vectors
    assert one.batch_size == 3


def test_tracked_work_ends_only_after_the_post_encode_stage_even_when_the_caller_gave_up(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    in_stage, release_stage = threading.Event(), threading.Event()
    tracked = []

    def post_encode(payloads, vectors):
        in_stage.set()
        release_stage.wait(10)
        return list(payloads)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(lambda t, i: tiny_model.query_tower.encode(t, i), BatchConfig(),
                                   post_encode_fn=post_encode, post_encode_executor=pool)
            batcher.start()
            try:
                call = asyncio.ensure_future(batcher.encode("query", None, payload="job", track=tracked.append))
                await asyncio.to_thread(in_stage.wait, 10)
                call.cancel()  # the request gives up while its search runs
                await asyncio.sleep(0.05)
                done_while_running = tracked[0].done()
                release_stage.set()
                await asyncio.wrap_future(tracked[0])
                return call.cancelled(), done_while_running
            finally:
                await batcher.close()

    cancelled, done_while_running = asyncio.run(main())
    assert cancelled and not done_while_running  # the lease would have stayed held until the search ended


def test_the_post_encode_stage_needs_an_executor(tiny_model):
    with pytest.raises(ValueError, match="post_encode_fn and post_encode_executor"):
        MicroBatcher(lambda t, i: None, BatchConfig(), post_encode_fn=lambda p, v: p)


def _start_gated(tiny_model, post_encode, **kwargs):
    """A batcher whose post-encode stage runs in a 1-thread pool (caller shuts it down)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    batcher = MicroBatcher(kwargs.pop("encode", lambda t, i: tiny_model.query_tower.encode(t, i)),
                           kwargs.pop("config", BatchConfig()), post_encode_fn=post_encode,
                           post_encode_executor=pool, **kwargs)
    batcher.start()
    return batcher, pool


def test_an_exception_mid_batch_fails_only_the_samples_not_yet_handed_on(tiny_model):
    """The whole-batch call fails, so samples are encoded one by one; the first goes on to
    the post-encode stage, then an unexpected error (here: the batch callback) hits the
    second. The first must still get its own result, and its work must stay tracked."""
    in_stage, finish_stage = threading.Event(), threading.Event()
    single_calls = []

    def encode(texts, images):
        if len(texts) > 1:
            raise RuntimeError("batched call failed")
        return tiny_model.query_tower.encode(texts, images)

    def on_batch(size, _seconds):
        single_calls.append(size)
        if len(single_calls) == 2:
            raise RuntimeError("metrics broke")

    def post_encode(payloads, vectors):
        in_stage.set()
        finish_stage.wait(10)
        return [f"searched {p}" for p in payloads]

    async def main():
        batcher, pool = _start_gated(tiny_model, post_encode, encode=encode, on_batch=on_batch,
                                     config=BatchConfig(max_batch_size=2, max_wait_ms=2000))
        tracked = []
        try:
            calls = [asyncio.ensure_future(batcher.encode(t, None, payload=t, track=tracked.append))
                     for t in ("first", "second")]
            await asyncio.to_thread(in_stage.wait, 10)
            await asyncio.sleep(0.1)  # the tower thread meets the error meanwhile
            first_released_early = tracked[0].done()
            finish_stage.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results, first_released_early, [f.done() for f in tracked]
        finally:
            finish_stage.set()
            await batcher.close()
            pool.shutdown()

    (first, second), first_released_early, tracked_done = asyncio.run(main())
    assert not first_released_early  # its lease would have ended while its search ran
    assert first.result == "searched first" and first.batch_size == 1
    assert isinstance(second, RuntimeError) and str(second) == "metrics broke"
    assert tracked_done == [True, True]


def test_a_failing_post_encode_stage_fails_its_batch_and_ends_all_tracked_work(tiny_model):
    def post_encode(payloads, vectors):
        raise RuntimeError("index went away")

    async def main():
        batcher, pool = _start_gated(tiny_model, post_encode, config=BatchConfig(max_batch_size=3, max_wait_ms=2000))
        tracked = []
        try:
            calls = [batcher.encode(f"query {n}", None, payload=n, track=tracked.append) for n in range(3)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0)
            return results, [f.done() for f in tracked]
        finally:
            await batcher.close()
            pool.shutdown()

    results, tracked_done = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and str(r) == "index went away" for r in results)
    assert tracked_done == [True, True, True]


def test_a_post_encode_stage_returning_too_few_results_fails_the_batch_precisely(tiny_model):
    async def main():
        batcher, pool = _start_gated(tiny_model, lambda payloads, vectors: list(payloads)[:1],
                                     config=BatchConfig(max_batch_size=2, max_wait_ms=2000))
        try:
            return await asyncio.gather(batcher.encode("a", None, payload=1), batcher.encode("b", None, payload=2),
                                        return_exceptions=True)
        finally:
            await batcher.close()
            pool.shutdown()

    for result in asyncio.run(main()):
        assert isinstance(result, RuntimeError) and "returned 1 results for 2 samples" in str(result)


def test_a_request_cancelled_mid_batch_leaves_the_others_served_and_its_work_ends(tiny_model):
    gate, encoding = threading.Event(), threading.Event()
    encoded_texts = []
    stage_payloads = []

    def encode(texts, images):
        encoded_texts.append(list(texts))
        encoding.set()
        gate.wait(10)
        return tiny_model.query_tower.encode(texts, images)

    def post_encode(payloads, vectors):
        stage_payloads.append(list(payloads))
        return [f"searched {p}" for p in payloads]

    async def main():
        batcher, pool = _start_gated(tiny_model, post_encode, encode=encode)
        tracked = {}
        try:
            first = asyncio.ensure_future(batcher.encode("first", None, payload="first",
                                                         track=lambda f: tracked.setdefault("first", f)))
            await asyncio.to_thread(encoding.wait, 10)  # "first" is being encoded
            names = ["keep", "cancel-queued", "also-keep"]
            queued = {n: asyncio.ensure_future(batcher.encode(n, None, payload=n,
                                                              track=lambda f, n=n: tracked.setdefault(n, f)))
                      for n in names}
            await asyncio.sleep(0.05)
            queued["cancel-queued"].cancel()  # gives up while queued: never encoded
            first.cancel()  # gives up while its batch is encoded
            await asyncio.sleep(0.05)
            gate.set()
            kept = await asyncio.gather(queued["keep"], queued["also-keep"])
            await asyncio.gather(*(asyncio.wrap_future(f) for f in tracked.values()))
            return kept, first.cancelled(), queued["cancel-queued"].cancelled()
        finally:
            gate.set()
            await batcher.close()
            pool.shutdown()

    kept, first_cancelled, queued_cancelled = asyncio.run(main())
    assert first_cancelled and queued_cancelled
    assert [k.result for k in kept] == ["searched keep", "searched also-keep"]
    assert encoded_texts == [["first"], ["keep", "also-keep"]]  # the cancelled queued one was dropped
    assert ["keep", "also-keep"] in stage_payloads
