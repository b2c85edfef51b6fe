"""Whether the adapter is served on the base precision it was trained on (an adapter trained on full-precision
weights and served on NF4 4-bit answers differently: it loops far more), and precisions in plain words."""

from __future__ import annotations

import logging
import re

from pubmedqa.adapter import Adapter
from pubmedqa.config import EMBEDDED_MODEL, ModelSettings

logger = logging.getLogger(__name__)

_PLAIN_PRECISION = {"4bit": "4-bit", "8bit": "8-bit", "bf16": "bf16", "none": "full precision"}


def plain_precision(quantization: str) -> str:
    """'4bit' -> '4-bit', 'Q4_K_M GGUF, llama.cpp' -> '4-bit GGUF', 'none (float32)' -> 'full precision'."""
    if "GGUF" in quantization:
        bits = re.match(r"[QqIiFf][Qq]?(\d+)", quantization)
        return f"{bits.group(1)}-bit GGUF" if bits else "GGUF"
    return _PLAIN_PRECISION.get(quantization.split(" ")[0], quantization)


def precision_setting(loaded: str) -> str:
    """The --quantization value that loads this precision again: what training records is what it really loaded,
    'none (float32)' -> 'none', 'none (bf16 fallback)' -> 'bf16', '4bit' -> '4bit'."""
    if loaded.startswith("none (bf16"):
        return "bf16"
    return loaded.split(" (")[0]


def training_precision(adapter: Adapter) -> str | None:
    """The base precision the adapter was trained on, as a --quantization value (None when its folder does not say)."""
    return precision_setting(adapter.metadata.base_quantization) if adapter.metadata is not None else None


def precision_mismatch(settings: ModelSettings, adapter: Adapter, served: str, engine: str) -> str | None:
    """A note when the adapter is served on other base weights than it was trained on, else None.

    On llama.cpp the GGUF's weights are used as they are; training on the embedded model uses the same GGUF
    dequantised ('none'), so that pair matches. The transformers engine matches when it loads the same precision."""
    trained = training_precision(adapter)
    if trained is None:
        return None
    if engine == "llama.cpp":
        matches = trained == "none" and settings.base_model == EMBEDDED_MODEL
        remedy = "--engine transformers --quantization " + trained
    else:
        matches = trained == settings.quantization
        remedy = "--quantization " + trained + (
            " (or --engine llama.cpp)" if trained == "none" and settings.base_model == EMBEDDED_MODEL else ""
        )
    if matches:
        return None
    return (
        f"the adapter was trained on {plain_precision(trained)} base weights and is served here on "
        f"{plain_precision(served)}: its answers can differ from training (more loops); {remedy} serves it on its "
        "training weights"
    )
