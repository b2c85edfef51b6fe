"""Chat and completion request bodies, checked against the page's limits and turned into :class:`ChatRequest` and
:class:`CompletionRequest` (400 with the offending ``param`` otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from app.evidence import wants_search
from app.openai_api.errors import ApiError
from app.validation import (
    UserInputError,
    history_to_turns,
    parse_evidence_mode,
    parse_generation_settings,
    parse_question,
)
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant

MAX_PROMPTS = 4  # prompts in one /v1/completions request (the remote engine sends 3: one per answer option)
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
# A raw prompt may hold the instruction and earlier turns beside the question and the context.
PROMPT_OVERHEAD_CHARS = 4000
MAX_TOKENIZE_CHARS = 200_000  # a text /tokenize takes (the body itself is bounded by MAX_BODY_BYTES)
_ROLES = {"system", "developer", "user", "assistant"}
# The page's defaults for chat; for raw completions a missing repetition_penalty or min_tokens means off, as on vLLM
# (the remote engine sends them only when they are on).
CHAT_DEFAULTS = GenerationSettings()
COMPLETION_DEFAULTS = replace(GenerationSettings(), repetition_penalty=1.0, min_new_tokens=0)


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
    evidence: str = "off"  # the extension field: "off", "auto" (search when there is no context) or "on"

    @property
    def searches(self) -> bool:
        """Whether this request searches for evidence (``auto`` only for a question without context)."""
        return wants_search(self.evidence, self.prompt_input.context)


#: A completion prompt: a text, or token ids used as given (no BOS added), as vLLM takes them.
Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    variant: Variant
    prompts: tuple[Prompt, ...]
    generation: GenerationSettings
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    score_only: bool = False  # max_tokens 0 with echo: the prompt's log-probabilities, nothing generated


def parse_chat(body: dict[str, Any], model: str, variant: Variant, limits: ServerSettings) -> ChatRequest:
    """A ``/v1/chat/completions`` body for ``model`` (already resolved to ``variant``)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} messages.", param="messages")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "Tools and functions are not supported.", param="tools")
    system, history = _split_messages(messages)
    if messages[-1]["role"] != "user":
        raise ApiError(400, "The last message must be the user's question.", param="messages")
    extra = _field(body, "context", (str,), "a string", "")
    context = "\n\n".join(t for t in (*system, extra) if t.strip())
    try:
        last = _content_text(messages[-1].get("content"), len(messages) - 1)
        question, context = parse_question(last, context, limits)
        turns = history_to_turns(history, limits)
    except UserInputError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    generation = _generation(body, limits, ("max_completion_tokens", "max_tokens"), CHAT_DEFAULTS)
    stream, include_usage = _stream_options(body)
    top = _field(body, "top_logprobs", (int,), "an integer", 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
    logprobs = _field(body, "logprobs", (bool,), "true or false", False)
    if top and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    try:
        evidence = parse_evidence_mode(body.get("evidence"))
    except UserInputError as exc:
        raise ApiError(400, str(exc), param="evidence") from None
    return ChatRequest(model, variant, PromptInput(question, context, turns), generation, _stops(body), stream,
                       include_usage, logprobs, top, evidence)


def parse_completion(
    body: dict[str, Any], model: str, variant: Variant, limits: ServerSettings, allow_echo: bool
) -> CompletionRequest:
    """A ``/v1/completions`` body for ``model`` (already resolved to ``variant``)."""
    prompts = _prompts(body, limits)
    echo = _field(body, "echo", (bool,), "true or false", False)
    score_only = echo and _field(body, "max_tokens", (int,), "an integer") == 0
    if score_only:  # OpenAI's way to score a prompt: echo it and generate nothing
        body = {**body, "max_tokens": 1}
    generation = _generation(body, limits, ("max_tokens",), COMPLETION_DEFAULTS)
    stream, include_usage = _stream_options(body)
    logprobs = _field(body, "logprobs", (int,), "an integer", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="logprobs")
    if echo and logprobs is not None and not allow_echo:
        raise ApiError(400, "echo with logprobs is not supported.", param="echo")
    if stream and len(prompts) != 1:
        raise ApiError(400, "Streaming takes one prompt.", param="prompt")
    if score_only and logprobs is None:
        raise ApiError(400, "'max_tokens': 0 scores the prompt: it needs 'logprobs'.", param="max_tokens")
    return CompletionRequest(model, variant, tuple(prompts), generation, _stops(body), stream, include_usage,
                             echo, logprobs, score_only)


def _split_messages(messages: list[Any]) -> tuple[list[str], list[dict[str, str]]]:
    """The texts of the system (and developer) messages, and the conversation before the last message."""
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
    return system, history


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


def _prompts(body: dict[str, Any], limits: ServerSettings) -> list[Prompt]:
    """The raw prompts: a string, a list of strings, a list of token ids or a list of lists of them; up to
    :data:`MAX_PROMPTS`, none empty or past the page's lengths (for token ids, as many ids as characters; the
    vocabulary and the model's budget are checked with the model, :func:`app.openai_api.generation`)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids (integers) or a list "
                       "of lists of token ids.", param="prompt", code="invalid_type")
    if not prompts:
        raise ApiError(400, "'prompt' is an empty list.", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' takes at most {MAX_PROMPTS} prompts.", param="prompt")
    max_chars = limits.max_question_chars + limits.max_context_chars + PROMPT_OVERHEAD_CHARS
    checked: list[Prompt] = []
    for p in prompts:
        if not p or isinstance(p, str) and not p.strip():
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if len(p) > max_chars:
            what = "characters long" if isinstance(p, str) else "token ids long"
            raise ApiError(400, f"The prompt is {len(p):,} {what}; the limit is {max_chars:,}.", param="prompt")
        if not isinstance(p, str) and min(p) < 0:
            raise ApiError(400, f"Token id {min(p)} is negative.", param="prompt")
        checked.append(p if isinstance(p, str) else tuple(p))
    return checked


def token_ids(value: Any, param: str, vocabulary: int, allow_empty: bool = False) -> list[int]:
    """``value`` as a list of token ids the model has (0 to ``vocabulary`` - 1); 400 naming ``param`` otherwise."""
    if not _is_ids(value):
        raise ApiError(400, f"'{param}' must be a list of token ids (integers).", param=param, code="invalid_type")
    if not value and not allow_empty:
        raise ApiError(400, f"'{param}' is empty.", param=param)
    if len(value) > MAX_TOKENIZE_CHARS:
        raise ApiError(400, f"'{param}' has {len(value):,} ids; the limit is {MAX_TOKENIZE_CHARS:,}.", param=param)
    outside = [i for i in value if not 0 <= i < vocabulary]
    if outside:
        raise ApiError(400, f"Token id {outside[0]:,} is outside the vocabulary (ids 0 to {vocabulary - 1:,}).",
                       param=param)
    return list(value)


def _is_ids(value: Any) -> bool:
    """Whether ``value`` is a list of token ids (integers, not booleans); an empty list counts, to be refused."""
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _generation(
    body: dict[str, Any], limits: ServerSettings, token_fields: Sequence[str], defaults: GenerationSettings
) -> GenerationSettings:
    """The generation settings of a request, checked against the page's limits
    (:func:`app.validation.parse_generation_settings`). The first of ``token_fields`` given sets the token budget."""
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
        # vLLM's and TGI's extension of the OpenAI API, which the remote engine sends
        "repetition_penalty": _field(body, "repetition_penalty", (int, float), "a number", defaults.repetition_penalty),
        "min_new_tokens": _field(body, "min_tokens", (int,), "an integer", defaults.min_new_tokens),  # vLLM's
    }
    return parse_generation_settings(values, limits)


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """Whether to stream, and whether the stream ends with a usage chunk."""
    stream = _field(body, "stream", (bool,), "true or false", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false.", param="stream_options",
                       code="invalid_type")
    return stream, bool(stream and include_usage)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    return tuple(s for s in stops if s)


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` if it is one of ``kinds`` (a bool only where ``bool`` is one), ``default`` if missing or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}.", param=name, code="invalid_type")
    return value
