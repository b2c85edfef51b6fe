"""How the app is served by uvicorn (:func:`uvicorn_config`), and serving it on a free localhost port in a background
thread, for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI


def uvicorn_config(app: Any, host: str, port: int, grace_s: float) -> uvicorn.Config:
    """uvicorn's settings for the app. Its proxy-header rewriting is off: with it, uvicorn takes the client's address
    from X-Forwarded-For whenever the peer is on loopback, which a client on this machine could forge; the
    per-visitor limits read the proxies' hops themselves (:func:`app.rate_limits.visitor_key`)."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s,
                          proxy_headers=False)


def serve_in_thread(app: FastAPI, timeout_s: float = 30.0, server_class: type | None = None) -> tuple[str, Any]:
    """Serve ``app`` (from :func:`create_app`, or :func:`app.main.build_server` with ``server_class``
    :class:`app.main.AppServer`) on a free localhost port in a daemon thread, for tests and benchmarks: its /v1 URL
    and the uvicorn server (set ``should_exit`` to stop it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = (server_class or uvicorn.Server)(uvicorn_config(app, "127.0.0.1", port, grace_s=2))
    threading.Thread(target=server.run, name="openai-api-server", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {timeout_s:g} s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server
