"""Dynamic batching with no waiting, for the models the ingress runs itself. A request that finds the
model idle runs at once, alone (the lowest latency at low load); requests that arrive while a batch
runs queue up and go together as the next batch (up to ``max_batch``), so throughput grows with load.
The batch runs in a thread: the event loop never waits on the model."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool


class Batcher:
    def __init__(self, fn: Callable[[list], list], max_batch: int = 32):
        self.fn, self.max_batch = fn, max_batch
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.running = False
        self.sizes: list[int] = []  # each batch's size, for tests and benchmarks

    async def __call__(self, item) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((item, fut))
        if not self.running:
            self.running = True
            self.task = asyncio.create_task(self._drain())  # kept: a task nobody holds may be collected
        return await fut

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                batch = [(x, f) for x, f in batch if not f.cancelled()]  # a timed-out request is not computed
                if not batch:
                    continue
                self.sizes.append(len(batch))
                try:
                    out = await run_in_threadpool(self.fn, [x for x, _ in batch])
                except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), y in zip(batch, out):
                    if not f.done():
                        f.set_result(y)
        finally:
            self.running = False
