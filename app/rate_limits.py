"""Per-visitor limits of a public page: how often one visitor may do something costly (vote, run a heavy request).

A visitor is named by :func:`visitor_key`: the client's address where the request carries one, else its browser
session, so opening new sessions from one machine does not reset the count.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

WINDOW_S = 60.0
_MAX_KEYS = 10_000  # beyond this, idle visitors are forgotten so the table stays small


def visitor_key(request: Any) -> str:
    """Who sent ``request`` (a ``gr.Request``, or None for a direct call): the first address of X-Forwarded-For (a
    Space's proxy sets it), else the peer's address, else the session."""
    headers = getattr(request, "headers", None) or {}
    forwarded = str(headers.get("x-forwarded-for", "")).split(",")[0].strip()
    if forwarded:
        return f"ip:{forwarded}"
    host = getattr(getattr(request, "client", None), "host", None)
    if host:
        return f"ip:{host}"
    return f"session:{getattr(request, 'session_hash', None) or 'anonymous'}"


class PerMinuteLimiter:
    """At most ``per_minute`` actions per key in any 60 seconds."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._times: defaultdict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Whether ``key`` may act now; an allowed action counts against it."""
        now = self._clock()
        with self._lock:
            recent = self._times[key]
            while recent and now - recent[0] >= WINDOW_S:
                recent.popleft()
            if len(recent) >= self.per_minute:
                return False
            recent.append(now)
            if len(self._times) > _MAX_KEYS:
                for idle in [k for k, v in self._times.items() if not v or now - v[-1] >= WINDOW_S]:
                    del self._times[idle]
            return True

    def wait_s(self, key: str) -> float:
        """Seconds until ``key`` may act again (0 when it may now)."""
        now = self._clock()
        with self._lock:
            recent = self._times.get(key)
            if not recent or len(recent) < self.per_minute:
                return 0.0
            return max(0.0, WINDOW_S - (now - recent[0]))
