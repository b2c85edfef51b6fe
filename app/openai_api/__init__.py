"""The app's OpenAI-compatible API, served under ``/v1`` beside the page: one process, one port (see
:func:`app.main.build_server`), one model, the same limits and the same queue.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions`` and ``POST /v1/completions``,
streamed (server-sent events, ending with ``data: [DONE]``) or not, with ``logprobs`` where the engine has them.

- **Models.** ``pubmedqa-base`` and, while the LoRA adapter is loaded, ``pubmedqa-tuned``; ``base``, ``tuned`` and
  ``fine-tuned`` are accepted as aliases.
- **Chat** turns the messages into the project's one prompt format through :mod:`app.validation`, as the Chat tab does:
  the last message is the question (a ``user`` message), earlier ``user``/``assistant`` pairs are the
  conversation, and the text of ``system`` (or ``developer``) messages is the abstract/context; a non-standard
  string field ``context`` is accepted too (appended after the system text). Over-long conversations and contexts
  are fitted to the model's window as on the page (``notices`` in the response says so).
- **Completions** take a raw prompt (a string, or a list of up to :data:`MAX_PROMPTS` strings), as vLLM does: what
  the remote engine (:mod:`pubmedqa.engines.openai_engine`) sends, ``echo`` with ``logprobs`` included.
- **Limits** are the page's (:class:`pubmedqa.config.ServerSettings`): question, context and history lengths,
  ``max_tokens`` up to ``max_new_tokens_limit``; ``concurrency_limit`` requests generate at once and at most
  ``queue_size`` wait, counting the page's waiting events; beyond that, 429. Bodies over :data:`MAX_BODY_BYTES` get
  413 without being read. Defaults are the app's (greedy, 256 new tokens, capped by the limit), not OpenAI's.
- **Key.** When ``PUBMEDQA_API_KEY`` is set, requests must carry ``Authorization: Bearer <key>`` (401 otherwise);
  without it the API is as open as the page. The key is read from the environment only and never logged.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from app.openai_api.admission import AdmissionQueue, page_queue_length
from app.openai_api.errors import ApiError
from app.openai_api.local_server import serve_in_thread, uvicorn_config
from app.openai_api.models import ADAPTER_MODEL_NAME, BASE_MODEL_NAME, MODEL_ALIASES
from app.openai_api.parsing import MAX_PROMPTS, ChatRequest, CompletionRequest
from app.openai_api.routes import API_KEY_ENV, MAX_BODY_BYTES, create_app

__all__ = [
    "ADAPTER_MODEL_NAME",
    "API_KEY_ENV",
    "BASE_MODEL_NAME",
    "MAX_BODY_BYTES",
    "MAX_PROMPTS",
    "MODEL_ALIASES",
    "AdmissionQueue",
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "create_app",
    "page_queue_length",
    "uvicorn_config",
    "serve_in_thread",
]
