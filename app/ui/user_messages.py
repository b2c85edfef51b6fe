"""What a visitor is told: a refusal they can act on (a toast, one throttled log line), a failure (a generic toast,
the traceback in the log), and a request's notices."""

from __future__ import annotations

import logging
from typing import Iterator, TypeVar

import gradio as gr

from app.rate_limits import log_refusal
from app.validation import UserInputError
from pubmedqa.engines.base import AdapterUnavailableError, EngineError
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def user_error(message: str) -> gr.Error:
    """The error a user sees in a toast, for something they can act on: one throttled log line, no traceback (Gradio
    would print one for each, and a burst of bad requests would flood the log)."""
    log_refusal("Refused a request: %s", message)
    return gr.Error(message, print_exception=False)


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


def notices_markdown(notices: list[str]) -> str:
    return "\n".join(f"ℹ️ {notice}" for notice in notices)
