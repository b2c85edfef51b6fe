"""The ``/v1`` routes: each request is authorised, read, parsed, queued, then run on the model on its own thread,
its answer sent whole or as server-sent events."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access import API_KEY_ENV, OwnerAccess, bearer_key_matches
from app.http_limits import MAX_BODY_BYTES, read_bounded
from app.openai_api import tokenization
from app.openai_api.admission import AdmissionQueue, Ticket, page_queue_length
from app.openai_api.errors import ApiError, as_api_error
from app.openai_api.generation import chat_work, completion_work
from app.openai_api.models import ADAPTER_MODEL_NAME, BASE_MODEL_NAME, ServedModels
from app.openai_api.parsing import ChatRequest, CompletionRequest, parse_chat, parse_completion
from app.openai_api.responses import chat_body, chat_events, completion_body, completion_events, response_meta
from app.openai_api.streaming import ClientGone, EventStream, Producer, last_item, unless_gone
from app.rate_limits import EvidenceQuota, visitor_key
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine
from pubmedqa.evidence import EvidenceSearch


class OpenAiApi:
    """The handlers behind the routes, over one engine, the page's limits and the shared queue."""

    def __init__(
        self, engine: Engine, limits: ServerSettings, queue: AdmissionQueue, api_key: str | None,
        models: ServedModels, allow_echo: bool, search: EvidenceSearch | None, evidence_quota: EvidenceQuota,
    ):
        self.engine, self.limits, self.queue, self.models, self.allow_echo = engine, limits, queue, models, allow_echo
        self._key = api_key or None
        self.search = search
        self.evidence_quota = evidence_quota  # the page's: one budget of searches per visitor

    async def list_models(self, request: Request, model: str | None = None) -> Response:
        """The served models' cards, or the card of ``model``."""
        self.authorise(request)
        loaded = await anyio.to_thread.run_sync(self.engine.load)
        cards = self.models.cards(loaded)
        if model is None:
            return JSONResponse({"object": "list", "data": cards})
        for card in cards:
            if card["id"] == model:
                return JSONResponse(card)
        raise ApiError(404, f"The model {model!r} does not exist.", param="model", code="model_not_found")

    async def tokenizer_route(
        self, request: Request, handler: Callable[[Engine, dict[str, Any]], dict[str, Any]] | None
    ) -> Response:
        """``/tokenize`` or ``/detokenize`` (``handler``) on the request's body, or ``/tokenizer_info`` (None)."""
        self.authorise(request)
        if handler is None:
            return JSONResponse(await anyio.to_thread.run_sync(tokenization.tokenizer_info, self.engine))
        body = await self.read_json(request)
        return JSONResponse(await anyio.to_thread.run_sync(handler, self.engine, body))

    async def serve(self, request: Request, chat: bool) -> Response:
        """Check, queue, then run a chat or completion request on the model; the page's limits and queue apply."""
        self.authorise(request)
        body = await self.read_json(request)
        model, variant = self.models.resolve(body)
        req = (parse_chat(body, model, variant, self.limits) if chat
               else parse_completion(body, model, variant, self.limits, self.allow_echo))
        searches = isinstance(req, ChatRequest) and req.searches
        if searches:
            self.check_evidence_on(req)
        ticket = self.queue.admit()
        producer: Producer | None = None
        streaming = False
        try:
            if searches:  # once admitted, so that a request the queue refuses spends none of the visitor's searches
                self.check_search_limit(request)
            await unless_gone(request, ticket.acquire())
            producer = Producer(lambda job: self._work(req, job))
            _, prepared = await unless_gone(request, producer.__anext__())  # the prompt, or why it cannot be answered
            meta = response_meta(chat, req.model)
            if req.stream:
                events = self._events(req, prepared, producer, meta)
                streaming = True  # the stream ends the work and frees the place when it closes
                return EventStream(events, functools.partial(_end, producer, ticket))
            _, result = await unless_gone(request, last_item(producer))
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                _end(producer, ticket)
        if isinstance(req, ChatRequest):
            return JSONResponse(chat_body(prepared, result, meta))
        return JSONResponse(completion_body(prepared, result, meta))

    def check_evidence_on(self, req: ChatRequest) -> None:
        """400 for evidence "on" where evidence is off ("auto" then quietly finds nothing)."""
        if self.search is None and req.evidence == "on":
            raise ApiError(400, "Evidence search is off on this app (PUBMEDQA_EVIDENCE=off).", param="evidence")

    def check_search_limit(self, request: Request) -> None:
        """429 past a public app's per-visitor search limit (the page's budget); an allowed search counts."""
        if self.search is None:
            return
        visitor = visitor_key(request, self.limits.trusted_proxy_hops)
        if not self.evidence_quota.allow(visitor):
            wait = self.evidence_quota.wait_s(visitor)
            raise ApiError(429, self.evidence_quota.message(visitor) + ' Send the request with "evidence": "off".',
                           param="evidence", code="rate_limit_exceeded", type_="rate_limit_error",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def authorise(self, request: Request) -> None:
        if self._key is None:
            return
        if not bearer_key_matches(request.headers, self._key):
            raise ApiError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object; 413 past MAX_BODY_BYTES, without reading further."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(400, "The request body must be JSON, sent with the header 'Content-Type: application/json'.",
                           code="invalid_content_type")
        raw = await read_bounded(request.stream(), request.headers.get("content-length"))
        if raw is None:
            raise _too_large()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" escape decodes to a lone surrogate, which no text contains
            raise ApiError(400, "The request contains an invalid character (a lone UTF-16 surrogate).",
                           code="invalid_text") from None
        return body

    def _work(self, req: ChatRequest | CompletionRequest, job: Producer) -> Iterator[tuple[str, Any]]:
        self.models.require(req.model, req.variant)  # blocking: here, on the producer's thread
        if isinstance(req, ChatRequest):
            yield from chat_work(self.engine, req, job, self.search)
        else:
            yield from completion_work(self.engine, req, job)

    @staticmethod
    def _events(
        req: ChatRequest | CompletionRequest, prepared: Any, producer: Producer, meta: dict[str, Any]
    ) -> AsyncIterator[str]:
        if isinstance(req, ChatRequest):
            return chat_events(req, prepared, producer, meta)
        return completion_events(req, prepared, producer, meta)


