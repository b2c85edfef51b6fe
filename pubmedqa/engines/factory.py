"""Which engine serves the model, chosen by ``--engine``: kept outside the interface, which knows no implementation."""

from __future__ import annotations

import logging

import torch

from pubmedqa.config import EMBEDDED_MODEL, ModelSettings
from pubmedqa.engines.base import Engine
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine, llama_cpp_available
from pubmedqa.engines.llama_cpp_logging import route_llama_logs
from pubmedqa.engines.openai_engine import OpenAIEngine
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.gguf.source import SYNTAX, is_gguf_base

logger = logging.getLogger(__name__)


def resolve_engine(settings: ModelSettings) -> tuple[str, str | None]:
    """The engine that will run the model ('llama.cpp', 'transformers' or 'openai'), and why it is not the one asked
    for (None when it is)."""
    gguf_base = is_gguf_base(settings.base_model)
    # Only the embedded GGUF has a transformers twin (converted once, embedded_model.py); any other GGUF base, local or
    # on the Hub, runs on llama.cpp alone, GPU or not.
    gguf_only = gguf_base and settings.base_model != EMBEDDED_MODEL
    name = settings.engine
    if name == "openai":
        return name, None
    if name == "auto":
        name = "llama.cpp" if gguf_only or (gguf_base and not torch.cuda.is_available()) else "transformers"
    if name == "llama.cpp" and not gguf_base:
        raise ValueError(
            f"--engine llama.cpp runs a GGUF file: set --base_model to 'embedded', a .gguf path or a Hub GGUF "
            f"({SYNTAX}), not {settings.base_model!r}"
        )
    if name == "transformers" and gguf_only:
        raise ValueError(
            f"--engine transformers loads a transformers model, and {settings.base_model!r} is a GGUF file: run it with "
            "--engine llama.cpp (or auto), or set --base_model to the transformers model it was converted from"
        )
    if name == "llama.cpp" and not llama_cpp_available():
        if gguf_only:
            raise ValueError(f"{settings.base_model!r} is a GGUF file, which needs llama-cpp-python: pip install -r requirements.txt")
        return "transformers", "llama-cpp-python is not installed (pip install -r requirements.txt), so transformers runs the model"
    return name, None


def create_engine(settings: ModelSettings) -> Engine:
    """The engine the settings name (see :func:`resolve_engine`): in process, or a remote server."""
    name, note = resolve_engine(settings)
    if name == "openai":
        return OpenAIEngine(settings)
    if name == "llama.cpp":
        route_llama_logs()
    engine: Engine = LlamaCppEngine(settings) if name == "llama.cpp" else TransformersEngine(settings)
    if note:
        logger.warning("%s", note)
        engine.notice = note
    return engine
