"""Which engine serves the model, chosen by ``--engine``: kept outside the interface, which knows no implementation."""

from __future__ import annotations

import logging

import torch

from pubmedqa.backends.base import ModelBackend
from pubmedqa.backends.llama_cpp_backend import LlamaCppBackend, llama_cpp_available
from pubmedqa.backends.llama_cpp_logging import route_llama_logs
from pubmedqa.backends.remote import RemoteBackend
from pubmedqa.backends.transformers_backend import TransformersBackend
from pubmedqa.config import EMBEDDED_MODEL, ModelSettings

logger = logging.getLogger(__name__)


def resolve_engine(settings: ModelSettings) -> tuple[str, str | None]:
    """The engine that will run the model ('llama.cpp', 'transformers' or 'openai'), and why it is not the one asked
    for (None when it is)."""
    gguf_base = settings.base_model == EMBEDDED_MODEL or settings.base_model.lower().endswith(".gguf")
    engine = settings.engine
    if engine == "openai":
        return engine, None
    if engine == "auto":
        engine = "llama.cpp" if gguf_base and not torch.cuda.is_available() else "transformers"
    if engine == "llama.cpp" and not gguf_base:
        raise ValueError(
            f"--engine llama.cpp runs a GGUF file: set --base_model to 'embedded' or a .gguf path, not {settings.base_model!r}"
        )
    if engine == "llama.cpp" and not llama_cpp_available():
        return "transformers", "llama-cpp-python is not installed (pip install -r requirements.txt), so transformers runs the model"
    return engine, None


def create_backend(settings: ModelSettings) -> ModelBackend:
    """The backend of the engine the settings name (see :func:`resolve_engine`): in process, or a remote server."""
    engine, note = resolve_engine(settings)
    if engine == "openai":
        return RemoteBackend(settings)
    if engine == "llama.cpp":
        route_llama_logs()
    backend: ModelBackend = LlamaCppBackend(settings) if engine == "llama.cpp" else TransformersBackend(settings)
    if note:
        logger.warning("%s", note)
        backend.notice = note
    return backend
