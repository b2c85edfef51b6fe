"""The app's OpenAI-compatible API, served under ``/v1`` beside the page: one process, one port (see
:func:`app.main.build_server`), one model, the same limits and the same queue.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions`` and ``POST /v1/completions``,
streamed (server-sent events, ending with ``data: [DONE]``) or not, with ``logprobs`` where the engine has them.

- **Models.** ``pubmedqa-base`` and, while the LoRA adapter is loaded, ``pubmedqa-tuned``; ``base``, ``tuned`` and
  ``fine-tuned`` are accepted as aliases.
- **Chat** turns the messages into the project's one prompt format through :mod:`app.chat`, as the Chat tab does:
  the last message is the question (a ``user`` message), earlier ``user``/``assistant`` pairs are the
  conversation, and the text of ``system`` (or ``developer``) messages is the abstract/context; a non-standard
  string field ``context`` is accepted too (appended after the system text). Over-long conversations and contexts
  are fitted to the model's window as on the page (``notices`` in the response says so).
- **Completions** take a raw prompt (a string, or a list of up to :data:`MAX_PROMPTS` strings), as vLLM does: what
  the remote backend (:mod:`pubmedqa.backends.remote`) sends, ``echo`` with ``logprobs`` included.
- **Limits** are the page's (:class:`pubmedqa.config.ServerSettings`): question, context and history lengths,
  ``max_tokens`` up to ``max_new_tokens_limit``; ``concurrency_limit`` requests generate at once and at most
  ``queue_size`` wait, counting the page's waiting events; beyond that, 429. Bodies over :data:`MAX_BODY_BYTES` get
  413 without being read. Defaults are the app's (greedy, 256 new tokens, capped by the limit), not OpenAI's.
- **Key.** When ``PUBMEDQA_API_KEY`` is set, requests must carry ``Authorization: Bearer <key>`` (401 otherwise);
  without it the API is as open as the page. The key is read from the environment only and never logged.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.chat import (
    UserInputError,
    history_to_turns,
    parse_generation_settings,
    parse_question,
    parse_variant,
    prepare_prompt,
)
from pubmedqa.backends.base import AdapterUnavailableError, BackendError, GenerationSettings, ModelBackend, Variant
from pubmedqa.config import ServerSettings
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import FittedPrompt, PromptInput, answer_prefix, cut_at_stop, stable_prefix

logger = logging.getLogger(__name__)

API_KEY_ENV = "PUBMEDQA_API_KEY"  # read from the environment only, never a flag, never logged
BASE_MODEL_NAME = "pubmedqa-base"
ADAPTER_MODEL_NAME = "pubmedqa-tuned"
MODEL_ALIASES: dict[str, Variant] = {"base": Variant.BASE, "tuned": Variant.TUNED, "fine-tuned": Variant.TUNED}
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt the limits allow
MAX_PROMPTS = 4  # prompts in one /v1/completions request (the remote backend sends 3: one per answer option)
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
# A raw prompt may hold the instruction and earlier turns beside the question and the context.
PROMPT_OVERHEAD_CHARS = 4000
_ROLES = {"system", "developer", "user", "assistant"}
_STARTED = int(time.time())


# ------------------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type_: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def _as_api_error(exc: BaseException) -> ApiError:
    """What a failure means to an API caller (the same errors the page turns into messages)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserInputError):
        return ApiError(400, str(exc))
    if isinstance(exc, AdapterUnavailableError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelLoadError):
        return ApiError(503, f"The model is not available: {exc}", code="model_unavailable")
    if isinstance(exc, BackendError):
        return ApiError(502, str(exc), code="backend_error")
    logger.error("API request failed", exc_info=exc)
    return ApiError(500, f"Generation failed ({type(exc).__name__}). Please try again.")


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# -------------------------------------------------------------------------------------------- request parsing
def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}.", param=name, code="invalid_type")
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    return tuple(s for s in stops if s)


