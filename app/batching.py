"""Dynamic batching: notes from concurrent requests share model runs.

Requests put their (already tokenized) notes on a bounded queue. One worker task takes the first
waiting note and everything queued behind it; only while requests are arriving concurrently (the last
pool held notes of several requests) does it also wait up to `max_wait_ms` for a batch to fill, so that
a lone request is never delayed for company that is not coming. It sorts what it took by length so that
notes of similar length share a batch (less padding), cuts it into batches within `max_batch_size`
notes and `max_batch_tokens` padded tokens, and runs them one at a time on a single-thread executor,
off the event loop. Each request's future resolves once all its notes have run, in request order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# The worker takes up to this many batches' worth of waiting notes at once: sorting a pool larger
# than one batch by length is what lets notes of similar length share a batch.
POOL_BATCHES = 4

Predict = Callable[[list[np.ndarray]], np.ndarray]


class QueueFull(Exception):
    """The queue has no room for all of a request's notes; the request was not queued."""


class ShuttingDown(Exception):
    """The batcher has stopped accepting requests."""


class InferenceFailed(Exception):
    """The model raised while running a batch that held this request's notes."""


@dataclass(frozen=True)
class BatchStats:
    size: int  # notes in the batch
    padded_tokens: int  # notes x longest note
    seconds: float  # padding and model run


class _Request:
    """One submitted request; its future gets P(emergency) of every note once the last one has run."""

    def __init__(self, note_count: int) -> None:
        self.future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._probabilities = np.empty(note_count, dtype=np.float32)
        self._remaining = note_count

    @property
    def live(self) -> bool:
        """False once answered, failed, timed out or cancelled: its notes still queued are then skipped."""
        return not self.future.done()

    def resolve(self, index: int, probability: float) -> None:
        self._probabilities[index] = probability
        self._remaining -= 1
        if self._remaining == 0:
            self.future.set_result(self._probabilities)


@dataclass(frozen=True)
class _QueuedNote:
    request: _Request
    index: int  # position in its request
    ids: np.ndarray


def plan_batches(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group note positions into batches, shortest notes first, each within both limits.

    The padded size of a batch is its note count times its longest note. A note longer than
    `max_batch_tokens` on its own still gets a batch of one.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for position in sorted(range(len(lengths)), key=lengths.__getitem__):
        grown = len(current) + 1
        if current and (grown > max_batch_size or grown * lengths[position] > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(position)
    if current:
        batches.append(current)
    return batches


class DynamicBatcher:
    """Use as `async with DynamicBatcher(...) as batcher:`; leaving it finishes queued work, then stops."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        queue_capacity: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self._max_wait_s = max_wait_ms / 1000
        self._queue: asyncio.Queue[_QueuedNote] = asyncio.Queue(maxsize=queue_capacity)
        self._on_batch = on_batch or (lambda stats: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._worker: asyncio.Task[None] | None = None
        self._accepting = False
        self._concurrent = False  # the last pool held notes of more than one request

    @property
    def queue_depth(self) -> int:
        """Notes waiting for the worker to take them."""
        return self._queue.qsize()

    async def __aenter__(self) -> DynamicBatcher:
        self._worker = asyncio.create_task(self._run(), name="batcher")
        self._accepting = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._accepting = False
        await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown()

    async def classify(self, token_ids: list[np.ndarray], timeout_s: float) -> np.ndarray:
        """P(emergency) per note, in order.

        Raises `QueueFull` at once when the notes do not fit in the queue, `ShuttingDown` after
        shutdown began, `TimeoutError` after `timeout_s` (its notes not yet run are then skipped)
        and `InferenceFailed` when the model raised.
        """
        request = self._submit(token_ids)
        return await asyncio.wait_for(request.future, timeout_s)

    def _submit(self, token_ids: list[np.ndarray]) -> _Request:
        if not self._accepting:
            raise ShuttingDown
        if len(token_ids) > self._queue.maxsize - self._queue.qsize():
            raise QueueFull
        request = _Request(len(token_ids))
        for index, ids in enumerate(token_ids):
            self._queue.put_nowait(_QueuedNote(request, index, ids))
        return request

    async def _run(self) -> None:
        while True:
            pool = await self._take_pool()
            try:
                live = [note for note in pool if note.request.live]
                for positions in plan_batches(
                    [len(note.ids) for note in live], self.max_batch_size, self.max_batch_tokens
                ):
                    # Re-checked per batch: a request may time out while earlier batches run.
                    batch = [live[p] for p in positions if live[p].request.live]
                    if batch:
                        await self._run_batch(batch)
            finally:
                for _ in pool:
                    self._queue.task_done()

    async def _take_pool(self) -> list[_QueuedNote]:
        """The first waiting note and those queued behind it; while requests arrive concurrently, more until
        a batch is full or max_wait has passed."""
        pool = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._max_wait_s if self._concurrent else 0.0)
        while True:
            while len(pool) < POOL_BATCHES * self.max_batch_size and not self._queue.empty():
                pool.append(self._queue.get_nowait())
            waiting_tokens = sum(len(note.ids) for note in pool)
            remaining_s = deadline - loop.time()
            if len(pool) >= self.max_batch_size or waiting_tokens >= self.max_batch_tokens or remaining_s <= 0:
                break
            try:
                pool.append(await asyncio.wait_for(self._queue.get(), remaining_s))
            except TimeoutError:
                break
        self._concurrent = len({id(note.request) for note in pool}) > 1
        return pool

    async def _run_batch(self, batch: list[_QueuedNote]) -> None:
        started = time.perf_counter()
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._predict, [note.ids for note in batch]
            )
        except Exception as error:  # the worker must outlive a failed batch
            logger.error("batch failed", extra={"fields": {"error": type(error).__name__, "notes": len(batch)}})
            for note in batch:
                if note.request.live:
                    note.request.future.set_exception(InferenceFailed())
            return
        longest = max(len(note.ids) for note in batch)
        self._on_batch(BatchStats(len(batch), len(batch) * longest, time.perf_counter() - started))
        for note, probability in zip(batch, probabilities, strict=True):
            if note.request.live:
                note.request.resolve(note.index, float(probability))
