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
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.engines.base import Engine
from pubmedqa.prompts import PromptInput


@dataclass
class ChatUpdate:
    """One step of a streamed answer: the model's text so far, and what the user should know about the request."""

    answer: str
    notices: list[str] = field(default_factory=list)
    evidence: FoundEvidence | None = None  # what the answer is based on, cited at its end
    done: bool = False  # the last update of an answer that was not stopped
    probabilities: dict[str, float] = field(default_factory=dict)  # yes/no/maybe option scores, once done

    @property
    def decision(self) -> str | None:
        """The option the scores pick (the shared decision, as Compare and the evaluation make it)."""
        return predicted_decision(self.probabilities) if self.probabilities else None

    @property
    def cited(self) -> str:
        """The answer as the API returns it: once done, with the line citing its article."""
        return self.evidence.cite(self.answer) if self.done and self.evidence is not None else self.answer


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
    must change; the first update carries the notices (e.g. that the context was truncated), the last one of an
    answer that was not stopped its option scores. With ``evidence`` holding an article, its abstract is the
    context and the finished answer cites it."""
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
    decisions: list[dict[str, float]] = []
    for texts in engine.stream_decided([prompt], [chosen], generation, cancel, decisions):
        answer = texts[0]
        yield ChatUpdate(answer, notices, evidence)
    if cancel is not None and cancel.is_set():
        return
    yield ChatUpdate(answer, notices, evidence, done=True, probabilities=decisions[0] if decisions else {})
