"""The ingress's batcher (plain asyncio, no Ray): alone at low load, batched under load, failures and
cancellations handled."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aimfair_ray.serving.batcher import Batcher


def _slow_double(xs: list) -> list:
    time.sleep(0.05)  # a model's forward pass, in the batcher's thread
    assert threading.current_thread() is not threading.main_thread()
    return [2 * x for x in xs]


def test_one_request_runs_at_once_alone_and_concurrent_ones_batch_up():
    from starlette.concurrency import run_in_threadpool

    async def go():
        t0 = time.perf_counter()
        await run_in_threadpool(_slow_double, [3])  # the same call made directly, as the reference
        direct = time.perf_counter() - t0
        b = Batcher(_slow_double, max_batch=4)
        t0 = time.perf_counter()
        assert await b(3) == 6
        alone = time.perf_counter() - t0
        out = await asyncio.gather(*[b(i) for i in range(10)])
        return b.sizes, out, alone, direct

    sizes, out, alone, direct = asyncio.run(go())
    assert out == [2 * i for i in range(10)]  # each caller gets its own answer, in order
    assert alone < 1.8 * direct, (alone, direct)  # no waiting for a batch to fill: about one direct call
    assert sizes == [1, 4, 4, 2], sizes  # then the ten that arrived together, in batches of at most 4


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs():
    calls = []

    def flaky(xs):
        calls.append(list(xs))
        if len(calls) == 1:
            raise ValueError("boom")
        return xs

    async def go():
        b = Batcher(flaky)
        with pytest.raises(ValueError, match="boom"):
            await b(1)
        return await b(2)

    assert asyncio.run(go()) == 2


def test_a_cancelled_request_is_not_computed():
    seen = []

    def record(xs):
        time.sleep(0.05)
        seen.extend(xs)
        return xs

    async def go():
        b = Batcher(record)
        first = asyncio.ensure_future(b("first"))
        await asyncio.sleep(0.01)  # "first" runs; the next two queue behind it
        late = asyncio.ensure_future(b("timed out"))
        kept = asyncio.ensure_future(b("kept"))
        await asyncio.sleep(0)
        late.cancel()
        return await first, await kept

    assert asyncio.run(go()) == ("first", "kept")
    assert seen == ["first", "kept"]
