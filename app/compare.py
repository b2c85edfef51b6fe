"""Compare requests: the same question answered by the base model and the fine-tuned one, side by side.

Both answers come from ONE batched ``generate`` call in which each row selects its adapter (PEFT
``adapter_names``), so the pair costs about one generation and uses one copy of the base weights.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from app.chat import UserInputError, clean_text, parse_settings
from pubmedqa.backends.base import ModelBackend, Variant
from pubmedqa.config import ServerSettings
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.prompts import PromptInput, PromptTooLongError, parse_decision


@dataclass
class SideResult:
    variant: str
    answer: str = ""
    ttft_s: float | None = None  # time to first token
    seconds: float | None = None
    n_tokens: int = 0
    decision: str | None = None  # by option likelihood, the shared scoring
    probabilities: dict[str, float] = field(default_factory=dict)
    stated_decision: str | None = None  # what the answer text itself starts with

    @property
    def tokens_per_s(self) -> float | None:
        return self.n_tokens / self.seconds if self.seconds and self.n_tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s}


@dataclass
class ComparisonUpdate:
    sides: list[SideResult]
    notices: list[str]
    mode: str
    done: bool = False


def stream_comparison(
    backend: ModelBackend,
    limits: ServerSettings,
    question: Any,
    context: Any,
    settings: dict[str, Any],
    cancel: threading.Event | None = None,
) -> Iterator[ComparisonUpdate]:
    """Validate, then stream both answers; the last update carries decisions, probabilities and timings.
    Without an adapter only the base side is produced, and a notice says why."""
    question_text = clean_text(question, "question", limits.max_question_chars)
    if not question_text:
        raise UserInputError("Please type a question.")
    context_text = clean_text(context, "context", limits.max_context_chars)
    generation = parse_settings(settings, limits)
    try:
        prompt = backend.prepare(PromptInput(question_text, context_text), generation)
    except PromptTooLongError as exc:
        raise UserInputError(str(exc)) from None
    loaded = backend.load()
    notices = list(prompt.notices)
    variants = [Variant.BASE]
    if loaded.adapter_loaded:
        variants.append(Variant.TUNED)
    else:
        notices.append(f"Only the base model can answer: {backend.adapter_unavailable_reason()}.")
    sides = [SideResult(v.value) for v in variants]
    start = time.perf_counter()
    for texts in backend.stream_batch([prompt] * len(variants), variants, generation, cancel):
        now = time.perf_counter() - start
        for side, text in zip(sides, texts):
            if text != side.answer:
                side.answer, side.seconds = text, now
                if side.ttft_s is None:
                    side.ttft_s = now
        yield ComparisonUpdate(sides, notices, backend.pair_mode)
    for side, probabilities in zip(sides, backend.score_decisions([prompt] * len(variants), variants)):
        side.n_tokens = backend.count_tokens(side.answer)
        side.probabilities = probabilities
        side.decision = predicted_decision(probabilities)
        side.stated_decision = parse_decision(side.answer)
    yield ComparisonUpdate(sides, notices, backend.pair_mode, done=True)
