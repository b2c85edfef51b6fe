"""The old spellings of moved commands (``python -m training.train``), kept working for one release."""

from __future__ import annotations

import importlib
import sys


def run_moved(old: str, new: str) -> None:
    """Run command ``new`` where ``old`` was asked for, saying so in one line."""
    print(f"`python -m {old}` is now `python -m {new}`; the old spelling goes in the next release.", file=sys.stderr)
    sys.exit(importlib.import_module(new).main())
