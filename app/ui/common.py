"""UI pieces shared by the tabs: generation settings controls, per-session cancellation (Stop) and error
reporting."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import gradio as gr

from app.chat import UserInputError
from app.rate_limits import log_refusal
from pubmedqa.engines.base import AdapterUnavailableError, EngineError, GenerationSettings
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
    """The error a user sees in a toast, for something they can act on: one throttled log line, no traceback (Gradio
    would print one for each, and a burst of bad requests would flood the log)."""
    log_refusal("Refused a request: %s", message)
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
    except (UserInputError, AdapterUnavailableError, EngineError, ModelLoadError) as exc:
        raise user_error(str(exc)) from None
    except Exception as exc:
        logger.exception("Generation failed")
        raise gr.Error(f"Generation failed ({type(exc).__name__}). Please try again.", print_exception=False) from None


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
