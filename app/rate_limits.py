"""Per-visitor limits of a public page (how often one visitor may do something costly: vote, run a heavy request,
search for evidence), who a visitor is, and the one throttled log line each refusal gets.

A visitor is named by :func:`visitor_key` from what the client cannot forge: the signed-in Hugging Face account,
else the address the trusted proxy saw (the hop it appended to X-Forwarded-For; on a Space, its proxy), else the
socket's peer address, else the browser session; an MCP tool's call is its MCP client's (:mod:`app.mcp_bridge`).
Anything the client itself wrote into X-Forwarded-For is ignored, so neither a forged header nor a new session resets
a budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from app.mcp_bridge import bridged_visitor

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
_MAX_KEYS = 10_000  # beyond this, idle visitors are forgotten so the table stays small
REFUSAL_LINES_PER_MINUTE = 20  # refusals logged a minute, app-wide; the rest are counted in the next line
MAX_LINE_CHARS = 300


def visitor_key(request: Any, proxy_hops: int = 0) -> str:
    """Who sent ``request`` (a ``gr.Request``, a Starlette request, or None for a direct call). ``proxy_hops``: how
    many proxies in front of the app append to X-Forwarded-For (1 on a Space); the address the outermost of them
    appended is the visitor's, and entries before it (the client's own) are ignored."""
    inner = getattr(request, "request", None) or request  # gr.Request wraps the Starlette request
    if bridged := bridged_visitor(inner):  # Gradio's loopback call for an MCP tool: the MCP client's name
        return bridged
    user = _signed_in_user(inner)
    if user:
        return f"user:{user.lower()}"
    address = _forwarded_address(getattr(inner, "headers", None) or {}, proxy_hops) if proxy_hops > 0 else None
    address = address or getattr(getattr(inner, "client", None), "host", None)
    if address:
        return f"ip:{address}"
    return f"session:{getattr(request, 'session_hash', None) or 'anonymous'}"


def _signed_in_user(request: Any) -> str | None:
    """The Hugging Face account of a signed-in visitor: Gradio keeps it in the signed session cookie."""
    scope = getattr(request, "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else None
    info = session.get("oauth_info") if isinstance(session, dict) else None
    userinfo = info.get("userinfo") if isinstance(info, dict) else None
    name = userinfo.get("preferred_username") if isinstance(userinfo, dict) else None
    return name if isinstance(name, str) and name else None


def _forwarded_address(headers: Any, proxy_hops: int) -> str | None:
    getlist = getattr(headers, "getlist", None)
    values = getlist("x-forwarded-for") if getlist else [headers.get("x-forwarded-for", "")]
    hops = [hop.strip() for value in values for hop in str(value or "").split(",") if hop.strip()]
    return hops[-proxy_hops] if len(hops) >= proxy_hops else None


class _RefusalLog:
    """At most REFUSAL_LINES_PER_MINUTE lines a minute; past that, refusals are counted and the count is logged with
    the next line that gets through, so a flood of bad requests cannot grow the log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = -WINDOW_S
        self._lines = 0
        self._dropped = 0

    def __call__(self, message: str, *args: Any) -> None:
        with self._lock:
            now = self._clock()
            if now - self._window_start >= WINDOW_S:
                self._window_start, self._lines = now, 0
            if self._lines >= REFUSAL_LINES_PER_MINUTE:
                self._dropped += 1
                return
            self._lines += 1
            dropped, self._dropped = self._dropped, 0
        suffix = f" ({dropped} more refusals not logged)" if dropped else ""
        logger.warning("%s%s", (message % args if args else message)[:MAX_LINE_CHARS], suffix)


#: Log one refused request: one line, throttled app-wide.
log_refusal = _RefusalLog()


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


class InFlightLimiter:
    """At most ``in_flight`` admitted jobs per key at once, each held from its admission (when it is sent, before it
    waits in the queue) until :meth:`release`. A job that never runs (cancelled while queued, its page closed) is
    released by its session's end, and at the latest ``max_age_s`` after its admission."""

    def __init__(self, in_flight: int, max_age_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.in_flight = in_flight
        self._max_age_s = max_age_s
        self._clock = clock
        self._jobs: defaultdict[str, list[tuple[str, float]]] = defaultdict(list)  # key -> [(session, admitted)]
        self._lock = threading.Lock()

    def admit(self, key: str, session: str) -> bool:
        """Whether ``key`` may start one more job now; an admitted job counts until released."""
        now = self._clock()
        with self._lock:
            jobs = self._jobs[key]
            jobs[:] = [job for job in jobs if now - job[1] < self._max_age_s]
            if len(jobs) >= self.in_flight:
                return False
            jobs.append((session, now))
            return True

    def release(self, key: str, session: str) -> None:
        """One job of ``session`` has ended."""
        with self._lock:
            jobs = self._jobs.get(key, [])
            for i, job in enumerate(jobs):
                if job[0] == session:
                    del jobs[i]
                    break
            if not jobs:
                self._jobs.pop(key, None)

    def release_session(self, session: str) -> None:
        """Every job of ``session`` (its answer was stopped or its page closed, whether the job ran or not)."""
        with self._lock:
            for key in list(self._jobs):
                self._jobs[key] = [job for job in self._jobs[key] if job[0] != session]
                if not self._jobs[key]:
                    del self._jobs[key]


class EvidenceQuota:
    """The evidence searches each visitor of a public app may start a minute (the owner's NCBI quota), one budget
    for the page, ``/chat``, ``/compare``, ``/evidence`` and ``/v1`` alike; no limit on a private app."""

    def __init__(self, per_minute: int, public: bool):
        self.per_minute = per_minute
        self._limiter = PerMinuteLimiter(per_minute) if public else None

    def allow(self, visitor: str) -> bool:
        """Whether ``visitor`` may search now; an allowed search counts."""
        return self._limiter is None or self._limiter.allow(visitor)

    def wait_s(self, visitor: str) -> float:
        return self._limiter.wait_s(visitor) if self._limiter is not None else 0.0

    def message(self, visitor: str) -> str:
        return (f"At most {self.per_minute} evidence searches a minute per visitor on this public app; the next in "
                f"{self.wait_s(visitor):.0f} s.")
