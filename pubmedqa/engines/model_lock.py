"""The in-process model's one-at-a-time lock, which background work (an evaluation) can step aside from.

A model generates for one request at a time. A long evaluation in the app must not hold it for half an hour, so it
runs in batches and, before each, calls :meth:`ModelLock.wait_until_idle`: while any request holds the model or waits
for it, the evaluation waits too. A visitor's request then waits at most for the evaluation batch in progress.
"""

from __future__ import annotations

import threading

_POLL_S = 0.1  # how often a waiter looks at its cancel flag


class ModelLock:
    """A lock that counts who holds or waits for it, so background work can let them go first."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False
        self._waiting = 0

    def acquire(self, cancel: threading.Event | None = None) -> bool:
        """Take the lock; with ``cancel``, give up as soon as it is set (Stop while queued). Whether it was taken."""
        with self._changed:
            self._waiting += 1
            try:
                while self._held:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._changed.wait(_POLL_S if cancel is not None else None)
                self._held = True
                return True
            finally:
                self._waiting -= 1
                self._changed.notify_all()

    def release(self) -> None:
        with self._changed:
            if not self._held:
                raise RuntimeError("release of a ModelLock that is not held")
            self._held = False
            self._changed.notify_all()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def wait_until_idle(self, cancel: threading.Event | None = None) -> None:
        """Return once nobody holds or waits for the lock (or ``cancel`` is set)."""
        with self._changed:
            while self._held or self._waiting:
                if cancel is not None and cancel.is_set():
                    return
                self._changed.wait(_POLL_S)
