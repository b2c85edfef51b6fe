"""Log-probabilities in OpenAI's shapes, from the engine's scoring of the last tokens of a text
(:meth:`Engine.token_logprobs`). Blocking: runs on the request's producer thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from app.openai_api.errors import ApiError
from app.openai_api.parsing import CompletionRequest
from pubmedqa.engines.base import Engine
from pubmedqa.prompts import answer_prefix
from pubmedqa.variants import Variant

# (token text, offset, log-probability or None where the engine did not score it)
Scored = list[tuple[str, int, float | None]]


def chat_logprobs(engine: Engine, prompt: str, answer: str, variant: Variant, top: int) -> dict[str, Any]:
    """A chat choice's ``logprobs``: ``answer``'s tokens, the first with its ``top`` alternatives."""
    tokens, following = _generated_logprobs(engine, prompt, answer, variant, top)
    return {"content": [
        {"token": t, "logprob": v, "bytes": list(t.encode()),
         "top_logprobs": [{"token": a, "logprob": p, "bytes": list(a.encode())} for a, p in following.items()]
         if i == 0 else []}
        for i, (t, _, v) in enumerate(tokens)
    ]}


def completion_logprobs(
    engine: Engine, req: CompletionRequest, prompt: str, text: str
) -> dict[str, Any] | None:
    """A completion choice's ``logprobs``: with ``echo`` the prompt's tokens (the last 16 scored, where the answer
    options are; null before them), otherwise the generated ones."""
    if req.logprobs is None:
        return None
    if req.echo:
        with _engine_scores():
            tokens, _ = engine.token_logprobs(prompt, req.variant, top=req.logprobs)
        return _completion_shape(tokens, None)
    tokens, following = _generated_logprobs(engine, prompt, text, req.variant, req.logprobs)
    tops = ([following] + [{} for _ in tokens[1:]] if tokens else []) if req.logprobs else [{} for _ in tokens]
    return _completion_shape(tokens, tops)


def _completion_shape(tokens: Scored, tops: list[dict[str, float | None]] | None) -> dict[str, Any]:
    return {"tokens": [t for t, _, _ in tokens], "text_offset": [o for _, o, _ in tokens],
            "token_logprobs": [v for _, _, v in tokens], "top_logprobs": tops}


def _generated_logprobs(
    engine: Engine, context: str, answer: str, variant: Variant, top: int
) -> tuple[Scored, dict[str, Any]]:
    """The tokens of ``answer`` (text, offset in the answer, log-probability) as the model scores them after
    ``context``, and the ``top`` most likely first tokens after ``context``."""
    with _engine_scores():
        following = engine.token_logprobs(context, variant, top=top)[1] if top else {}
        following = {token: _finite(value) for token, value in following.items()}
        if not answer:
            return [], following
        text = context + answer_prefix(engine.load().tokenizer) + answer
        pieces, _ = engine.token_logprobs(text, variant)
        tokens = [(piece, at) for piece, at, _ in pieces if at >= len(context)]
        scored = _score_all(engine, text, variant, pieces, [at for _, at in tokens])
    answer_start = len(text) - len(answer)
    scored_tokens = [(piece, max(0, at - answer_start), _finite(scored.get(at))) for piece, at in tokens]
    return scored_tokens, following


def _score_all(
    engine: Engine, text: str, variant: Variant, pieces: Scored, offsets: list[int]
) -> dict[int, float]:
    """The log-probabilities of the tokens of ``text`` at ``offsets``, given the engine's first pass (``pieces``).
    A pass scores only the last 16 tokens, so earlier ones are scored on shorter prefixes of ``text``: one pass
    per 16 tokens of a long answer."""
    scored = {at: value for _, at, value in pieces if value is not None}
    end = len(text)
    while missing := [at for at in offsets if at not in scored]:
        later = [at for at in offsets if at > missing[-1]]
        cut = later[0] if later else len(text)
        if cut >= end:
            break
        end = cut
        more, _ = engine.token_logprobs(text[:cut], variant)
        new = {at: value for _, at, value in more if value is not None and at not in scored}
        if not new:
            break
        scored.update(new)
    return scored


@contextlib.contextmanager
def _engine_scores() -> Iterator[None]:
    """An engine without log-probabilities (NotImplementedError) is the caller's 400."""
    try:
        yield
    except NotImplementedError:
        raise ApiError(400, "Log-probabilities are not available with this engine.", param="logprobs") from None


def _finite(value: float | None) -> float | None:
    """A log-probability JSON can carry: -inf (a token the model rules out) as -9999, as vLLM sends it."""
    return None if value is None else max(value, -9999.0)
