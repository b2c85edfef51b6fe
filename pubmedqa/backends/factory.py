"""Which backend serves the model, chosen by the settings: kept outside the interface, which knows no implementation."""

from __future__ import annotations

from pubmedqa.backends.base import ModelBackend
from pubmedqa.backends.remote import RemoteBackend
from pubmedqa.backends.transformers_backend import TransformersBackend
from pubmedqa.config import ModelSettings


def create_backend(settings: ModelSettings) -> ModelBackend:
    """The backend ``settings.backend`` names."""
    if settings.backend == "openai":
        return RemoteBackend(settings)
    return TransformersBackend(settings)
