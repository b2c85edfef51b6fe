"""Per-session state of the tabs' model events: their concurrency group, and the cancel flag Stop sets."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr

MODEL_EVENTS = "model"  # concurrency group of every event that runs the model


class SessionCancels:
    """One cancel flag per browser session, so Stop interrupts that session's generation at once, even while it
    is still waiting for its turn on the model."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
        return event

    def cancel(self, session: str) -> bool:
        """Stop the session's running request; whether one was running."""
        with self._lock:
            event = self._events.pop(session, None)
        if event is not None:
            event.set()
        return event is not None

    def finish(self, session: str, event: threading.Event) -> None:
        """The request holding ``event`` has ended by itself: a later Stop has nothing to stop."""
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]


def session_id(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


STOPPED = "_(stopped)_"


def mark_stopped(text: Any) -> str:
    """A partial answer as the user stopped it: what was generated, then a visible mark."""
    text = text if isinstance(text, str) else ""
    return text if text.endswith(STOPPED) else f"{text} {STOPPED}".strip()