def _end(producer: Producer | None, ticket: Ticket) -> None:
    """Stop a request's work and free its place in the queue."""
    if producer is not None:
        producer.stop()
    ticket.release()


def _too_large() -> ApiError:
    return ApiError(413, f"The request body is larger than {MAX_BODY_BYTES:,} bytes.", code="request_too_large")


def create_app(
    engine: Engine,
    limits: ServerSettings | None = None,
    *,
    page: Any = None,
    api_key: str | None = None,
    base_name: str = BASE_MODEL_NAME,
    adapter_name: str = ADAPTER_MODEL_NAME,
    allow_echo: bool = True,
    search: EvidenceSearch | None = None,
    evidence_quota: EvidenceQuota | None = None,
) -> FastAPI:
    """A FastAPI app with the OpenAI-compatible API at ``/v1`` over ``engine``, checked against ``limits`` (the
    page's :class:`ServerSettings`). ``page``: the Gradio Blocks served beside it (:func:`app.main.build_server`
    mounts it at ``/``), whose waiting events count towards the queue. ``api_key``: the key clients must send
    (default: ``PUBMEDQA_API_KEY`` from the environment; none: open). ``allow_echo=False`` refuses ``echo`` with
    ``logprobs`` as TGI does (for the remote engine's tests). ``search``: the app's
    :class:`pubmedqa.evidence.EvidenceSearch` for the ``evidence`` extension field (None: evidence is off), and
    ``evidence_quota`` the page's budget of searches per visitor (default: one of its own)."""
    limits = (limits or ServerSettings()).for_engine(engine)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    queue = AdmissionQueue(limits.concurrency_limit, limits.queue_size, lambda: page_queue_length(page))
    if evidence_quota is None:
        evidence_quota = EvidenceQuota(limits.evidence_per_minute, OwnerAccess.from_settings(limits).public)
    api = OpenAiApi(engine, limits, queue, api_key, ServedModels(engine, base_name, adapter_name), allow_echo,
                    search, evidence_quota)

    v1 = FastAPI(title="PubMedQA OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @v1.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        what = "Unknown API path" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, f"{what}: {request.method} {request.url.path}").response()

    @v1.get("/models")
    async def list_models(request: Request) -> Response:
        return await _guarded(api.list_models(request))

    @v1.get("/models/{model}")
    async def retrieve_model(model: str, request: Request) -> Response:
        return await _guarded(api.list_models(request, model))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _guarded(api.serve(request, chat=True))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _guarded(api.serve(request, chat=False))

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/tokenize")
    async def tokenize_text(request: Request) -> Response:
        return await _guarded(api.tokenizer_route(request, tokenization.tokenize))

    @app.post("/detokenize")
    async def detokenize_ids(request: Request) -> Response:
        return await _guarded(api.tokenizer_route(request, tokenization.detokenize))

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        return await _guarded(api.tokenizer_route(request, None))

    app.mount("/v1", v1)
    app.state.openai_api = api
    return app


async def _guarded(response: Awaitable[Response]) -> Response:
    """The handler's response, or its failure as an OpenAI error (never an unhandled exception: the server would
    log it and answer 500 without the error's shape)."""
    try:
        return await response
    except Exception as exc:
        return as_api_error(exc).response()
