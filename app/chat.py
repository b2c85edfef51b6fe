"""A Chat answer: a validated request (:mod:`app.validation`), then the answer streamed from the engine.

The Chat tab and the ``/chat`` API both go through :func:`stream_answer`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from app.evidence import FoundEvidence
from app.validation import history_to_turns, parse_generation_settings, parse_question, parse_variant, prepare_prompt
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine
from pubmedqa.prompts import PromptInput


@dataclass
class ChatUpdate:
    """One step of a streamed answer: the text so far, and what the user should know about the request."""

    answer: str
    notices: list[str] = field(default_factory=list)
    evidence: FoundEvidence | None = None  # what the answer is based on, cited at its end


def stream_answer(
    engine: Engine,
    limits: ServerSettings,
    question: Any,
    context: Any,
    history: Sequence[Any] | None,
    variant: Any,
    settings: dict[str, Any],
    cancel: threading.Event | None = None,
    evidence: FoundEvidence | None = None,
) -> Iterator[ChatUpdate]:
    """Validate a chat request, then yield the growing answer. Raises UserInputError for anything the user
    must change; the first update carries the notices (e.g. that the context was truncated). With ``evidence``
    holding an article, its abstract is the context and the finished answer cites it."""
    question_text, context_text = parse_question(question, context, limits)
    chosen = parse_variant(variant, engine)
    generation = parse_generation_settings(settings, limits)
    turns = history_to_turns(history, limits)
    if evidence is not None and evidence.article is not None:
        context_text = evidence.context
    prompt = prepare_prompt(engine, PromptInput(question_text, context_text, turns), generation)
    notices = prompt.notices
    yield ChatUpdate("", notices, evidence)
    answer = ""
    for answer in engine.stream(prompt, chosen, generation, cancel):
        yield ChatUpdate(answer, notices, evidence)
    if evidence is not None and answer and not (cancel is not None and cancel.is_set()):
        yield ChatUpdate(evidence.cite(answer), notices, evidence)
