"""Command-line entry point: parse settings, create the model registry, build and launch the app."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from app.backend import create_backend
from app.config import ModelSettings, ServerSettings, parse_settings
from app.model_loading import ModelLoadError
from app.ui.interface import build_app

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, server = parse_settings([ModelSettings, ServerSettings], argv)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    registry = create_backend(model_settings)
    try:
        registry.check_sources()
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 2
    if server.preload:
        registry.load_in_background()
    demo = build_app(registry, server)
    demo.launch(server_name=server.server_name, server_port=server.server_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
