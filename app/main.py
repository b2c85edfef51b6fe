"""Command-line entry point: parse settings, create the model backend, build and launch the app."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from app.ui.interface import build_app
from pubmedqa.backends.factory import create_backend
from pubmedqa.config import ModelSettings, ServerSettings, parse_settings
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, server = parse_settings([ModelSettings, ServerSettings], argv)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    backend = create_backend(model_settings)
    try:
        backend.check_sources()
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 2
    if server.preload:
        backend.load_in_background()
    demo = build_app(backend, server)
    demo.launch(server_name=server.server_name, server_port=server.server_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
