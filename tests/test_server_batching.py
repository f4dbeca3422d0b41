"""Micro-batcher in front of the real (tiny, random) query tower."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine.errors import ImageDecodeError, InputError
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


def test_then_stage_results_ride_with_the_vectors_and_fail_alone(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    calls: list[tuple[list, np.ndarray]] = []

    def then(payloads, vectors):
        calls.append((list(payloads), vectors.copy()))
        return [ValueError(f"bad {p}") if p == "poison" else f"searched {p}" for p in payloads]

    gate = threading.Event()

    def encode(texts, images):
        gate.wait(10)
        return tiny_model.query_tower.encode(texts, images)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(encode, BatchConfig(), then_fn=then, then_executor=pool)
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
    assert [c[0] for c in calls] == [["p0"], ["p1", "poison", "p3"]]  # one then call per batch, in order
    assert first.result == "searched p0" and one.result == "searched p1" and three.result == "searched p3"
    assert isinstance(poisoned, ValueError) and str(poisoned) == "bad poison"
    np.testing.assert_array_equal(calls[1][1][0], one.vector)  # the then stage saw the delivered vectors
    assert one.batch_size == 3


def test_tracked_work_ends_only_after_the_then_stage_even_when_the_caller_gave_up(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    in_then, release_then = threading.Event(), threading.Event()
    tracked = []

    def then(payloads, vectors):
        in_then.set()
        release_then.wait(10)
        return list(payloads)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(lambda t, i: tiny_model.query_tower.encode(t, i), BatchConfig(),
                                   then_fn=then, then_executor=pool)
            batcher.start()
            try:
                call = asyncio.ensure_future(batcher.encode("query", None, payload="job", track=tracked.append))
                await asyncio.to_thread(in_then.wait, 10)
                call.cancel()  # the request gives up while its search runs
                await asyncio.sleep(0.05)
                done_while_running = tracked[0].done()
                release_then.set()
                await asyncio.wrap_future(tracked[0])
                return call.cancelled(), done_while_running
            finally:
                await batcher.close()

    cancelled, done_while_running = asyncio.run(main())
    assert cancelled and not done_while_running  # the lease would have stayed held until the search ended


def test_then_stage_needs_an_executor(tiny_model):
    with pytest.raises(ValueError, match="then_fn and then_executor"):
        MicroBatcher(lambda t, i: None, BatchConfig(), then_fn=lambda p, v: p)
