"""OpenAI's response shapes: the JSON body of a finished chat or completion request, and the server-sent events
of a streamed one (built from the items of its :class:`app.openai_api.streaming.Producer`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app.openai_api.errors import as_api_error
from app.openai_api.logprobs import EchoedPrompt
from app.openai_api.parsing import ChatRequest, CompletionRequest
from app.openai_api.streaming import DONE_EVENT, Producer, sse
from pubmedqa.prompts import FittedPrompt


def response_meta(chat: bool, model: str) -> dict[str, Any]:
    """The fields every body and chunk of one response shares."""
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def chat_body(prompt: FittedPrompt, done: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": done["logprobs"],
        "finish_reason": done["finish_reason"]}],
        "usage": _usage(prompt.n_tokens, done["completion_tokens"]), "notices": prompt.notices,
        **_citations(done)}


def completion_body(prompts: list[EchoedPrompt], choices: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    completion_tokens = sum(c.pop("completion_tokens") for c in choices)
    usage = _usage(sum(len(p.ids) for p in prompts), completion_tokens)
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage}


async def chat_events(
    req: ChatRequest, prompt: FittedPrompt, producer: Producer, meta: dict[str, Any]
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**meta, "object": "chat.completion.chunk", "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""}, notices=prompt.notices)
    sent = ""
    try:
        async for kind, value in producer:
            # Done: the rest of the model's own text, then (with evidence) the citation line as its own last delta.
            texts = [value] if kind == "text" else [value.get("answer", value["text"]), value["text"]]
            for text in texts:
                if new := _new_text(text, sent):
                    yield chunk({"content": new})
                    sent = text
            if kind == "done":
                yield chunk({}, value["finish_reason"], value["logprobs"], **_citations(value))
                if req.include_usage:
                    yield _usage_event(meta, "chat.completion.chunk", prompt.n_tokens, value["completion_tokens"])
    except Exception as exc:  # the response has started: the error goes into the stream
        yield sse(as_api_error(exc).body())
    yield DONE_EVENT


async def completion_events(
    req: CompletionRequest, prompts: list[EchoedPrompt], producer: Producer, meta: dict[str, Any]
) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> str:
        return sse({**meta, "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    if req.echo:
        yield chunk(prompts[0].text)
    sent = ""
    try:
        async for kind, value in producer:
            text = value if kind == "text" else value[0]["text"]
            if new := _new_text(text, sent):
                yield chunk(new)
                sent = text
            if kind == "done":
                final = value[0]
                yield chunk("", final["finish_reason"], final["logprobs"])
                if req.include_usage:
                    yield _usage_event(meta, "text_completion", sum(len(p.ids) for p in prompts),
                                          final["completion_tokens"])
    except Exception as exc:  # the response has started: the error goes into the stream
        yield sse(as_api_error(exc).body())
    yield DONE_EVENT


def _citations(done: dict[str, Any]) -> dict[str, Any]:
    """The ``citations`` extension field of a request that asked for evidence (with the finish, when streamed)."""
    return {"citations": done["citations"]} if "citations" in done else {}


def _new_text(text: str, sent: str) -> str:
    """What ``text`` adds to what was sent already (nothing if it does not extend it)."""
    return text[len(sent):] if text.startswith(sent) else ""


def _usage_event(meta: dict[str, Any], object_: str, prompt_tokens: int, completion_tokens: int) -> str:
    return sse({**meta, "object": object_, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
