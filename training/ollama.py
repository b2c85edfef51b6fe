"""An Ollama ``Modelfile`` for an exported GGUF: the project's one prompt format as an Ollama (Go) template.

The template is not written by hand: its literal pieces are cut out of :func:`pubmedqa.prompts.render_prompt`'s own
output for marker inputs, so it renders exactly what the app, the training and the evaluation render (the tests
check it for a question alone, with a context and with earlier turns). The mapping onto Ollama's chat:

* each ``user`` message is a question, each ``assistant`` message an earlier answer (the conversation history);
* the ``system`` message, when there is one, is the abstract / context (``ollama run``: ``/set system <abstract>``;
  the API: a ``system`` message) — the format has no other place for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pubmedqa.prompts import STOP_SEQUENCES, PromptInput, Turn, render_prompt

# Markers that cannot occur in the format's own text (render_prompt strips whitespace only).
_QUESTION, _CONTEXT, _EARLIER_QUESTION, _EARLIER_ANSWER = "\x00Q\x00", "\x00C\x00", "\x00P\x00", "\x00A\x00"

DISCLAIMER = "Research demo, not medical advice: answers come from a small language model and can be wrong."


class TemplateError(ValueError):
    """The prompt format changed in a way an Ollama template cannot express."""


def _raw(inp: PromptInput) -> str:
    return render_prompt(inp, None)  # no tokenizer: the raw format (the chat-template path is the model's own)


def _split(text: str, marker: str) -> tuple[str, str]:
    before, found, after = text.partition(marker)
    if not found or marker in after:
        raise TemplateError(f"the prompt format does not hold the marker {marker!r} exactly once")
    return before, after


@dataclass(frozen=True)
class PromptPieces:
    """The literal text around the variable parts of the format, as :func:`render_prompt` produces it."""

    head: str  # before the first question, without a context
    context_head: str  # before the context
    context_tail: str  # between the context and the first question
    question_end: str  # after a question ("\nAnswer:")
    answer_start: str  # between question_end and an earlier answer (" ")
    turn_end: str  # after an earlier answer, before the next question

    @classmethod
    def from_prompts(cls) -> PromptPieces:
        head, question_end = _split(_raw(PromptInput(_QUESTION)), _QUESTION)
        context_head, rest = _split(_raw(PromptInput(_QUESTION, context=_CONTEXT)), _CONTEXT)
        context_tail, end = _split(rest, _QUESTION)
        turns = _raw(PromptInput(_QUESTION, history=(Turn(_EARLIER_QUESTION, _EARLIER_ANSWER),)))
        turns_head, rest = _split(turns, _EARLIER_QUESTION)
        answer_open, rest = _split(rest, _EARLIER_ANSWER)
        turn_end, turns_end = _split(rest, _QUESTION)
        if end != question_end or turns_end != question_end or turns_head != head:
            raise TemplateError("the text around a question depends on what comes before it")
        if not answer_open.startswith(question_end):
            raise TemplateError("an earlier answer does not follow its question's own ending")
        pieces = cls(head, context_head, context_tail, question_end, answer_open[len(question_end):], turn_end)
        # The one case not rendered above: a context and earlier turns together.
        both = PromptInput(_QUESTION, context=_CONTEXT, history=(Turn(_EARLIER_QUESTION, _EARLIER_ANSWER),))
        expected = (context_head + _CONTEXT + context_tail + _EARLIER_QUESTION + answer_open + _EARLIER_ANSWER
                    + turn_end + _QUESTION + question_end)
        if _raw(both) != expected:
            raise TemplateError("a context with earlier turns is not the two rendered separately")
        return pieces


def _literal(text: str) -> str:
    """Text for a Go template: as is, or as a quoted string action where it could be read as an action or would
    end the Modelfile's triple-quoted block."""
    if "{{" in text or '"""' in text or "\x00" in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # a JSON string is a valid Go string literal
    return text


def ollama_template() -> str:
    """The Go template that renders the project's prompt format from Ollama's ``.System`` and ``.Messages``."""
    p = PromptPieces.from_prompts()
    return (
        "{{ if .System }}" + _literal(p.context_head) + "{{ .System }}" + _literal(p.context_tail)
        + "{{ else }}" + _literal(p.head) + "{{ end }}"
        + '{{ range .Messages }}{{ if eq .Role "user" }}{{ .Content }}' + _literal(p.question_end)
        + '{{ else if eq .Role "assistant" }}' + _literal(p.answer_start) + "{{ .Content }}" + _literal(p.turn_end)
        + "{{ end }}{{ end }}"
    )


def _quoted(value: str) -> str:
    """A Modelfile argument: Ollama's parser takes quoted text verbatim (no escapes), newlines included."""
    if '"""' in value:
        raise TemplateError(f"{value!r} cannot be written in a Modelfile")
    return f'"""{value}"""' if ("\n" in value or '"' in value or value != value.strip()) else f'"{value}"'


def modelfile(gguf_name: str, *, adapter_name: str | None = None, description: str = "",
              num_ctx: int = 2304, num_predict: int = 256) -> str:
    """The Modelfile text: FROM the GGUF next to it (and ADAPTER, for a GGUF LoRA), the template, the stop sequences
    and greedy decoding, as the app answers by default."""
    lines = [
        "# Ollama Modelfile written by `python -m scripts.export` (PubMedQA chatbot project).",
        f"# {DISCLAIMER}",
        f"# {description}" if description else None,
        "#",
        "#   ollama create pubmedqa -f Modelfile && ollama run pubmedqa \"Do statins reduce mortality in sepsis?\"",
        "#",
        "# Prompt format (pubmedqa/prompts.py): each user message is a question, earlier assistant messages are the",
        "# answers before it, and a system message, if any, is the abstract / context (`/set system <abstract>`).",
        f"FROM ./{gguf_name}",
        f"ADAPTER ./{adapter_name}" if adapter_name else None,
        f'TEMPLATE """{ollama_template()}"""',
        *(f"PARAMETER stop {_quoted(stop)}" for stop in STOP_SEQUENCES),
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {num_ctx}",
        f"PARAMETER num_predict {num_predict}",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"
