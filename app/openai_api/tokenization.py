"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` on the app's port, in the shapes vLLM and llama.cpp's server
give them (each reply carries both servers' keys), so that a client such as lm-evaluation-harness's remote
tokenizer (``tokenizer_backend=remote``, which it detects by ``/tokenizer_info``) needs no local copy of the
tokenizer. The same key and body limits as ``/v1``; 400 with a clear message for what cannot be tokenized."""

from __future__ import annotations

from typing import Any

from app.openai_api.errors import ApiError
from app.openai_api.parsing import MAX_TOKENIZE_CHARS, token_ids
from pubmedqa.engines.base import Engine


def tokenize(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    """``{"prompt": text, "add_special_tokens": true}`` (vLLM; ``content`` / ``add_special``, llama.cpp's, also
    taken) -> the token ids, their count and the model's context length; ``with_pieces`` (llama.cpp's) gives each
    id with its text."""
    text = body.get("prompt", body.get("content"))
    if "messages" in body:
        raise ApiError(400, "Chat messages are not tokenized here: send the prompt's text as 'prompt'.",
                       param="messages")
    if not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string.", param="prompt", code="invalid_type")
    if len(text) > MAX_TOKENIZE_CHARS:
        raise ApiError(400, f"The text is {len(text):,} characters long; the limit is {MAX_TOKENIZE_CHARS:,}.",
                       param="prompt")
    special = body.get("add_special_tokens", body.get("add_special", "prompt" in body))
    if not isinstance(special, bool):
        raise ApiError(400, "'add_special_tokens' must be true or false.", param="add_special_tokens",
                       code="invalid_type")
    loaded = engine.load()
    ids = loaded.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
    tokens: list[Any] = list(ids)
    if body.get("with_pieces") is True:
        tokens = [{"id": i, "piece": loaded.tokenizer.decode([i], skip_special_tokens=False)} for i in ids]
    return {"tokens": tokens, "count": len(ids), "max_model_len": loaded.context_window}


def detokenize(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    """``{"tokens": [ids]}`` -> their text, as ``prompt`` (vLLM) and ``content`` (llama.cpp)."""
    tokenizer = engine.load().tokenizer
    ids = token_ids(body.get("tokens"), "tokens", len(tokenizer), allow_empty=True)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return {"prompt": text, "content": text}


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    """The special tokens and sizes a remote-tokenizer client needs (vLLM's ``/tokenizer_info`` fields)."""
    loaded = engine.load()
    tokenizer = loaded.tokenizer
    return {
        "tokenizer_class": type(tokenizer).__name__, "eos_token": getattr(tokenizer, "eos_token", None),
        "bos_token": getattr(tokenizer, "bos_token", None), "pad_token": getattr(tokenizer, "pad_token", None),
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "vocab_size": len(tokenizer), "model_max_length": loaded.context_window,
        "max_model_len": loaded.context_window,
    }
