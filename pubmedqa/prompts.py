"""The one prompt format shared by training, evaluation and the app.

Training builds (prompt, completion) pairs with :func:`render_prompt` and :func:`format_completion`; the app and
the evaluation render prompts with the same functions, so the text a model was tuned on is byte-for-byte the
text it is asked with. Models that ship a chat template get the same content through that template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

ANSWER_OPTIONS: tuple[str, ...] = ("yes", "no", "maybe")

INSTRUCTION = (
    "Answer the biomedical research question with yes, no or maybe, "
    "then explain the answer in one or two sentences based on the context."
)

# A base model continues the document it is given: after its answer it tends to invent the next
# "Question:". These strings end an answer in the raw format.
STOP_SEQUENCES: tuple[str, ...] = ("\nQuestion:", "\nContext:", "\nAnswer:", "\n\n")

TRUNCATION_MARK = " [...]"


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass(frozen=True)
class PromptInput:
    """What the user asked: a question, an optional abstract/context and earlier turns of the conversation."""

    question: str
    context: str = ""
    history: tuple[Turn, ...] = field(default_factory=tuple)


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_answer(decision: str, explanation: str) -> str:
    """The reference answer a model is tuned to give: the decision first, then the explanation."""
    decision = decision.strip().lower()
    if decision not in ANSWER_OPTIONS:
        raise ValueError(f"decision must be one of {ANSWER_OPTIONS}, got {decision!r}")
    explanation = " ".join(explanation.split())
    return f"{decision}. {explanation}" if explanation else f"{decision}."


#: What a fine-tuned answer explains its decision with: the abstract's whole conclusion, or its first sentence.
ANSWER_TARGETS: tuple[str, ...] = ("first_sentence", "conclusion")

# A sentence ends at ., ! or ? before a capital, a digit or a bracket, unless it ends in one of these abbreviations.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "et al.", "approx.", "fig.", "no.", "dr.", "ca.", "cf.")


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (all of it when it has one)."""
    text = " ".join(text.split())
    for match in _SENTENCE_END.finditer(text):
        head = text[: match.start()]
        if not head.lower().endswith(_ABBREVIATIONS):
            return head
    return text


def training_answer(decision: str, conclusion: str, target: str) -> str:
    """The answer a model is tuned to give for ``target`` (one of :data:`ANSWER_TARGETS`)."""
    if target not in ANSWER_TARGETS:
        raise ValueError(f"answer target must be one of {ANSWER_TARGETS}, got {target!r}")
    return format_answer(decision, first_sentence(conclusion) if target == "first_sentence" else conclusion)


def answer_prefix(tokenizer: Any) -> str:
    """Text between the end of a raw prompt ("Answer:") and the answer itself."""
    return "" if uses_chat_template(tokenizer) else " "


def format_completion(answer: str, tokenizer: Any) -> str:
    """The completion that follows :func:`render_prompt` in training data."""
    return answer_prefix(tokenizer) + answer


def _raw_prompt(inp: PromptInput) -> str:
    parts = [INSTRUCTION, ""]
    if inp.context.strip():
        parts += [f"Context: {inp.context.strip()}", ""]
    for turn in inp.history:
        parts += [f"Question: {turn.question.strip()}", f"Answer: {turn.answer.strip()}", ""]
    parts += [f"Question: {inp.question.strip()}", "Answer:"]
    return "\n".join(parts)


def chat_messages(inp: PromptInput) -> list[dict[str, str]]:
    """The same content as the raw format, as chat messages (instruction and context in the first user turn,
    because several chat templates reject a system role)."""
    preamble = INSTRUCTION + (f"\n\nContext: {inp.context.strip()}" if inp.context.strip() else "") + "\n\n"
    messages: list[dict[str, str]] = []
    for turn in inp.history:
        messages += [
            {"role": "user", "content": turn.question.strip()},
            {"role": "assistant", "content": turn.answer.strip()},
        ]
    messages.append({"role": "user", "content": inp.question.strip()})
    messages[0] = {"role": "user", "content": preamble + messages[0]["content"]}
    return messages


