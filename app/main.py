"""Command-line entry point: parse settings, create the model engine, then serve the page at ``/`` and the
OpenAI-compatible API at ``/v1`` from one process on one port (``python app.py``, also on a Space)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import gradio as gr
import uvicorn
from fastapi import FastAPI

from app.access import OwnerAccess
from app.http_limits import BoundedRequests
from app.mcp_bridge import McpCallers
from app.openai_api import API_KEY_ENV, create_app, uvicorn_config
from app.rate_limits import EvidenceQuota, visitor_key
from app.ui.interface import build_app
from app.ui.mcp_tools import configure_mcp_tools
from pubmedqa.config import EvidenceSettings, ModelSettings, ServerSettings, parse_settings
from pubmedqa.engines.base import Engine
from pubmedqa.engines.factory import create_engine
from pubmedqa.evidence import EvidenceSearch
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger(__name__)

# Seconds uvicorn waits for open connections (the page keeps an event stream open) when the app is stopped.
SHUTDOWN_GRACE_S = 3


def build_server(engine: Engine, server: ServerSettings, search: EvidenceSearch | None = None) -> FastAPI:
    """The one ASGI app ``python app.py`` serves: the OpenAI-compatible API at ``/v1`` (:mod:`app.openai_api`) and
    the Gradio page mounted at ``/`` (Gradio's documented ``gr.mount_gradio_app``; its queue starts with the app).
    Both use ``engine``, the limits in ``server`` and ``search`` for evidence (None: off)."""
    quota = EvidenceQuota(server.evidence_per_minute, OwnerAccess.from_settings(server).public)  # page and /v1 alike
    demo = build_app(engine, server, search, quota)
    app = create_app(engine, server, page=demo, search=search, evidence_quota=quota)
    app.add_middleware(McpCallers, visitor=lambda request: visitor_key(request, server.trusted_proxy_hops),
                       mcp_server=lambda: demo.mcp_server_obj)
    app.add_middleware(BoundedRequests)  # no file routes, bounded bodies: on every route, Gradio's included
    mounted = gr.mount_gradio_app(
        app, demo, path="/", server_name=server.server_name, server_port=server.server_port,
        root_path=os.environ.get("GRADIO_ROOT_PATH") or None,
        show_error=False,  # as demo.launch() does: unexpected errors are logged, not shown with their details
        # Gradio's /monitoring routes give anyone per-event request counts and success rates: not on a public app.
        enable_monitoring=False if OwnerAccess.from_settings(server).public else None,
        mcp_server=server.mcp_server,
    )
    if server.mcp_server:
        configure_mcp_tools(demo)
    return mounted


class AppServer(uvicorn.Server):
    """uvicorn, ending the page's open event streams (Gradio's session heartbeats) when it stops, as
    ``demo.close()`` does for a launched app: otherwise every open page holds the shutdown for the grace period."""

    async def shutdown(self, sockets: list | None = None) -> None:
        for route in getattr(self.config.app, "routes", []):
            stop = getattr(getattr(route, "app", None), "stop_event", None)  # the mounted gradio.routes.App
            if stop is not None:
                stop.set()
        await super().shutdown(sockets)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, server, evidence = parse_settings([ModelSettings, ServerSettings, EvidenceSettings], argv)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    engine = create_engine(model_settings)
    try:
        engine.check_sources()
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 2
    search = EvidenceSearch(evidence) if evidence.evidence != "off" else None
    try:
        app = build_server(engine, server, search)
    except Exception:  # e.g. sign-in configured (hf_oauth) without its libraries: say so, traceback included
        logger.exception("The app could not start")
        return 1
    if server.preload:  # after the page is built, so that a start-up error is never interleaved with model loading
        engine.load_in_background()
    url = f"http://{server.server_name}:{server.server_port}"
    key = f"key required: {API_KEY_ENV} is set" if os.environ.get(API_KEY_ENV) else f"open: set {API_KEY_ENV} for a key"
    logger.info("Serving the page at %s/ and the OpenAI-compatible API at %s/v1 (%s)", url, url, key)
    logger.info("Evidence: %s", f"source {evidence.evidence}" if search is not None else "off")
    AppServer(uvicorn_config(app, server.server_name, server.server_port, SHUTDOWN_GRACE_S)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
