"""Loading a base model and its tokenizer from the configured source: the embedded Gemma, a Hub id or a folder.

Shared by the engine (serving) and the training CLI, so both read the same weights the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pubmedqa.config import EMBEDDED_MODEL, BaseModelSettings
from pubmedqa.embedded_model import DESCRIPTION as EMBEDDED_DESCRIPTION
from pubmedqa.embedded_model import embedded_checkpoint

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message names the setting to fix."""


@dataclass
class BaseModel:
    model: Any
    tokenizer: Any
    description: str
    quantization: str  # what was really loaded, e.g. "4bit" or "none (bf16 fallback)"
    source: str  # the folder or Hub id the weights came from
    tokenizer_changed: bool = False  # a pad token was added, so an adapter must ship its tokenizer


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists()


def check_base_source(settings: BaseModelSettings) -> None:
    """Fail fast, before any loading, on a base model folder that does not exist."""
    base = settings.base_model
    if base != EMBEDDED_MODEL and looks_like_path(base) and not Path(base).expanduser().is_dir():
        raise ModelLoadError(
            f"Base model directory {base} does not exist. Set --base-model / PUBMEDQA_BASE_MODEL to "
            f"'{EMBEDDED_MODEL}', a Hub model id or an existing folder."
        )


def _resolve(settings: BaseModelSettings) -> tuple[str, str]:
    """(folder or Hub id to load from, human description)."""
    base = settings.base_model
    if base == EMBEDDED_MODEL:
        return str(embedded_checkpoint(settings.cache_dir)), EMBEDDED_DESCRIPTION
    check_base_source(settings)
    return (str(Path(base).expanduser()) if looks_like_path(base) else base), base


def _quantization_config(kind: str, cuda: bool) -> Any:
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
        # bf16 storage lets FSDP shard 4-bit weights with the rest (QLoRA across GPUs); the kernels are the same.
        bnb_4bit_quant_storage=torch.bfloat16 if cuda else torch.uint8,
    )


def load_tokenizer(settings: BaseModelSettings) -> tuple[Any, str, str, bool]:
    """(tokenizer, folder or Hub id it came from, description, whether a pad token had to be added)."""
    from transformers import AutoTokenizer

    source, description = _resolve(settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load the tokenizer of {description!r}: {exc}. Check --base-model / PUBMEDQA_BASE_MODEL "
            "(and HF_TOKEN for gated models)."
        ) from exc
    tokenizer_changed = tokenizer.pad_token_id is None
    if tokenizer_changed:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source, description, tokenizer_changed


def load_base_model(settings: BaseModelSettings) -> BaseModel:
    """The base model and tokenizer, quantised as configured; if 4/8-bit cannot load, bf16 with one log line."""
    from transformers import AutoModelForCausalLM

    tokenizer, source, description, tokenizer_changed = load_tokenizer(settings)
    logger.info("Loading base model %s (quantization: %s)", description, settings.quantization)
    common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}

    cuda = torch.cuda.is_available()
    placement = {"device_map": "auto"} if cuda else {}
    quantization = settings.quantization
    if quantization in ("4bit", "8bit"):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, quantization_config=_quantization_config(quantization, cuda), **placement, **common
            )
            return BaseModel(model, tokenizer, description, quantization, source, tokenizer_changed)
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as exc:
            logger.warning(
                "%s quantization is not available here (%s: %s); loading %s in bf16 instead.",
                quantization, type(exc).__name__, exc, description,
            )
            quantization = "none (bf16 fallback)"
    # "none" is full precision on a CPU; a GPU (and the fallback) always runs bf16.
    dtype = torch.bfloat16 if cuda or quantization != "none" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement, **common)
    except OSError as exc:
        reason = str(exc).rstrip(". ")
        raise ModelLoadError(f"Could not load model {description!r}: {reason}. Check --base-model / PUBMEDQA_BASE_MODEL.") from exc
    if quantization == "none":
        quantization = f"none ({str(dtype).removeprefix('torch.')})"
    return BaseModel(model, tokenizer, description, quantization, source, tokenizer_changed)
