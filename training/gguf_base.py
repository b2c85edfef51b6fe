"""The transformers checkpoint LoRA trains on when ``--base_model`` is a GGUF file (local or on the Hub).

llama.cpp serves the GGUF, but the trainer needs transformers weights, and the very ones the GGUF was converted from:
a LoRA fits the weights it was trained on. The embedded model keeps its own converted checkpoint
(``pubmedqa.embedded_model``); any other GGUF base gets ``--train_base_model``, or what the GGUF itself (or its Hub
repo's card) says it was converted from (``pubmedqa.gguf.source.transformers_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import logging

from pubmedqa.config import EMBEDDED_MODEL, BaseModelSettings
from pubmedqa.gguf.source import UnknownCheckpointError, is_gguf_base, resolve_gguf, transformers_checkpoint
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger("scripts.train")  # a step of the training script: logged under its name

FLAG = "--train_base_model"


def training_base(model_settings: BaseModelSettings, train_base_model: str = "") -> BaseModelSettings:
    """``model_settings`` with ``base_model`` set to what the trainer loads: unchanged for the embedded model and for
    a transformers model, the matching transformers checkpoint for any other GGUF base."""
    base = model_settings.base_model
    if base == EMBEDDED_MODEL or not is_gguf_base(base):
        if train_base_model:
            raise ValueError(f"{FLAG} is for a GGUF --base_model; {base!r} is trained on as it is (drop {FLAG})")
        return model_settings
    if train_base_model:  # the flag wins, and spares downloading the GGUF just to read its header
        checkpoint, why = train_base_model, FLAG
    else:
        try:
            checkpoint, why = transformers_checkpoint(resolve_gguf(base)), "the GGUF's metadata"
        except UnknownCheckpointError as exc:
            raise ModelLoadError(
                f"{exc}. Pass the transformers model these weights are (Hub id or folder) with {FLAG} "
                "(env PUBMEDQA_TRAIN_BASE_MODEL)"
            ) from None
    logger.info("Base model %s is a GGUF file: LoRA trains on its transformers checkpoint %s (from %s)", base, checkpoint, why)
    return dataclasses.replace(model_settings, base_model=checkpoint)
