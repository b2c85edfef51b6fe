"""Refusals and failures in OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from app.validation import UserInputError
from pubmedqa.engines.base import AdapterUnavailableError, EngineError
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type_: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def as_api_error(exc: BaseException) -> ApiError:
    """What a failure means to an API caller (the same errors the page turns into messages)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserInputError):
        return ApiError(400, str(exc))
    if isinstance(exc, AdapterUnavailableError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelLoadError):
        return ApiError(503, f"The model is not available: {exc}", code="model_unavailable")
    if isinstance(exc, EngineError):
        return ApiError(502, str(exc), code="engine_error")
    logger.error("API request failed", exc_info=exc)
    return ApiError(500, f"Generation failed ({type(exc).__name__}). Please try again.")
