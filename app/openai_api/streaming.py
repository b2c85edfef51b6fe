"""Bridging the blocking engine to the event loop: a producer thread whose items arrive as an async iterator,
awaiting work only while the client is still there, and the server-sent event stream of a streamed answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

DONE_EVENT = "data: [DONE]\n\n"
_END = object()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Producer:
    """Runs ``work(self)``, a blocking iterator over the model, on its own thread; its items arrive on the event
    loop. :meth:`stop` sets every event :meth:`cancel_event` handed out, which stops a generation within one token
    (also while it waits for the model)."""

    def __init__(self, work: Callable[[Producer], Iterator[Any]]):
        self._stopped = threading.Event()
        self._events: list[threading.Event] = []
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        threading.Thread(target=self._run, args=(work,), name="openai-api", daemon=True).start()

    def cancel_event(self) -> threading.Event:
        """A fresh cancel flag for one engine call (a engine sets its flag when its stream ends), set on stop."""
        event = threading.Event()
        with self._lock:
            self._events.append(event)
            if self._stopped.is_set():
                event.set()
        return event

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            events = list(self._events)
        for event in events:
            event.set()

    def _put(self, item: Any, error: BaseException | None = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (item, error))
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.stop()

    def _run(self, work: Callable[[Producer], Iterator[Any]]) -> None:
        try:
            iterator = work(self)
            try:
                for item in iterator:
                    self._put(item)
                    if self.stopped:
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # re-raised on the event loop
            self._put(_END, exc)
            return
        self._put(_END)

    def __aiter__(self) -> Producer:
        return self

    async def __anext__(self) -> Any:
        item, error = await self._items.get()
        if item is _END:
            self._items.put_nowait((item, error))  # later calls see the end too
            if error is not None:
                raise error
            raise StopAsyncIteration
        return item


async def last_item(producer: Producer) -> Any:
    last = None
    async for last in producer:
        pass
    return last


async def unless_gone(request: Request, awaitable: Awaitable[Any]) -> Any:
    """The result of ``awaitable``, or ClientGone (``awaitable`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGone()
    return task.result()


async def _until_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Returns once the client has gone (only once the request body has been read: until then ``receive`` gives
    its chunks)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(payload: Any) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that end the request's work (``on_close``) when the stream ends or the client leaves."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    await _until_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for event in self.body_iterator:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-write
        finally:
            self._on_close()
