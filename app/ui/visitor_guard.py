"""What the page's events and the /chat, /compare and /evidence APIs check about who sends them.

- On a public app, heavy requests (a Compare, a Chat with a long context) are admitted when they are sent, before
  they wait in the queue (a Gradio ``validator``): one visitor may have ``heavy_in_flight`` of them queued or running
  at once and start ``heavy_per_minute`` a minute. A refused one is answered at once and never queued, so one
  visitor's pile of long requests cannot sit in front of everyone else's.
- With ``api_key`` (``PUBMEDQA_API_KEY``), the APIs need it as ``/v1`` does, checked when the call is sent; the page's
  own events stay open to every visitor (they are not callable as APIs: ``api_visibility="private"``).
- On a public app, evidence searches are limited per visitor per minute too.

Visitors are named by :func:`app.rate_limits.visitor_key` (the signed-in account, else the address the Space's proxy
saw, else the socket's), never by a header the client wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr
from gradio.context import get_blocks_context

from app.access import bearer_key_matches
from app.rate_limits import EvidenceQuota, InFlightLimiter, PerMinuteLimiter, log_refusal, visitor_key
from app.ui.sessions import session_id
from app.ui.user_messages import user_error
from pubmedqa.config import ServerSettings

API_KEY_MESSAGE = ("This API needs a key: send the header 'Authorization: Bearer <key>' (with gradio_client: "
                   "Client(url, headers={'Authorization': 'Bearer <key>'})).")


class VisitorGuard:
    """Per-visitor limits of a public app (``public``), and the API key of the /chat, /compare and /evidence APIs."""

    def __init__(self, limits: ServerSettings, public: bool, api_key: str | None = None,
                 evidence: EvidenceQuota | None = None):
        self.limits = limits
        self._heavy_rate = PerMinuteLimiter(limits.heavy_per_minute) if public else None
        self._heavy_jobs = InFlightLimiter(limits.heavy_in_flight) if public else None
        self.evidence = evidence or EvidenceQuota(limits.evidence_per_minute, public)  # shared with /v1
        self._api_key = api_key or None

    def visitor(self, request: Any) -> str:
        return visitor_key(request, self.limits.trusted_proxy_hops)

    def allow_evidence(self, request: gr.Request | None) -> bool:
        """Whether this visitor may search for evidence now (on a public app, ``evidence_per_minute`` searches a
        minute each, so that one visitor cannot spend the owner's NCBI quota); an allowed search counts."""
        return self.evidence.allow(self.visitor(request))

    def evidence_limit_message(self, request: gr.Request | None) -> str:
        return self.evidence.message(self.visitor(request))

    def check_api_caller(self, request: gr.Request | None) -> None:
        if refusal := self._key_refusal(request):
            raise user_error(refusal)

    def _key_refusal(self, request: Any) -> str | None:
        if self._api_key and not bearer_key_matches(getattr(request, "headers", None) or {}, self._api_key):
            return API_KEY_MESSAGE
        return None

    def _is_heavy(self, compare: bool, context: Any) -> bool:
        return compare or (isinstance(context, str) and len(context) > self.limits.heavy_context_chars)

    def heavy_refusal(self, request: Any, compare: bool, context: Any = "") -> str | None:
        """Admit a request when it is sent: None when it may join the queue (it then counts against its visitor until
        :meth:`heavy_job` ends), else why not."""
        if self._heavy_jobs is None or self._heavy_rate is None or not self._is_heavy(compare, context):
            return None
        visitor, session = self.visitor(request), session_id(request)
        what = "A comparison" if compare else "A question with a long context"
        if not self._heavy_jobs.admit(visitor, session):
            return (f"{what} runs the model for a long time: one visitor may have {self.limits.heavy_in_flight} such "
                    "request(s) queued or running at once on this public app. Please wait for yours to finish.")
        if not self._heavy_rate.allow(visitor):
            self._heavy_jobs.release(visitor, session)
            return (f"{what} runs the model for a long time: at most {self.limits.heavy_per_minute} such requests a "
                    f"minute per visitor on this public app. Please try again in "
                    f"{self._heavy_rate.wait_s(visitor):.0f} s.")
        return None

    @contextmanager
    def heavy_job(self, request: Any, compare: bool, context: Any = "") -> Iterator[None]:
        """Around an admitted request's work: its place is freed when it ends, however it ends."""
        try:
            yield
        finally:
            if self._heavy_jobs is not None and self._is_heavy(compare, context):
                self._heavy_jobs.release(self.visitor(request), session_id(request))

    def end_session(self, request: Any) -> None:
        """The session's requests were stopped or its page closed: whatever it had admitted no longer counts."""
        if self._heavy_jobs is not None:
            self._heavy_jobs.release_session(session_id(request))

    def validator(self, compare: bool, context_at: int | None = None, api: bool = False) -> Callable[..., list]:
        """A Gradio ``validator`` for an event whose first input is the question and whose input ``context_at`` is
        the context: refuses a heavy request past the visitor's limits (and, for an API, a call without the key)
        before it is queued, with the message on the question."""

        def validate(request: gr.Request, *values: Any) -> list[dict[str, Any]]:
            context = values[context_at] if context_at is not None and context_at < len(values) else ""
            refusal = (self._key_refusal(request) if api else None) or self.heavy_refusal(request, compare, context)
            if refusal is not None:
                log_refusal("Refused a request when it was sent: %s", refusal)
            return [gr.validate(refusal is None or i > 0, refusal or "") for i in range(len(values))]

        return validate


def register_api(fn: Callable[..., Any], validator: Callable[..., list], **kwargs: Any) -> None:
    """``gr.api(fn, **kwargs)`` whose calls ``validator`` checks when they are sent: ``gr.api`` (Gradio 6.31) takes no
    validator, so it is set on the event that ``gr.api`` registers, where the queue looks for it."""
    dependency = gr.api(fn, **kwargs)
    get_blocks_context().fns[dependency["id"]].validator = validator