def _generation(
    body: dict[str, Any], limits: ServerSettings, token_fields: Sequence[str], defaults: GenerationSettings
) -> GenerationSettings:
    """The generation settings of a request, checked against the page's limits
    (:func:`app.chat.parse_generation_settings`)."""
    max_tokens, token_field = min(defaults.max_new_tokens, limits.max_new_tokens_limit), token_fields[-1]
    for name in token_fields:
        value = _field(body, name, (int,), "an integer")
        if value is not None:
            max_tokens, token_field = value, name
            break
    if not 1 <= max_tokens <= limits.max_new_tokens_limit:
        raise ApiError(
            400,
            f"'{token_field}' is {max_tokens:,}; this server takes 1 to {limits.max_new_tokens_limit:,}.",
            param=token_field, code="max_tokens_exceeded" if max_tokens > 1 else "invalid_value",
        )
    if _field(body, "n", (int,), "an integer", 1) != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _field(body, name, (int, float), "a number", 0):
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty' (1 = off).", param=name)
    values = {
        "max_new_tokens": max_tokens,
        "temperature": _field(body, "temperature", (int, float), "a number", defaults.temperature),
        "top_p": _field(body, "top_p", (int, float), "a number", defaults.top_p),
        "seed": _field(body, "seed", (int,), "an integer", defaults.seed),
        # vLLM's and TGI's extension of the OpenAI API, which the remote backend sends
        "repetition_penalty": _field(body, "repetition_penalty", (int, float), "a number", defaults.repetition_penalty),
    }
    return parse_generation_settings(values, limits)


# The page's defaults for chat; for raw completions a missing repetition_penalty means off, as on vLLM (the remote
# backend sends it only when it is not 1).
CHAT_DEFAULTS = GenerationSettings()
COMPLETION_DEFAULTS = replace(GenerationSettings(), repetition_penalty=1.0)


