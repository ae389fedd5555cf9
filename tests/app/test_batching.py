import asyncio
import threading

import numpy as np
import pytest

from app.batching import BatchStats, DynamicBatcher, InferenceFailed, QueueFull, ShuttingDown, plan_batches

pytestmark = pytest.mark.anyio


def note(value: int, length: int = 4) -> np.ndarray:
    """Token ids whose first id tells the fake model what to answer."""
    return np.full(length, value, dtype=np.int64)


class FakeModel:
    """Answers value/100 for a note whose ids start with `value`; records every batch; can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, token_ids: list[np.ndarray]) -> np.ndarray:
        self.release.wait(timeout=10)
        self.batches.append([int(ids[0]) for ids in token_ids])
        return np.array([ids[0] / 100 for ids in token_ids])


def batcher(model, **overrides) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_batch_tokens": 1000, "max_wait_ms": 20, "queue_capacity": 64} | overrides
    return DynamicBatcher(model, **options)


def test_plan_batches_sorts_by_length_and_respects_both_limits():
    lengths = [10, 3, 7, 3, 9, 1, 10]
    batches = plan_batches(lengths, max_batch_size=3, max_batch_tokens=20)
    assert sorted(p for batch in batches for p in batch) == list(range(len(lengths)))
    flattened = [lengths[p] for batch in batches for p in batch]
    assert flattened == sorted(lengths)
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[p] for p in batch) <= 20


def test_plan_batches_gives_an_over_budget_note_a_batch_of_its_own():
    assert plan_batches([50, 2], max_batch_size=8, max_batch_tokens=10) == [[1], [0]]


async def test_concurrent_requests_share_one_batch_and_get_their_own_results_in_order():
    model = FakeModel()
    stats: list[BatchStats] = []
    async with batcher(model, max_wait_ms=200, on_batch=stats.append) as b:
        first, second = await asyncio.gather(
            b.classify([note(10), note(20, length=2), note(30)], timeout_s=5),
            b.classify([note(40, length=6), note(50)], timeout_s=5),
        )
    np.testing.assert_allclose(first, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(second, [0.4, 0.5])
    assert model.batches == [[20, 10, 30, 50, 40]]  # one batch, shortest note first
    assert stats[0].size == 5 and stats[0].padded_tokens == 5 * 6


async def test_a_lone_request_runs_at_once_and_max_wait_applies_only_under_concurrency():
    model = FakeModel()
    loop = asyncio.get_running_loop()

    async def later(value: int, delay_s: float) -> np.ndarray:
        await asyncio.sleep(delay_s)
        return await b.classify([note(value)], timeout_s=5)

    async with batcher(model, max_wait_ms=400) as b:
        start = loop.time()
        await b.classify([note(1)], timeout_s=5)
        assert loop.time() - start < 0.2  # idle: no waiting for company that is not coming
        await asyncio.gather(b.classify([note(2)], timeout_s=5), b.classify([note(3)], timeout_s=5))
        await asyncio.gather(b.classify([note(4)], timeout_s=5), later(5, 0.1))  # now it waits for note 5
    assert model.batches == [[1], [2, 3], [4, 5]]


async def test_batches_are_cut_at_max_batch_size():
    model = FakeModel()
    async with batcher(model, max_batch_size=2, max_wait_ms=100) as b:
        result = await b.classify([note(v) for v in range(1, 6)], timeout_s=5)
    np.testing.assert_allclose(result, [0.01, 0.02, 0.03, 0.04, 0.05])
    assert [len(batch) for batch in model.batches] == [2, 2, 1]


async def test_a_request_that_does_not_fit_the_queue_is_refused_at_once():
    model = FakeModel()
    model.release.clear()
    async with batcher(model, max_wait_ms=0, queue_capacity=3) as b:
        running = asyncio.create_task(b.classify([note(1)], timeout_s=5))
        await asyncio.sleep(0.05)  # the worker holds note 1 in the model; the queue is empty again
        waiting = asyncio.create_task(b.classify([note(2), note(3)], timeout_s=5))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.classify([note(4), note(5)], timeout_s=5)
        model.release.set()
        await asyncio.gather(running, waiting)


async def test_timed_out_notes_are_skipped_by_the_worker():
    model = FakeModel()
    model.release.clear()
    async with batcher(model, max_wait_ms=0) as b:
        running = asyncio.create_task(b.classify([note(1)], timeout_s=5))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await b.classify([note(2), note(3)], timeout_s=0.05)
        model.release.set()
        await running
        np.testing.assert_allclose(await b.classify([note(4)], timeout_s=5), [0.04])
    assert model.batches == [[1], [4]]


async def test_a_cancelled_request_does_not_break_the_batch_it_shares():
    model = FakeModel()
    model.release.clear()
    async with batcher(model) as b:
        busy = asyncio.create_task(b.classify([note(9)], timeout_s=5))  # holds the worker meanwhile
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.classify([note(1), note(2)], timeout_s=5))
        staying = asyncio.create_task(b.classify([note(3)], timeout_s=5))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        np.testing.assert_allclose(await staying, [0.03])
        await busy
    assert model.batches == [[9], [3]]


async def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    calls = []

    def flaky(token_ids):
        calls.append(len(token_ids))
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return np.full(len(token_ids), 0.5)

    async with batcher(flaky, max_wait_ms=0) as b:
        with pytest.raises(InferenceFailed):
            await b.classify([note(1)], timeout_s=5)
        np.testing.assert_allclose(await b.classify([note(2)], timeout_s=5), [0.5])


async def test_shutdown_finishes_queued_work_then_refuses_new_requests():
    model = FakeModel()
    model.release.clear()
    b = batcher(model, max_wait_ms=0, max_batch_size=1)
    async with b:
        pending = [asyncio.create_task(b.classify([note(v)], timeout_s=5)) for v in (1, 2, 3)]
        await asyncio.sleep(0.01)
        threading.Timer(0.05, model.release.set).start()
    assert [result[0] for result in await asyncio.gather(*pending)] == pytest.approx([0.01, 0.02, 0.03])
    with pytest.raises(ShuttingDown):
        await b.classify([note(4)], timeout_s=5)
