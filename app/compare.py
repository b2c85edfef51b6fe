"""Compare requests: the same question answered by the base model and the fine-tuned one, side by side.

Both answers are generated at the same time on one copy of the base weights, each with its own adapter setting, so
both start within about a second and each side's timings are its own: the transformers engine decodes them as one
batch whose rows select their adapter (PEFT ``adapter_names``), the llama.cpp engine on two contexts stepped in turn,
a remote server as two concurrent requests (``Engine.pair_mode`` says which).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from app.evidence import FoundEvidence
from app.validation import parse_generation_settings, parse_question, prepare_prompt
from pubmedqa import variants
from pubmedqa.config import ServerSettings
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.engines.base import Engine
from pubmedqa.prompts import PromptInput, parse_decision
from pubmedqa.variants import Variant


@dataclass
class SideResult:
    """One model's answer in a comparison, with what the UI and the /compare API report about it."""

    variant: str  # the variant's choice name (pubmedqa.variants), which keys this side in a /compare result
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
    """One step of a streamed comparison: the base side first, then the fine-tuned one if an adapter is loaded."""

    sides: list[SideResult]
    notices: list[str]
    mode: str
    done: bool = False
    evidence: FoundEvidence | None = None  # what both answers are based on, cited at their end


def stream_comparison(
    engine: Engine,
    limits: ServerSettings,
    question: Any,
    context: Any,
    settings: dict[str, Any],
    cancel: threading.Event | None = None,
    evidence: FoundEvidence | None = None,
) -> Iterator[ComparisonUpdate]:
    """Validate, then stream both answers; the last update carries decisions, probabilities and timings.
    Without an adapter only the base side is produced, and a notice says why. With ``evidence`` holding an article,
    its abstract is both sides' context and both finished answers cite it."""
    question_text, context_text = parse_question(question, context, limits)
    if evidence is not None and evidence.article is not None:
        context_text = evidence.context
    generation = parse_generation_settings(settings, limits)
    prompt = prepare_prompt(engine, PromptInput(question_text, context_text), generation)
    notices = list(prompt.notices)
    answering = [Variant.BASE]
    if engine.load().adapter_loaded:
        answering.append(Variant.TUNED)
    else:
        notices.append(f"Only the base model can answer: {engine.adapter_unavailable_reason()}.")
    sides = [SideResult(variants.choice(variant)) for variant in answering]
    prompts = [prompt] * len(answering)
    start = time.perf_counter()
    decisions: list[dict[str, float]] = []
    for texts in engine.stream_decided(prompts, answering, generation, cancel, decisions):
        _record_progress(sides, texts, time.perf_counter() - start)
        yield ComparisonUpdate(sides, notices, engine.pair_mode, evidence=evidence)
    stopped = cancel is not None and cancel.is_set()
    for side, probabilities in zip(sides, decisions if len(decisions) == len(sides) else [{}] * len(sides)):
        side.n_tokens = engine.count_tokens(side.answer)
        side.probabilities = probabilities
        side.decision = predicted_decision(probabilities) if probabilities else None
        side.stated_decision = parse_decision(side.answer)
        if evidence is not None and not stopped:
            side.answer = evidence.cite(side.answer)
    yield ComparisonUpdate(sides, notices, engine.pair_mode, done=True, evidence=evidence)


def _record_progress(sides: list[SideResult], texts: Sequence[str], elapsed_s: float) -> None:
    # Both sides start with the request; a side's clock stops at its last new text, so a side that ended keeps its
    # own time while the other goes on.
    for side, text in zip(sides, texts):
        if text != side.answer:
            side.answer, side.seconds = text, elapsed_s
            if side.ttft_s is None:
                side.ttft_s = elapsed_s
