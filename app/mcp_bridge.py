"""Who calls an MCP tool, carried across Gradio's loopback.

Gradio's MCP server (``/gradio_api/mcp``) runs a queued tool by submitting it to the app's own queue through
``gradio_client`` on a loopback connection, with the MCP request's headers copied: the signed-in account's cookie,
the API key and X-Forwarded-For travel, the socket's address does not (every call would come from 127.0.0.1, one
budget for every MCP client). :class:`McpCallers` names the visitor of each MCP request as
:func:`app.rate_limits.visitor_key` would and passes the name on in a header signed with a secret drawn at start-up;
:func:`bridged_visitor` trusts that header only with a valid signature from a loopback peer, so a client cannot
write it. It also points Gradio's loopback at the address the request arrived on (a mounted app is never
``launch()``-ed, which is where Gradio learns it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from typing import Any

MCP_PATH = "/gradio_api/mcp"
VISITOR_HEADER = "x-pubmedqa-visitor"
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_SECRET = secrets.token_bytes(32)  # never leaves the process except over loopback to itself


def _signed(visitor: str) -> str:
    return f"{visitor}|{hmac.new(_SECRET, visitor.encode(), hashlib.sha256).hexdigest()}"


def bridged_visitor(request: Any) -> str | None:
    """The visitor an MCP request named, when ``request`` is Gradio's loopback call for it (else None)."""
    headers = getattr(request, "headers", None)
    value = headers.get(VISITOR_HEADER) if headers is not None else None
    peer = getattr(getattr(request, "client", None), "host", None)
    if not value or peer not in _LOOPBACK:
        return None
    visitor, _, _signature = value.rpartition("|")
    return visitor if visitor and hmac.compare_digest(_signed(visitor), value) else None


class McpCallers:
    """ASGI middleware on the MCP routes: the visitor's name for the loopback call, and the loopback's address."""

    def __init__(self, app: Any, visitor: Callable[[Any], str], mcp_server: Callable[[], Any]):
        self.app = app
        self._visitor = visitor  # visitor_key with the app's trusted proxy hops
        self._mcp_server = mcp_server  # the Blocks' GradioMCPServer, once mounted (None: MCP off)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and MCP_PATH in scope["path"] and (server := self._mcp_server()) is not None:
            from starlette.requests import Request

            headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != VISITOR_HEADER.encode()]
            scope = {**scope, "headers": headers}
            visitor = self._visitor(Request(scope))
            scope["headers"] = [*headers, (VISITOR_HEADER.encode(), _signed(visitor).encode())]
            if server.local_url is None and scope.get("server"):
                server._local_url = _loopback_url(scope["server"])  # what launch() would have set
        await self.app(scope, receive, send)


def _loopback_url(address: Iterable[Any]) -> str:
    host, port = tuple(address)[:2]
    host = f"[{host}]" if ":" in str(host) else host
    return f"http://{host}:{port}/"