def _content_text(content: Any, index: int) -> str:
    """A message's text: a string, or a list of text parts (``{"type": "text", "text": ...}``)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, "Only text content is supported.", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ApiError(400, "A message's content must be a string or a list of text parts.",
                   param=f"messages[{index}].content", code="invalid_type")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    variant: Variant
    prompt_input: PromptInput
    generation: GenerationSettings
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    variant: Variant
    prompts: tuple[str, ...]
    generation: GenerationSettings
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None


def _common(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _field(body, "stream", (bool,), "true or false", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    return stream, bool(stream and options.get("include_usage"))


# ---------------------------------------------------------------------------------------------- the queue
class AdmissionQueue:
    """The API's side of the page's queue: ``concurrency_limit`` requests generate at once, and a request that has to
    wait is refused (429) when ``queue_size`` are waiting already, the page's waiting events included. The model
    itself serialises generation between page and API (the backend's lock)."""

    def __init__(self, concurrency_limit: int, queue_size: int, page_waiting: Callable[[], int] = lambda: 0):
        self.concurrency_limit = max(1, concurrency_limit)
        self.queue_size = max(0, queue_size)
        self._page_waiting = page_waiting
        self._admitted = 0  # holding a slot or waiting for one
        self._slots = asyncio.Semaphore(self.concurrency_limit)  # FIFO

    @property
    def waiting(self) -> int:
        return max(0, self._admitted - self.concurrency_limit)

    def admit(self) -> _Ticket:
        """A place in the queue, or a 429 ApiError when it is full."""
        waiting_after = self._admitted + 1 - self.concurrency_limit
        if waiting_after > 0:
            total = waiting_after - 1 + self._page_waiting()
            if total >= self.queue_size:
                raise ApiError(
                    429,
                    f"The server is busy: {total} requests are waiting (the limit is {self.queue_size}). "
                    "Please try again shortly.",
                    code="queue_full", type_="rate_limit_error", headers={"Retry-After": "5"},
                )
        self._admitted += 1
        return _Ticket(self)


class _Ticket:
    def __init__(self, queue: AdmissionQueue):
        self._queue, self._holds_slot, self._released = queue, False, False

    async def acquire(self) -> None:
        await self._queue._slots.acquire()
        self._holds_slot = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._queue._admitted -= 1
        if self._holds_slot:
            self._queue._slots.release()


def page_queue_length(page: Any) -> int:
    """Events waiting in the page's Gradio queue (Gradio has no public accessor: ``Blocks._queue``; 0 without it)."""
    try:
        return len(page._queue)
    except (AttributeError, TypeError):
        return 0


# ------------------------------------------------------------------------------------ running on the model
_END = object()


class _Producer:
    """Runs ``work(self)``, a blocking iterator over the model, on its own thread; its items arrive on the event
    loop. :meth:`stop` sets every event :meth:`cancel_event` handed out, which stops a generation within one token
    (also while it waits for the model)."""

    def __init__(self, work: Callable[[_Producer], Iterator[Any]]):
        self._stopped = threading.Event()
        self._events: list[threading.Event] = []
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        threading.Thread(target=self._run, args=(work,), name="openai-api", daemon=True).start()

    def cancel_event(self) -> threading.Event:
        """A fresh cancel flag for one backend call (a backend sets its flag when its stream ends), set on stop."""
        event = threading.Event()
        with self._lock:
            self._events.append(event)
            if self._stopped.is_set():
                event.set()
        return event

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            events = list(self._events)
        for event in events:
            event.set()

    def _put(self, item: Any, error: BaseException | None = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (item, error))
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.stop()

    def _run(self, work: Callable[[_Producer], Iterator[Any]]) -> None:
        try:
            iterator = work(self)
            try:
                for item in iterator:
                    self._put(item)
                    if self.stopped:
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # re-raised on the event loop
            self._put(_END, exc)
            return
        self._put(_END)

    def __aiter__(self) -> _Producer:
        return self

    async def __anext__(self) -> Any:
        item, error = await self._items.get()
        if item is _END:
            self._items.put_nowait((item, error))  # later calls see the end too
            if error is not None:
                raise error
            raise StopAsyncIteration
        return item


async def _last(producer: _Producer) -> Any:
    last = None
    async for last in producer:
        pass
    return last


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (call it after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, awaitable: Any) -> Any:
    """The result of ``awaitable``, or _ClientGone (``awaitable`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _ClientGone()
    return task.result()


class _EventStream(StreamingResponse):
    """Server-sent events that end the request's work (``on_close``) when the stream ends or the client leaves."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for event in self.body_iterator:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-write
        finally:
            self._on_close()


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _visible(text: str, stops: Sequence[str], final: bool) -> str:
    """``text`` cut at the request's own stop sequences; while streaming, without a half-written one."""
    if not stops:
        return text
    cut = cut_at_stop(text, stops)[0]
    return cut if final else stable_prefix(cut, stops)


def _generated_logprobs(
    backend: ModelBackend, context: str, answer: str, variant: Variant, top: int
) -> tuple[list[tuple[str, int, float | None]], dict[str, float]]:
    """The tokens of ``answer`` (text, offset in the answer, log-probability) as the model scores them after
    ``context``, and the ``top`` most likely first tokens after ``context``. The engines score the last 16 tokens
    of a text per pass (:meth:`ModelBackend.token_logprobs`), so a long answer takes one pass per 16 tokens."""
    try:
        following = backend.token_logprobs(context, variant, top=top)[1] if top else {}
        if not answer:
            return [], following
        text = context + answer_prefix(backend.load().tokenizer) + answer
        answer_start = len(text) - len(answer)
        pieces, _ = backend.token_logprobs(text, variant)
        tokens = [(piece, at) for piece, at, _ in pieces if at >= len(context)]
        scored = {at: value for _, at, value in pieces if value is not None}
        end = len(text)
        while missing := [at for _, at in tokens if at not in scored]:
            later = [at for _, at in tokens if at > missing[-1]]
            cut = later[0] if later else len(text)
            if cut >= end:
                break
            end = cut
            more, _ = backend.token_logprobs(text[:cut], variant)
            new = {at: value for _, at, value in more if value is not None and at not in scored}
            if not new:
                break
            scored.update(new)
    except NotImplementedError:
        raise ApiError(400, "Log-probabilities are not available with this engine.", param="logprobs") from None
    pieces = [(piece, max(0, at - answer_start), _finite(scored.get(at))) for piece, at in tokens]
    return pieces, {token: _finite(value) for token, value in following.items()}


def _finite(value: float | None) -> float | None:
    """A log-probability JSON can carry: -inf (a token the model rules out) as -9999, as vLLM sends it."""
    return None if value is None else max(value, -9999.0)


def _finish_reason(backend: ModelBackend, text: str, generation: GenerationSettings) -> tuple[str, int]:
    n_tokens = backend.count_tokens(text)
    return ("length" if n_tokens >= generation.max_new_tokens else "stop"), n_tokens


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -------------------------------------------------------------------------------------------------- the API
class _Api:
    def __init__(
        self, backend: ModelBackend, limits: ServerSettings, queue: AdmissionQueue, api_key: str | None,
        base_name: str, adapter_name: str, allow_echo: bool,
    ):
        self.backend, self.limits, self.queue = backend, limits, queue
        self._key = api_key.encode() if api_key else None
        self.base_name, self.adapter_name, self.allow_echo = base_name, adapter_name, allow_echo

    # --------------------------------------------------------------------------------------- checks
    def authorise(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self._key)):
            raise ApiError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object; 413 past MAX_BODY_BYTES, without reading further."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise self._too_large()
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    @staticmethod
    def _too_large() -> ApiError:
        return ApiError(413, f"The request body is larger than {MAX_BODY_BYTES:,} bytes.", code="request_too_large")

    def variant(self, body: dict[str, Any]) -> tuple[str, Variant]:
        model = body.get("model")
        names = {self.base_name: Variant.BASE, self.adapter_name: Variant.TUNED}
        if not isinstance(model, str) or (model not in names and model not in MODEL_ALIASES):
            raise ApiError(404, f"The model {model!r} does not exist; this server serves "
                           f"{self.base_name!r} and {self.adapter_name!r}.", param="model", code="model_not_found")
        variant = names.get(model) or MODEL_ALIASES[model]
        try:
            parse_variant(variant.value, self.backend)  # the page's check: no adapter configured, or it failed
        except UserInputError as exc:
            raise self._no_adapter(model, str(exc)) from None
        return model, variant

    def _no_adapter(self, model: str, reason: str = "") -> ApiError:
        reason = reason or f"The fine-tuned model is not available: {self.backend.adapter_unavailable_reason()}."
        return ApiError(404, f"The model {model!r} does not exist: no adapter is loaded. {reason}", param="model",
                        code="model_not_found")

    def _require_model(self, model: str, variant: Variant) -> None:
        """Load the model (blocking) and check that it serves ``variant``."""
        if not self.backend.load().adapter_loaded and variant is Variant.TUNED:
            raise self._no_adapter(model)

    # -------------------------------------------------------------------------------------- parsing
    def parse_chat(self, body: dict[str, Any]) -> ChatRequest:
        model, variant = self.variant(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} messages.", param="messages")
        if body.get("tools") or body.get("functions"):
            raise ApiError(400, "Tools and functions are not supported.", param="tools")
        system, history = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                raise ApiError(
                    400, "Each message must be an object whose role is system, developer, user or assistant.",
                    param=f"messages[{i}]",
                )
            text = _content_text(message.get("content"), i)
            if message["role"] in ("system", "developer"):
                system.append(text)
            elif i < len(messages) - 1:
                history.append({"role": message["role"], "content": text})
        if messages[-1]["role"] != "user":
            raise ApiError(400, "The last message must be the user's question.", param="messages")
        extra = _field(body, "context", (str,), "a string", "")
        context = "\n\n".join(t for t in (*system, extra) if t.strip())
        try:
            last = _content_text(messages[-1].get("content"), len(messages) - 1)
            question, context = parse_question(last, context, self.limits)
            turns = history_to_turns(history, self.limits)
        except UserInputError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        generation = _generation(body, self.limits, ("max_completion_tokens", "max_tokens"), CHAT_DEFAULTS)
        stream, include_usage = _common(body)
        top = _field(body, "top_logprobs", (int,), "an integer", 0)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
        logprobs = _field(body, "logprobs", (bool,), "true or false", False)
        if top and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        return ChatRequest(model, variant, PromptInput(question, context, turns), generation, _stops(body), stream,
                           include_usage, logprobs, top)

    def parse_completion(self, body: dict[str, Any]) -> CompletionRequest:
        model, variant = self.variant(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a list of strings.", param="prompt", code="invalid_type")
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"'prompt' takes at most {MAX_PROMPTS} prompts.", param="prompt")
        max_chars = self.limits.max_question_chars + self.limits.max_context_chars + PROMPT_OVERHEAD_CHARS
        for p in prompts:
            if not p.strip():
                raise ApiError(400, "The prompt is empty.", param="prompt")
            if len(p) > max_chars:
                raise ApiError(
                    400, f"The prompt is {len(p):,} characters long; the limit is {max_chars:,}.", param="prompt"
                )
        generation = _generation(body, self.limits, ("max_tokens",), COMPLETION_DEFAULTS)
        stream, include_usage = _common(body)
        echo = _field(body, "echo", (bool,), "true or false", False)
        logprobs = _field(body, "logprobs", (int,), "an integer", None)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="logprobs")
        if echo and logprobs is not None and not self.allow_echo:
            raise ApiError(400, "echo with logprobs is not supported.", param="echo")
        if stream and len(prompts) != 1:
            raise ApiError(400, "Streaming takes one prompt.", param="prompt")
        return CompletionRequest(model, variant, tuple(prompts), generation, _stops(body), stream, include_usage,
                                 echo, logprobs)

    # ------------------------------------------------------------------- work on the model (a thread)
    def chat_work(self, req: ChatRequest, job: _Producer) -> Iterator[tuple[str, Any]]:
        self._require_model(req.model, req.variant)
        prompt = prepare_prompt(self.backend, req.prompt_input, req.generation)
        yield "ready", prompt
        answer = ""
        for answer in self.backend.stream(prompt, req.variant, req.generation, job.cancel_event()):
            yield "text", _visible(answer, req.stops, final=False)
        if job.stopped:
            return
        answer = _visible(answer, req.stops, final=True)
        reason, n_tokens = _finish_reason(self.backend, answer, req.generation)
        logprobs = None
        if req.logprobs:
            tokens, following = _generated_logprobs(self.backend, prompt.text, answer, req.variant, req.top_logprobs)
            logprobs = {"content": [
                {"token": t, "logprob": v, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": a, "logprob": p, "bytes": list(a.encode())} for a, p in following.items()]
                 if i == 0 else []}
                for i, (t, _, v) in enumerate(tokens)
            ]}
        yield "done", {"text": answer, "finish_reason": reason, "completion_tokens": n_tokens, "logprobs": logprobs}

    def completion_work(self, req: CompletionRequest, job: _Producer) -> Iterator[tuple[str, Any]]:
        self._require_model(req.model, req.variant)
        budget = self.backend.prompt_budget(req.generation.max_new_tokens)
        counts = [self.backend.count_tokens(p) for p in req.prompts]
        for n in counts:
            if n > budget:
                raise ApiError(400, f"The prompt has {n:,} tokens; with max_tokens={req.generation.max_new_tokens} "
                               f"this server takes at most {budget:,}.", param="prompt", code="context_length_exceeded")
        yield "ready", counts
        prompts = [FittedPrompt(text=p, n_tokens=n) for p, n in zip(req.prompts, counts)]
        texts = [""] * len(prompts)
        variants = [req.variant] * len(prompts)
        for texts in self.backend.stream_batch(prompts, variants, req.generation, job.cancel_event()):
            if req.stream:
                yield "text", _visible(texts[0], req.stops, final=False)
        if job.stopped:
            return
        choices = []
        for index, (prompt, text) in enumerate(zip(req.prompts, texts)):
            text = _visible(text, req.stops, final=True)
            reason, n_tokens = _finish_reason(self.backend, text, req.generation)
            choices.append({"index": index, "text": (prompt + text) if req.echo and not req.stream else text,
                            "logprobs": self._completion_logprobs(req, prompt, text), "finish_reason": reason,
                            "completion_tokens": n_tokens})
        yield "done", choices

    def _completion_logprobs(self, req: CompletionRequest, prompt: str, text: str) -> dict[str, Any] | None:
        if req.logprobs is None:
            return None
        if req.echo:  # the echoed prompt's tokens (the last 16 scored, where answer options are; null before them)
            try:
                tokens, _ = self.backend.token_logprobs(prompt, req.variant, top=req.logprobs)
            except NotImplementedError:
                raise ApiError(400, "Log-probabilities are not available with this engine.", param="logprobs") from None
            return {"tokens": [t for t, _, _ in tokens], "text_offset": [o for _, o, _ in tokens],
                    "token_logprobs": [v for _, _, v in tokens], "top_logprobs": None}
        tokens, following = _generated_logprobs(self.backend, prompt, text, req.variant, req.logprobs)
        tops = [following] + [{} for _ in tokens[1:]] if req.logprobs else [{} for _ in tokens]
        return {"tokens": [t for t, _, _ in tokens], "text_offset": [o for _, o, _ in tokens],
                "token_logprobs": [v for _, _, v in tokens], "top_logprobs": tops}

    # ---------------------------------------------------------------------------------- responses
    async def models(self, request: Request, model: str | None = None) -> Response:
        self.authorise(request)
        try:
            loaded = await anyio.to_thread.run_sync(self.backend.load)
        except ModelLoadError as exc:
            raise _as_api_error(exc) from None
        served = [self.base_name] + ([self.adapter_name] if loaded.adapter_loaded else [])
        cards = [{"id": name, "object": "model", "created": _STARTED, "owned_by": "pubmedqa",
                  "max_model_len": loaded.context_window} for name in served]
        if model is None:
            return JSONResponse({"object": "list", "data": cards})
        for card in cards:
            if card["id"] == model:
                return JSONResponse(card)
        raise ApiError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")

    async def serve(self, request: Request, chat: bool) -> Response:
        """Check, queue, then run a chat or completion request on the model; the page's limits and queue apply."""
        self.authorise(request)
        body = await self.read_json(request)
        req = self.parse_chat(body) if chat else self.parse_completion(body)
        ticket = self.queue.admit()
        producer: _Producer | None = None
        streaming = False
        try:
            await _unless_gone(request, ticket.acquire())
            work = self.chat_work if chat else self.completion_work
            producer = _Producer(lambda job: work(req, job))  # type: ignore[arg-type]
            _, prepared = await _unless_gone(request, producer.__anext__())  # the prompt, or why it cannot be answered
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": req.model}
            if req.stream:
                events = (self._chat_events(req, prepared, producer, meta) if chat  # type: ignore[arg-type]
                          else self._completion_events(req, prepared, producer, meta))  # type: ignore[arg-type]
                streaming = True  # the stream ends the work and frees the place when it closes
                return _EventStream(events, self._closer(producer, ticket))
            _, result = await _unless_gone(request, _last(producer))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                if producer is not None:
                    producer.stop()
                ticket.release()
        body = self._chat_body(prepared, result, meta) if chat else self._completion_body(prepared, result, meta)
        return JSONResponse(body)

    @staticmethod
    def _closer(producer: _Producer, ticket: _Ticket) -> Callable[[], None]:
        def close() -> None:
            producer.stop()
            ticket.release()

        return close

    @staticmethod
    def _chat_body(prompt: FittedPrompt, done: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        return {**meta, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": done["logprobs"],
            "finish_reason": done["finish_reason"]}],
            "usage": _usage(prompt.n_tokens, done["completion_tokens"]), "notices": prompt.notices}

    @staticmethod
    def _completion_body(counts: list[int], choices: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
        completion_tokens = sum(c.pop("completion_tokens") for c in choices)
        usage = _usage(sum(counts), completion_tokens)
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage}

    async def _chat_events(
        self, req: ChatRequest, prompt: FittedPrompt, producer: _Producer, meta: dict[str, Any]
    ) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return _sse({**meta, "object": "chat.completion.chunk", "choices": [choice], **extra})

        yield chunk({"role": "assistant", "content": ""}, notices=prompt.notices)
        sent = ""
        try:
            async for kind, value in producer:
                text = value if kind == "text" else value["text"]
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
                if kind == "done":
                    yield chunk({}, value["finish_reason"], value["logprobs"])
                    if req.include_usage:
                        yield _sse({**meta, "object": "chat.completion.chunk", "choices": [],
                                    "usage": _usage(prompt.n_tokens, value["completion_tokens"])})
        except Exception as exc:  # the response has started: the error goes into the stream
            yield _sse(_as_api_error(exc).body())
        yield "data: [DONE]\n\n"

    async def _completion_events(
        self, req: CompletionRequest, counts: list[int], producer: _Producer, meta: dict[str, Any]
    ) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> str:
            return _sse({**meta, "object": "text_completion",
                         "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        if req.echo:
            yield chunk(req.prompts[0])
        sent = ""
        try:
            async for kind, value in producer:
                if kind == "text":
                    if value.startswith(sent) and len(value) > len(sent):
                        yield chunk(value[len(sent):])
                        sent = value
                    continue
                final = value[0]
                if final["text"].startswith(sent) and len(final["text"]) > len(sent):
                    yield chunk(final["text"][len(sent):])
                yield chunk("", final["finish_reason"], final["logprobs"])
                if req.include_usage:
                    yield _sse({**meta, "object": "text_completion", "choices": [],
                                "usage": _usage(sum(counts), final["completion_tokens"])})
        except Exception as exc:
            yield _sse(_as_api_error(exc).body())
        yield "data: [DONE]\n\n"


def create_app(
    backend: ModelBackend,
    limits: ServerSettings | None = None,
    *,
    page: Any = None,
    api_key: str | None = None,
    base_name: str = BASE_MODEL_NAME,
    adapter_name: str = ADAPTER_MODEL_NAME,
    allow_echo: bool = True,
) -> FastAPI:
    """A FastAPI app with the OpenAI-compatible API at ``/v1`` over ``backend``, checked against ``limits`` (the
    page's :class:`ServerSettings`). ``page``: the Gradio Blocks served beside it (:func:`app.main.build_server`
    mounts it at ``/``), whose waiting events count towards the queue. ``api_key``: the key clients must send
    (default: ``PUBMEDQA_API_KEY`` from the environment; none: open). ``allow_echo=False`` refuses ``echo`` with
    ``logprobs`` as TGI does (for the remote backend's tests)."""
    limits = limits or ServerSettings()
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    queue = AdmissionQueue(limits.concurrency_limit, limits.queue_size, lambda: page_queue_length(page))
    api = _Api(backend, limits, queue, api_key, base_name, adapter_name, allow_echo)

    v1 = FastAPI(title="PubMedQA OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @v1.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @v1.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        what = "Unknown API path" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, f"{what}: {request.method} {request.url.path}").response()

    @v1.get("/models")
    async def list_models(request: Request) -> Response:
        return await _guarded(api.models(request))

    @v1.get("/models/{model}")
    async def retrieve_model(model: str, request: Request) -> Response:
        return await _guarded(api.models(request, model))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _guarded(api.serve(request, chat=True))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _guarded(api.serve(request, chat=False))

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/v1", v1)
    app.state.openai_api = api
    return app


async def _guarded(response: Any) -> Response:
    try:
        return await response
    except Exception as exc:
        return _as_api_error(exc).response()


def serve_in_thread(app: FastAPI, timeout_s: float = 30.0, server_class: type | None = None) -> tuple[str, Any]:
    """Serve ``app`` (from :func:`create_app`, or :func:`app.main.build_server` with ``server_class``
    :class:`app.main.AppServer`) on a free localhost port in a daemon thread, for tests and benchmarks: its /v1 URL
    and the uvicorn server (set ``should_exit`` to stop it)."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = (server_class or uvicorn.Server)(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    )
    threading.Thread(target=server.run, name="openai-api-server", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {timeout_s:g} s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server
