"""The blocking work of one request on the model, run on its producer thread
(:class:`app.openai_api.streaming.Producer`). Each work yields ``("ready", what the prompt costs)`` once the request
is known to fit, then ``("text", the answer so far)`` while streaming, then ``("done", the result)`` unless the
request was stopped."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from app.evidence import evidence_for
from app.openai_api.errors import ApiError
from app.openai_api.logprobs import chat_logprobs, completion_logprobs, echoed_prompt, scored_choice
from app.openai_api.parsing import ChatRequest, CompletionRequest
from app.openai_api.streaming import Producer
from app.validation import prepare_prompt
from pubmedqa.engines.base import Engine, GenerationSettings
from pubmedqa.evidence import EvidenceSearch
from pubmedqa.prompts import FittedPrompt, cut_at_stop, stable_prefix


def chat_work(
    engine: Engine, req: ChatRequest, job: Producer, search: EvidenceSearch | None = None
) -> Iterator[tuple[str, Any]]:
    """Ready with the fitted prompt (:class:`FittedPrompt`); done with the answer, its finish reason, token count,
    log-probabilities and, when the request asked for evidence, the citations (``FoundEvidence.as_dict``): the
    answer then ends with the line citing the article it is based on (not counted as completion tokens)."""
    found = evidence_for(search, req.prompt_input.question, req.prompt_input.context, req.evidence)
    prompt_input = req.prompt_input
    if found is not None and found.article is not None:
        prompt_input = replace(prompt_input, context=found.context)
    prompt = prepare_prompt(engine, prompt_input, req.generation)
    yield "ready", prompt
    answer = ""
    for answer in engine.stream(prompt, req.variant, req.generation, job.cancel_event()):
        yield "text", _visible(answer, req.stops, final=False)
    if job.stopped:
        return
    answer = _visible(answer, req.stops, final=True)
    reason, n_tokens = _finish_reason(engine, answer, req.generation)
    logprobs = chat_logprobs(engine, prompt.text, answer, req.variant, req.top_logprobs) if req.logprobs else None
    done = {"text": answer, "finish_reason": reason, "completion_tokens": n_tokens, "logprobs": logprobs}
    if found is not None:  # "answer": the model's own text, which a stream sends before the citation line
        done |= {"text": found.cite(answer), "answer": answer, "citations": found.as_dict()}
    yield "done", done


def completion_work(engine: Engine, req: CompletionRequest, job: Producer) -> Iterator[tuple[str, Any]]:
    """Ready with the prompts (:class:`EchoedPrompt`; 400 if one does not fit or names a token the model does not
    have); done with one choice per prompt. ``echo`` with ``logprobs`` and a greedy single token (or none,
    ``max_tokens: 0``), how lm-evaluation-harness scores continuations, is one scoring pass per prompt
    (:func:`scored_choice`); anything else generates, then scores what it needs."""
    budget = engine.prompt_budget(req.generation.max_new_tokens)
    prepared = [echoed_prompt(engine, p) for p in req.prompts]
    for p in prepared:
        if len(p.ids) > budget:
            raise ApiError(400, f"The prompt has {len(p.ids):,} tokens; with "
                           f"max_tokens={req.generation.max_new_tokens} this server takes at most {budget:,}.",
                           param="prompt", code="context_length_exceeded")
    yield "ready", prepared
    if req.echo and req.logprobs is not None and (req.score_only or (
            req.generation.max_new_tokens == 1 and req.generation.temperature == 0 and not req.stream)):
        yield "done", [scored_choice(engine, req, index, p) for index, p in enumerate(prepared)]
        return
    prompts = [FittedPrompt(text=p.text, n_tokens=len(p.ids), ids=tuple(p.ids)) for p in prepared]
    texts = [""] * len(prompts)
    variants = [req.variant] * len(prompts)
    for texts in engine.stream_batch(prompts, variants, req.generation, job.cancel_event()):
        if req.stream:
            yield "text", _visible(texts[0], req.stops, final=False)
    if job.stopped:
        return
    choices = []
    for index, (prompt, text) in enumerate(zip(prepared, texts)):
        text = _visible(text, req.stops, final=True)
        reason, n_tokens = _finish_reason(engine, text, req.generation)
        choices.append({"index": index, "text": (prompt.text + text) if req.echo and not req.stream else text,
                        "logprobs": completion_logprobs(engine, req, prompt, text), "finish_reason": reason,
                        "completion_tokens": n_tokens})
    yield "done", choices


def _visible(text: str, stops: Sequence[str], final: bool) -> str:
    """``text`` cut at the request's own stop sequences; while streaming, without a half-written one."""
    if not stops:
        return text
    cut = cut_at_stop(text, stops)[0]
    return cut if final else stable_prefix(cut, stops)


def _finish_reason(engine: Engine, text: str, generation: GenerationSettings) -> tuple[str, int]:
    """``length`` if the answer used its whole token budget, else ``stop``; and its token count."""
    n_tokens = engine.count_tokens(text)
    return ("length" if n_tokens >= generation.max_new_tokens else "stop"), n_tokens
