"""A small OpenAI-compatible completions server over the local backend.

It serves the base model and its LoRA adapter under two model names, the way vLLM (``--lora-modules``) and TGI
(``LORA_ADAPTERS``) do, so the remote backend can be tried, tested and benchmarked without a GPU:

    python -m app.openai_server --port 8000                 # base: "base", adapter: "tuned"
    python app.py --backend openai --base_url http://127.0.0.1:8000/v1 --model base --adapter_model tuned

It implements what the remote backend uses: ``GET /v1/models`` and ``POST /v1/completions`` (text or a list of
texts, streaming, stop sequences, seed, ``echo`` with ``logprobs`` for the last 16 echoed prompt tokens (null
before them, to keep a CPU from scoring the whole prompt), and top ``logprobs`` of the first generated token). It is
not a production server: one request generates at a time.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

# FastAPI reads the handlers' annotations at run time, so ``Request`` must be importable at module level.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pubmedqa.backends.base import GenerationSettings, ModelBackend, Variant
from pubmedqa.backends.factory import create_backend
from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.prompts import FittedPrompt, cut_at_stop

# Default names the two variants are served under. They are server model names, which a client chooses with
# --model / --adapter_model, not the app's variant choices (app.variants).
BASE_MODEL_NAME = "base"
ADAPTER_MODEL_NAME = "tuned"


@dataclass
class ServeSettings:
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    base_name: str = field(default=BASE_MODEL_NAME, metadata={"help": "Model name of the base model."})
    adapter_name: str = field(
        default=ADAPTER_MODEL_NAME, metadata={"help": "Model name of the base model with the LoRA adapter."}
    )
    require_key_env: str = field(
        default="", metadata={"help": "If set, the environment variable holding the API key clients must send."}
    )


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(
    backend: ModelBackend,
    base_name: str = BASE_MODEL_NAME,
    adapter_name: str = ADAPTER_MODEL_NAME,
    api_key: str | None = None,
    allow_echo: bool = True,
):
    """A FastAPI app serving ``backend`` as ``base_name`` and, when it has an adapter, ``adapter_name``.
    ``allow_echo=False`` refuses ``echo`` with ``logprobs`` as TGI does."""
    app = FastAPI(title="PubMedQA OpenAI-compatible server")
    variant_by_model = {base_name: Variant.BASE, adapter_name: Variant.TUNED}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}}, status)

    def authorised(request: Request) -> bool:
        return api_key is None or secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}")

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        if not authorised(request):
            return error(401, "Invalid API key.")
        loaded = backend.load()
        served = [base_name] + ([adapter_name] if loaded.adapter_loaded else [])
        return {"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "pubmedqa", "max_model_len": loaded.context_window} for n in served
        ]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        if not authorised(request):
            return error(401, "Invalid API key.")
        try:
            body = await request.json()
            variant, prompts, settings, stops = _parse(body, variant_by_model)
            _check_servable(body, variant, prompts, backend, allow_echo)
        except RequestError as exc:
            return error(exc.status, str(exc))
        except ValueError as exc:  # also a body that is not JSON
            return error(400, str(exc))
        model = body["model"]
        if body.get("stream"):
            events = _stream(backend, model, prompts[0], variant, settings, stops)
            return StreamingResponse(events, media_type="text/event-stream")
        choices = [
            _choice(backend, i, text, variant, settings, stops, bool(body.get("echo")), body.get("logprobs"))
            for i, text in enumerate(prompts)
        ]
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": choices}

    return app


def _parse(body: Any, variant_by_model: dict[str, Variant]) -> tuple[Variant, list[str], GenerationSettings, list[str]]:
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model not in variant_by_model:
        raise RequestError(
            404, f"The model {model!r} does not exist; this server serves {', '.join(variant_by_model)}."
        )
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "'prompt' must be a string or a list of strings.")
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else list(stop)
    try:
        settings = GenerationSettings(
            max_new_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            seed=int(body.get("seed") or 0),
        )
    except (TypeError, ValueError):
        raise RequestError(400, "max_tokens, temperature, top_p and seed must be numbers.") from None
    return variant_by_model[model], prompts, settings.validated(4096), stops


def _check_servable(
    body: dict[str, Any], variant: Variant, prompts: list[str], backend: ModelBackend, allow_echo: bool
) -> None:
    """A RequestError if this server cannot serve a well-formed request."""
    if variant is Variant.TUNED and not backend.load().adapter_loaded:
        raise RequestError(404, f"The model {body['model']!r} does not exist: no adapter is loaded.")
    if body.get("echo") and body.get("logprobs") is not None and not allow_echo:
        raise RequestError(400, "echo with logprobs is not supported.")
    if body.get("stream") and len(prompts) != 1:
        raise RequestError(400, "Streaming takes one prompt.")


def _fitted(text: str) -> FittedPrompt:
    return FittedPrompt(text=text, n_tokens=0)


def _choice(backend, index, text, variant, settings, stops, echo, logprobs) -> dict[str, Any]:
    completion = _cut(backend.generate(_fitted(text), variant, settings), stops)
    choice: dict[str, Any] = {"index": index, "text": (text + completion) if echo else completion,
                              "logprobs": None, "finish_reason": "stop"}
    if logprobs is not None:
        tokens, following = backend.token_logprobs(text, variant, top=int(logprobs))
        if echo:  # the echoed prompt's last tokens, where answer options are (see text_logprobs)
            choice["logprobs"] = {"tokens": [t for t, _, _ in tokens], "text_offset": [o for _, o, _ in tokens],
                                  "token_logprobs": [v for _, _, v in tokens], "top_logprobs": None}
        else:  # top log-probabilities of the first generated token
            choice["logprobs"] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": [following]}
    return choice


def _stream(backend, model, text, variant, settings, stops) -> Iterator[str]:
    sent = ""
    for answer in backend.stream(_fitted(text), variant, settings):
        answer = _cut(answer, stops)
        if answer.startswith(sent) and len(answer) > len(sent):
            yield _event(model, answer[len(sent):])
            sent = answer
    yield _event(model, "", "stop")
    yield "data: [DONE]\n\n"


def _event(model: str, text: str, finish_reason: str | None = None) -> str:
    chunk = {"object": "text_completion", "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(chunk)}\n\n"


def _cut(text: str, stops: Sequence[str]) -> str:
    return cut_at_stop(text, tuple(stops))[0] if stops else text


def serve_in_thread(app: FastAPI, timeout_s: float = 30.0) -> tuple[str, Any]:
    """Serve ``app`` on a free localhost port in a daemon thread (for tests and benchmarks): its /v1 URL and the
    uvicorn server (set ``should_exit`` to stop it)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, name="openai-server", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the OpenAI-compatible server did not start within {timeout_s:g} s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


def main(argv: Sequence[str] | None = None) -> int:
    import os

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_settings, serve = parse_settings([ModelSettings, ServeSettings], argv)
    backend = create_backend(model_settings)
    backend.load()
    api_key = os.environ.get(serve.require_key_env) if serve.require_key_env else None
    uvicorn.run(create_app(backend, serve.base_name, serve.adapter_name, api_key), host=serve.host, port=serve.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
