"""Limits on what any HTTP request may send or see, for every route of the server (Gradio's own included).

- Routes that take files (uploads, screen recordings, streamed media) are refused before a byte of the body is read:
  the page has no file input, and Gradio keeps every file it receives on the server's disk.
- Every other request body is read here first, up to :data:`MAX_BODY_BYTES`; a longer one is refused with 413, so no
  route can be sent an unbounded body (a declared length, or a chunked body that runs past the limit).

``/v1`` bounds its own bodies (its 413 has OpenAI's error shape) and is passed through unread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse

from app.rate_limits import log_refusal

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any question, context and history the limits allow
#: Gradio routes that accept files and keep them on disk, wherever the page is mounted.
FILE_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording")
STREAMED_MEDIA = "/gradio_api/stream/"  # streamed inputs (microphone, webcam) and their media
SELF_BOUNDED = "/v1"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BoundedRequests:
    """ASGI middleware applying the module's limits."""

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.rstrip("/").endswith(FILE_ROUTES) or STREAMED_MEDIA in path:
            await _refuse(403, "This app accepts no file uploads.", scope, receive, send)
            return
        if scope["method"] not in _BODY_METHODS or path == SELF_BOUNDED or path.startswith(SELF_BOUNDED + "/"):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            await _refuse(413, f"The request body is larger than {self.max_body_bytes:,} bytes.", scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The whole body, or None once it is longer than the limit (declared or received)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        return await read_bounded(_received_chunks(receive), declared, self.max_body_bytes)


async def read_bounded(chunks: AsyncIterator[bytes], declared: str | bytes | None,
                       limit: int = MAX_BODY_BYTES) -> bytes | None:
    """A request body from ``chunks``, or None as soon as it is longer than ``limit``: its declared Content-Length
    (not read at all then) or what arrives."""
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _received_chunks(receive: Any) -> AsyncIterator[bytes]:
    """The body's chunks as the ASGI server delivers them, until the last (or the client goes away)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then whatever the client sends next (a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(status: int, detail: str, scope: dict, receive: Any, send: Any) -> None:
    log_refusal("Refused %s %s: %s", scope["method"], scope["path"][:100], detail)
    await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
