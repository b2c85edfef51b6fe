"""llama.cpp's log in Python's ``logging`` (logger ``llama.cpp``), and the process's stderr left alone.

With ``verbose=False`` llama-cpp-python silences the native library by pointing file descriptors 1 and 2 at
/dev/null while a model or context loads (``llama_cpp._utils.suppress_stdout_stderr``). Descriptors belong to the
whole process, so while the app loads its model in a background thread, anything another thread writes to stderr
is lost: a start-up error's traceback vanished that way and a Space exited with status 1 and an empty log. Routing
the library's log callback into ``logging`` keeps it quiet without touching the descriptors.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from typing import Any

logger = logging.getLogger("llama.cpp")

# ggml_log_level (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous message). llama-cpp-python's
# own callback still maps the older order, which made INFO lines warnings.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONTINUE = 5
# Warnings that are llama.cpp's bookkeeping, one per tensor, not a fault: a LoRA over weights repacked for the CPU
# keeps its own tensors in the plain CPU buffer ("lora for 'blk.0.attn_q.weight' cannot use buft 'CPU_REPACK'").
_ROUTINE_WARNINGS = ("cannot use buft",)
_callback: Any = None  # kept referenced: llama.cpp holds only the raw function pointer
_pending = {"level": logging.DEBUG, "text": ""}


def _log_line(level: int, text: bytes, _user_data: Any) -> None:
    if level != _CONTINUE:
        _pending["level"] = _LEVELS.get(level, logging.DEBUG)
    _pending["text"] += text.decode("utf-8", errors="replace")
    if _pending["text"].endswith("\n"):  # llama.cpp sends a line in pieces
        line, _pending["text"] = _pending["text"].rstrip(), ""
        if line:
            routine = _pending["level"] == logging.WARNING and any(text in line for text in _ROUTINE_WARNINGS)
            logger.log(logging.DEBUG if routine else _pending["level"], "%s", line)


def route_llama_logs() -> None:
    """Send llama.cpp's log to ``logging`` and stop llama-cpp-python from redirecting the process's stdout/stderr.
    Idempotent; call it before the first model loads."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp
    import llama_cpp._internals
    import llama_cpp.llama

    _callback = llama_cpp.llama_log_callback(_log_line)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    # The names both modules imported; a llama-cpp-python that no longer has them fails here, loudly, in the tests.
    for module in (llama_cpp.llama, llama_cpp._internals):
        if not hasattr(module, "suppress_stdout_stderr"):
            raise RuntimeError(f"{module.__name__} no longer has suppress_stdout_stderr; update {__name__}")
        module.suppress_stdout_stderr = _streams_untouched


class _streams_untouched(contextlib.nullcontext):
    """Takes ``suppress_stdout_stderr``'s place: same signature, no redirection."""

    def __init__(self, disable: bool = True):
        super().__init__()
