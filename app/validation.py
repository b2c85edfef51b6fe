"""What a Chat, Compare or API request may hold, checked on the server: the question, context, history, model
choice, generation settings and evidence option as clean values, or a :class:`UserInputError` saying what to change.

The Chat and Compare tabs, ``/chat``, ``/compare`` and ``/v1`` all go through these checks, so all enforce the same
limits.
"""

from __future__ import annotations

from typing import Any, Sequence

from app.evidence import EVIDENCE_MODES, without_citation
from pubmedqa import variants
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine, GenerationSettings
from pubmedqa.prompts import FittedPrompt, PromptInput, PromptTooLongError, Turn
from pubmedqa.variants import Variant

_CONTROL_CHARS = {c: None for c in range(32) if chr(c) not in "\n\t"} | {0x7F: None}


class UserInputError(ValueError):
    """Something the user sent cannot be answered; the message says what to change."""


def parse_evidence_mode(value: Any) -> str:
    """A request's evidence option, one of :data:`app.evidence.EVIDENCE_MODES` (``True``: 'on', ``None``/``False``:
    'off')."""
    if value is None or value is False:
        return "off"
    mode = "on" if value is True else value.strip().lower() if isinstance(value, str) else value
    if mode not in EVIDENCE_MODES:
        raise UserInputError(f"Unknown evidence option {value!r}: use {', '.join(map(repr, EVIDENCE_MODES))}.")
    return mode


def clean_text(value: Any, name: str, max_chars: int) -> str:
    """``value`` as text without control characters, or a UserInputError if it is not text or too long."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserInputError(f"The {name} must be text.")
    text = value.translate(_CONTROL_CHARS).strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"), which JSON can carry but no text contains
        raise UserInputError(f"The {name} contains an invalid character (a lone UTF-16 surrogate); retype it.") from None
    if len(text) > max_chars:
        raise UserInputError(f"The {name} is {len(text):,} characters long; the limit is {max_chars:,}.")
    return text


def parse_variant(value: Any, engine: Engine) -> Variant:
    """The variant ``value`` names, or a UserInputError if it names none or the engine cannot serve it now."""
    variant = variants.from_choice(value)
    if variant is None:
        raise UserInputError(f"Unknown model choice {value!r}: use {' or '.join(map(repr, variants.CHOICES))}.")
    reason = engine.adapter_unavailable_reason()
    if variant is Variant.TUNED and reason:
        raise UserInputError(f"The fine-tuned model is not available: {reason}.")
    return variant


def parse_generation_settings(values: dict[str, Any], limits: ServerSettings) -> GenerationSettings:
    """Generation settings from a request's values (defaults for those missing), or a UserInputError saying which
    one to change."""
    defaults = GenerationSettings()
    try:
        settings = GenerationSettings(
            max_new_tokens=int(values.get("max_new_tokens", defaults.max_new_tokens)),
            temperature=float(values.get("temperature", defaults.temperature)),
            top_p=float(values.get("top_p", defaults.top_p)),
            seed=int(values.get("seed", defaults.seed)),
            repetition_penalty=float(values.get("repetition_penalty", defaults.repetition_penalty)),
            min_new_tokens=int(values.get("min_new_tokens", defaults.min_new_tokens)),
        )
    except (TypeError, ValueError, OverflowError):
        raise UserInputError("Generation settings must be numbers.") from None
    try:
        return settings.validated(limits.max_new_tokens_limit)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or Gradio's list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return " ".join(message_text(part) for part in content)
    return ""


def history_to_turns(history: Sequence[Any] | None, limits: ServerSettings) -> tuple[Turn, ...]:
    """Turns from a messages-format history (``[{"role": ..., "content": ...}, ...]``); unpaired or non-text
    messages are skipped."""
    if not history:
        return ()
    if not isinstance(history, (list, tuple)):
        raise UserInputError("The history must be a list of {role, content} messages.")
    if len(history) > limits.max_history_messages:
        raise UserInputError(
            f"The history has {len(history):,} messages; the limit is {limits.max_history_messages:,}. "
            "Press Clear to start a new conversation."
        )
    turns: list[Turn] = []
    pending_question: str | None = None
    for message in history:
        if not isinstance(message, dict):
            raise UserInputError("Each history message must be an object with 'role' and 'content'.")
        text = clean_text(message_text(message.get("content")), "history message", limits.max_context_chars)
        text = without_citation(text) if message.get("role") == "assistant" else text
        if message.get("role") == "user":
            pending_question = text
        elif message.get("role") == "assistant" and pending_question is not None and text:
            turns.append(Turn(pending_question, text))
            pending_question = None
    return tuple(turns)


def parse_question(question: Any, context: Any, limits: ServerSettings) -> tuple[str, str]:
    """The question and the optional context as clean text, or a UserInputError saying what to change."""
    question_text = clean_text(question, "question", limits.max_question_chars)
    if not question_text:
        raise UserInputError("Please type a question.")
    return question_text, clean_text(context, "context", limits.max_context_chars)


def prepare_prompt(engine: Engine, prompt_input: PromptInput, generation: GenerationSettings) -> FittedPrompt:
    """The prompt fitted to the model's window; a question too long to fit is the user's to shorten."""
    try:
        return engine.prepare(prompt_input, generation)
    except PromptTooLongError as exc:
        raise UserInputError(str(exc)) from None
