"""The models the API serves: their names and aliases (from :data:`pubmedqa.variants.NAMES`), whether the engine can
serve one now, and the model cards of ``GET /v1/models``."""

from __future__ import annotations

import time
from typing import Any

from app.openai_api.errors import ApiError
from app.validation import UserInputError, parse_variant
from pubmedqa import variants
from pubmedqa.engines.base import Engine, LoadedModel
from pubmedqa.variants import Variant

# The names come from the one table of variant names (pubmedqa.variants.NAMES).
BASE_MODEL_NAME = variants.NAMES[Variant.BASE].model_name
ADAPTER_MODEL_NAME = variants.NAMES[Variant.TUNED].model_name
MODEL_ALIASES: dict[str, Variant] = variants.MODEL_ALIASES
_STARTED = int(time.time())


class ServedModels:
    """The base model under ``base_name`` and, while the LoRA adapter is loaded, the tuned one under
    ``adapter_name`` (each also under its :data:`MODEL_ALIASES`)."""

    def __init__(self, engine: Engine, base_name: str, adapter_name: str):
        self.engine, self.base_name, self.adapter_name = engine, base_name, adapter_name

    def resolve(self, body: dict[str, Any]) -> tuple[str, Variant]:
        """The request's ``model`` and the variant it names; 404 if it names none, or the adapter is unavailable."""
        model = body.get("model")
        names = {self.base_name: Variant.BASE, self.adapter_name: Variant.TUNED}
        if not isinstance(model, str) or (model not in names and model not in MODEL_ALIASES):
            raise ApiError(404, f"The model {model!r} does not exist; this server serves "
                           f"{self.base_name!r} and {self.adapter_name!r}.", param="model", code="model_not_found")
        variant = names.get(model) or MODEL_ALIASES[model]
        try:
            parse_variant(variants.choice(variant), self.engine)  # the page's check: no adapter, or it failed to load
        except UserInputError as exc:
            raise self._no_adapter(model, str(exc)) from None
        return model, variant

    def require(self, model: str, variant: Variant) -> None:
        """Load the model (blocking) and check that it serves ``variant``."""
        if not self.engine.load().adapter_loaded and variant is Variant.TUNED:
            raise self._no_adapter(model)

    def cards(self, loaded: LoadedModel) -> list[dict[str, Any]]:
        served = [self.base_name] + ([self.adapter_name] if loaded.adapter_loaded else [])
        return [{"id": name, "object": "model", "created": _STARTED, "owned_by": "pubmedqa",
                 "max_model_len": loaded.context_window} for name in served]

    def _no_adapter(self, model: str, reason: str = "") -> ApiError:
        reason = reason or f"The fine-tuned model is not available: {self.engine.adapter_unavailable_reason()}."
        return ApiError(404, f"The model {model!r} does not exist: no adapter is loaded. {reason}", param="model",
                        code="model_not_found")