def render_prompt(inp: PromptInput, tokenizer: Any) -> str:
    """The prompt text for ``inp``: the model's chat template when it has one, the project's raw format otherwise."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(chat_messages(inp), add_generation_prompt=True, tokenize=False)
    return _raw_prompt(inp)


def encode_prompt(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered prompt. Chat templates already contain the BOS token; the raw format does not."""
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"]


def prompt_ids(prompt: FittedPrompt, tokenizer: Any) -> list[int]:
    """What the model reads of ``prompt``: its token ids where it came as ids, else its text encoded."""
    return list(prompt.ids) if prompt.ids is not None else encode_prompt(prompt.text, tokenizer)


def shared_prompt_start(tokenizer: Any) -> list[int]:
    """The token ids every prompt begins with, whatever its question, context and history (the instruction): the
    common start of two prompts that share nothing else. An engine may read it once for all prompts."""
    first = encode_prompt(render_prompt(PromptInput("Is A B?"), tokenizer), tokenizer)
    second = encode_prompt(render_prompt(PromptInput("Does C D?", context="E."), tokenizer), tokenizer)
    n = 0
    while n < min(len(first), len(second)) and first[n] == second[n]:
        n += 1
    return first[:n]


class PromptTooLongError(ValueError):
    """The question alone does not fit in the model's prompt budget."""


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    n_tokens: int
    context_truncated: bool = False
    dropped_turns: int = 0
    ids: tuple[int, ...] | None = None  # token ids read as given instead of ``text`` (a /v1 token-id prompt)

    @property
    def notices(self) -> list[str]:
        notes = []
        if self.dropped_turns:
            notes.append(f"The {self.dropped_turns} oldest turn(s) of the conversation were left out to fit the model.")
        if self.context_truncated:
            notes.append("The context was too long for the model and was truncated.")
        return notes


def fit_prompt(inp: PromptInput, tokenizer: Any, max_tokens: int) -> FittedPrompt:
    """Render ``inp`` within ``max_tokens``: drop the oldest turns first, then shorten the context.

    The question is never shortened; if it alone does not fit, :class:`PromptTooLongError` says so.
    """
    text = render_prompt(inp, tokenizer)
    n_tokens = len(encode_prompt(text, tokenizer))
    dropped = 0
    while n_tokens > max_tokens and inp.history:
        inp = replace(inp, history=inp.history[1:])
        dropped += 1
        text = render_prompt(inp, tokenizer)
        n_tokens = len(encode_prompt(text, tokenizer))
    truncated = False
    context_ids = tokenizer(inp.context, add_special_tokens=False)["input_ids"] if inp.context.strip() else []
    # Token counts of a prefix are not exactly additive, so shorten by the overflow and check again.
    while n_tokens > max_tokens and context_ids:
        keep = max(0, len(context_ids) - (n_tokens - max_tokens) - 8)
        context_ids = context_ids[:keep]
        context = tokenizer.decode(context_ids, skip_special_tokens=True).strip()
        inp = replace(inp, context=context + TRUNCATION_MARK if context else "")
        truncated = True
        text = render_prompt(inp, tokenizer)
        n_tokens = len(encode_prompt(text, tokenizer))
    if n_tokens > max_tokens:
        raise PromptTooLongError(
            f"The question is too long for this model: the prompt needs {n_tokens} tokens, the limit is {max_tokens}. "
            "Please shorten the question (put background text in the context box instead)."
        )
    return FittedPrompt(text=text, n_tokens=n_tokens, context_truncated=truncated, dropped_turns=dropped)


def cut_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> tuple[str, bool]:
    """Cut generated ``text`` at the first stop sequence. Returns (text, stopped)."""
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


def stable_prefix(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The part of streamed ``text`` that can be shown now: a tail that may be the start of a stop sequence
    is held back until the next tokens tell."""
    for keep in range(len(text)):
        tail = text[keep:]
        if any(stop.startswith(tail) for stop in stops):
            return text[:keep]
    return text


_DECISION_RE = re.compile(r"^\W*(yes|no|maybe)\b", re.IGNORECASE)


def parse_decision(answer: str) -> str | None:
    """The yes/no/maybe decision an answer starts with, or None."""
    match = _DECISION_RE.match(answer)
    return match.group(1).lower() if match else None
