"""Log-probabilities in OpenAI's shapes: a completion's echoed prompt scored at every token
(:meth:`Engine.score_tokens`), generated tokens from the engine's scoring of a text's last tokens
(:meth:`Engine.token_logprobs`). Blocking: runs on the request's producer thread.

A completion's ``logprobs`` are aligned as OpenAI-style servers align them and lm-evaluation-harness reads them
(``token_logprobs[ctxlen:-1]``): with ``echo``, one entry per prompt token as the client sent it (a BOS the server
adds in front of a text prompt is read, not echoed), the first with ``null``, then one per generated token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from app.openai_api.errors import ApiError
from app.openai_api.parsing import CompletionRequest, Prompt, token_ids
from pubmedqa.engines.base import Engine
from pubmedqa.prompts import answer_prefix
from pubmedqa.variants import Variant

# (token text, offset, log-probability or None where the engine did not score it)
Scored = list[tuple[str, int, float | None]]


@dataclass(frozen=True)
class EchoedPrompt:
    """A completion prompt as the model reads it (``ids``, what scoring and generation both read) and as the response
    echoes it: ``text`` (a token-id prompt's tokens joined), from ``ids[echoed]`` on."""

    text: str
    ids: list[int]
    echoed: int = 0


def echoed_prompt(engine: Engine, prompt: Prompt) -> EchoedPrompt:
    """A request's prompt prepared as vLLM reads it: a text with the BOS in front unless it starts with one (the
    project's own rendered prompts do), token ids as given, checked against the vocabulary (400 otherwise)."""
    tokenizer = engine.load().tokenizer
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
        plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        added = len(ids) - len(plain) if len(ids) > len(plain) and ids[len(ids) - len(plain):] == plain else 0
        return EchoedPrompt(prompt, ids, added)
    token_ids(list(prompt), "prompt", len(tokenizer))
    return EchoedPrompt("".join(_piece(tokenizer, t) for t in prompt), list(prompt))


def scored_choice(engine: Engine, req: CompletionRequest, index: int, prompt: EchoedPrompt) -> dict[str, Any]:
    """One choice of an ``echo`` + ``logprobs`` request in one scoring pass: the prompt's tokens, then (unless
    ``max_tokens`` is 0) the greedy next token, read off the same pass."""
    with _engine_scores():
        scores = engine.score_tokens(prompt.ids, req.variant, top=req.logprobs or 0)
    tokenizer = engine.load().tokenizer
    positions = range(prompt.echoed + 1, len(prompt.ids))  # tokens scored given those before them
    tokens = [prompt.ids[prompt.echoed], *(prompt.ids[i] for i in positions)]
    values: list[float | None] = [None, *(scores.logprobs[i - 1] for i in positions)]
    tops: list[list[tuple[int, float]] | None] = [None, *(scores.top[i - 1] for i in positions)]
    text, reason = prompt.text, "length"
    if not req.score_only:
        token, value = scores.top[-1][0]
        tokens.append(token)
        values.append(value)
        tops.append(scores.top[-1])
        text += tokenizer.decode([token])
        reason = "stop" if token == tokenizer.eos_token_id else "length"
    pieces = [_piece(tokenizer, t) for t in tokens]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top_k = req.logprobs or 0
    return {"index": index, "text": text, "finish_reason": reason, "completion_tokens": 0 if req.score_only else 1,
            "logprobs": {"tokens": pieces, "text_offset": offsets, "token_logprobs": [_finite(v) for v in values],
                         "top_logprobs": [None if top is None else _top(tokenizer, top, top_k, t, v)
                                          for top, t, v in zip(tops, tokens, values)]}}


def _top(tokenizer: Any, top: Sequence[tuple[int, float]], k: int, token: int, value: float | None) -> dict[str, float]:
    """A position's ``top_logprobs``: its ``k`` most likely tokens, and the token that is there (as vLLM gives it)."""
    entries = {_piece(tokenizer, t): _finite(v) for t, v in top[:k]}
    entries.setdefault(_piece(tokenizer, token), _finite(value))
    return entries


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


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
    engine: Engine, req: CompletionRequest, prompt: EchoedPrompt, text: str
) -> dict[str, Any] | None:
    """A generated completion's ``logprobs``: its tokens (the first with its ``top`` alternatives), after the
    prompt's (as :func:`scored_choice` gives them) with ``echo``."""
    if req.logprobs is None:
        return None
    tokens, following = _generated_logprobs(engine, prompt.text, text, req.variant, req.logprobs)
    tops = ([following] + [{} for _ in tokens[1:]] if tokens else []) if req.logprobs else [{} for _ in tokens]
    generated = {"tokens": [t for t, _, _ in tokens], "text_offset": [o for _, o, _ in tokens],
                 "token_logprobs": [v for _, _, v in tokens], "top_logprobs": tops}
    if not req.echo:
        return generated
    echoed = scored_choice(engine, replace(req, score_only=True), 0, prompt)["logprobs"]
    shift = len(prompt.text)
    return {"tokens": echoed["tokens"] + generated["tokens"],
            "text_offset": echoed["text_offset"] + [o + shift for o in generated["text_offset"]],
            "token_logprobs": echoed["token_logprobs"] + generated["token_logprobs"],
            "top_logprobs": echoed["top_logprobs"] + generated["top_logprobs"]}


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
