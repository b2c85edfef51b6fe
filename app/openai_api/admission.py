"""The API's place in the page's queue: how many requests generate at once, and how many may wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from app.openai_api.errors import ApiError


class AdmissionQueue:
    """The API's side of the page's queue: ``concurrency_limit`` requests generate at once, and a request that has to
    wait is refused (429) when ``queue_size`` are waiting already, the page's waiting events included. The model
    itself serialises generation between page and API (the engine's lock)."""

    def __init__(self, concurrency_limit: int, queue_size: int, page_waiting: Callable[[], int] = lambda: 0):
        self.concurrency_limit = max(1, concurrency_limit)
        self.queue_size = max(0, queue_size)
        self._page_waiting = page_waiting
        self._admitted = 0  # holding a slot or waiting for one
        self._slots = asyncio.Semaphore(self.concurrency_limit)  # FIFO

    @property
    def waiting(self) -> int:
        return max(0, self._admitted - self.concurrency_limit)

    def admit(self) -> Ticket:
        """A place in the queue, or a 429 ApiError when it is full."""
        waiting_after = self._admitted + 1 - self.concurrency_limit
        if waiting_after > 0:
            total = waiting_after - 1 + self._page_waiting()
            if total >= self.queue_size:
                raise ApiError(
                    429,
                    f"The server is busy: {total} requests are waiting (the limit is {self.queue_size}). "
                    "Please try again shortly.",
                    code="queue_full", type_="rate_limit_error", headers={"Retry-After": "5"},
                )
        self._admitted += 1
        return Ticket(self)


class Ticket:
    """A request's place in an :class:`AdmissionQueue`: waiting until :meth:`acquire` returns, then generating.
    :meth:`release` (idempotent) gives the place up either way."""

    def __init__(self, queue: AdmissionQueue):
        self._queue, self._holds_slot, self._released = queue, False, False

    async def acquire(self) -> None:
        await self._queue._slots.acquire()
        self._holds_slot = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._queue._admitted -= 1
        if self._holds_slot:
            self._queue._slots.release()


def page_queue_length(page: Any) -> int:
    """Events waiting in the page's Gradio queue (Gradio has no public accessor: ``Blocks._queue``; 0 without it)."""
    try:
        return len(page._queue)
    except (AttributeError, TypeError):
        return 0
