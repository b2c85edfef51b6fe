"""What the transformers engine's ``stream_batch`` yields while its worker thread generates (the worker queues every
row's text so far; the consumer's Stop, or closing the stream, ends the worker within one token)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

from pubmedqa.prompts import cut_at_stop, stable_prefix


def drain(
    updates: queue.Queue[list[str] | None],
    worker: threading.Thread,
    cancel: threading.Event,
    failure: list[BaseException],
    rows: int,
    stops: Sequence[str],
) -> Iterator[list[str]]:
    """What the transformers engine's ``stream_batch`` yields while its ``worker`` thread generates: every row's text
    so far (cut at a stop sequence, without a half-written one) after each update the worker queues, until it
    queues None; then the final texts, or the worker's exception."""
    texts = [""] * rows
    ended = False
    try:
        while (update := updates.get()) is not None:
            texts = update
            yield [stable_prefix(cut_at_stop(t, stops)[0], stops).strip() for t in texts]
        ended = True
    finally:
        if not ended:  # the consumer closed the stream (Stop button, user left): end the worker too
            cancel.set()  # (only then: the caller reads a set flag as "stopped")
        worker.join(timeout=5)  # the worker notices within one token; don't leave it running behind us
    if failure:
        raise failure[0]
    yield [cut_at_stop(t, stops)[0].strip() for t in texts]
