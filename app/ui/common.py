"""UI pieces shared by the tabs: generation settings controls, per-session cancellation (Stop), per-visitor limits
of a public page, and error reporting."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import gradio as gr

from app.access import bearer_key_matches
from app.chat import UserInputError
from app.rate_limits import PerMinuteLimiter, visitor_key
from pubmedqa.backends.base import AdapterUnavailableError, BackendError, GenerationSettings
from pubmedqa.config import ServerSettings
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger(__name__)
T = TypeVar("T")

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


STOPPED = "_(stopped)_"


def mark_stopped(text: Any) -> str:
    """A partial answer as the user stopped it: what was generated, then a visible mark."""
    text = text if isinstance(text, str) else ""
    return text if text.endswith(STOPPED) else f"{text} {STOPPED}".strip()


def user_error(message: str) -> gr.Error:
    """The error a user sees in a toast, for something they can act on: logged by nobody (Gradio would print a
    traceback for each, and a burst of bad requests would flood the log)."""
    return gr.Error(message, print_exception=False)


def session_id(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def notices_markdown(notices: list[str]) -> str:
    return "\n".join(f"ℹ️ {notice}" for notice in notices)


def generation_settings(
    max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any, repetition_penalty: Any, min_new_tokens: Any
) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
            "repetition_penalty": repetition_penalty, "min_new_tokens": min_new_tokens}


def run_guarded(updates: Iterator[T]) -> Iterator[T]:
    """Turn the errors a user can act on into a gr.Error with the message, and anything else into a generic one
    (logged with its traceback), so a failing request never takes the app down."""
    try:
        yield from updates
    except (UserInputError, AdapterUnavailableError, BackendError, ModelLoadError) as exc:
        raise user_error(str(exc)) from None
    except Exception as exc:
        logger.exception("Generation failed")
        raise user_error(f"Generation failed ({type(exc).__name__}). Please try again.") from None  # logged above


class VisitorGuard:
    """What the page's events and the /chat and /compare APIs check before running the model.

    - On a public app, heavy requests (a Compare, a Chat with a long context) are limited per visitor per minute,
      so that one visitor cannot hold the one model for minutes; a refused one ends at once instead of waiting.
    - With ``api_key`` (``PUBMEDQA_API_KEY``), the /chat and /compare APIs need it as ``/v1`` does; the page's own
      events stay open to every visitor (they are not callable as APIs: ``api_visibility="private"``).
    - On a public app, evidence searches are limited per visitor per minute too.
    """

    def __init__(self, limits: ServerSettings, public: bool, api_key: str | None = None):
        self.limits = limits
        self._heavy = PerMinuteLimiter(limits.heavy_per_minute) if public else None
        self._evidence = PerMinuteLimiter(limits.evidence_per_minute) if public else None
        self._api_key = api_key or None

    def allow_evidence(self, request: gr.Request | None) -> bool:
        """Whether this visitor may search for evidence now (on a public app, ``evidence_per_minute`` searches a
        minute each, so that one visitor cannot spend the owner's NCBI quota); an allowed search counts."""
        return self._evidence is None or self._evidence.allow(visitor_key(request))

    def evidence_limit_message(self, request: gr.Request | None) -> str:
        wait = self._evidence.wait_s(visitor_key(request)) if self._evidence is not None else 0
        return (f"At most {self.limits.evidence_per_minute} evidence searches a minute per visitor on this public "
                f"app; the next in {wait:.0f} s.")

    def check_api_caller(self, request: gr.Request | None) -> None:
        if self._api_key and not bearer_key_matches(getattr(request, "headers", None) or {}, self._api_key):
            raise user_error("This API needs a key: send the header 'Authorization: Bearer <key>' (with "
                             "gradio_client: Client(url, headers={'Authorization': 'Bearer <key>'})).")

    def check_heavy(self, request: gr.Request | None, compare: bool, context: Any = "") -> None:
        long_context = isinstance(context, str) and len(context) > self.limits.heavy_context_chars
        if self._heavy is None or not (compare or long_context):
            return
        visitor = visitor_key(request)
        if not self._heavy.allow(visitor):
            what = "A comparison" if compare else "A question with a long context"
            raise user_error(
                f"{what} runs the model for a long time: at most {self.limits.heavy_per_minute} such requests a "
                f"minute per visitor on this public app. Please try again in {self._heavy.wait_s(visitor):.0f} s."
            )


@dataclass
class SettingsControls:
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number
    repetition_penalty: gr.Slider
    min_new_tokens: gr.Slider

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.max_new_tokens, self.temperature, self.top_p, self.seed, self.repetition_penalty, self.min_new_tokens]


def build_settings_controls(limits: ServerSettings) -> SettingsControls:
    defaults = GenerationSettings()
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(
            1, limits.max_new_tokens_limit, value=defaults.max_new_tokens, step=1, label="Max new tokens"
        )
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
        seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
        repetition_penalty = gr.Slider(
            1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty (1 = off)",
            info="Keeps answers from repeating themselves; it counts the answer's own words only, so the "
            "yes/no/maybe decision stays the model's own.",
        )
        min_new_tokens = gr.Slider(
            0, 16, value=defaults.min_new_tokens, step=1, label="Minimum answer tokens (0 = off)",
            info="No end before this many tokens, so an answer explains its decision instead of stopping at 'yes.'.",
        )
    return SettingsControls(max_new_tokens, temperature, top_p, seed, repetition_penalty, min_new_tokens)
