"""The page's ``gr.Blocks``: what a visitor sends to its events is refused plainly when the page's components cannot
take it, and no event takes a file.

Gradio prints a full traceback for each value a component cannot preprocess (about 1.7 KB in the log per bad
request), and fetches into its cache any file a value points to, a URL included. Here a bad value gets a plain
message and one throttled log line (the traceback only at debug level), and a value holding a file reference is
refused before Gradio looks at it: the page has no file input.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import gradio as gr

from app.rate_limits import log_refusal

logger = logging.getLogger(__name__)

BAD_VALUE = "A value sent with this request is not one this page can take. Please reload the page and try again."
NO_FILES = "This app takes no files."


class BadValueError(gr.Error):
    """A visitor sent a value the event's components cannot take (shown as it is, no traceback)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)


class PageBlocks(gr.Blocks):
    """``gr.Blocks`` whose events refuse bad values and file references (see the module's docstring), and whose
    queue stays within its size with validators."""

    def queue(self, *args: Any, **kwargs: Any) -> PageBlocks:
        """As Gradio's, with submissions admitted one at a time: Gradio checks the queue's size before it awaits an
        event's validator and adds the event after it, so submissions arriving together would all pass the check
        and the queue would grow past ``max_size``."""
        blocks = super().queue(*args, **kwargs)
        push, lock = self._queue.push, asyncio.Lock()

        async def one_at_a_time(*push_args: Any, **push_kwargs: Any) -> Any:
            async with lock:
                return await push(*push_args, **push_kwargs)

        self._queue.push = one_at_a_time
        return blocks

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        name = getattr(getattr(block_fn, "fn", None), "__name__", "an event")
        if _holds_file(inputs):
            log_refusal("Refused a request to %s: it holds a file reference", name)
            raise BadValueError(NO_FILES)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except BadValueError:
            raise
        except Exception as exc:  # the component's own check, or the event's number of inputs
            log_refusal("Refused a request to %s: %s", name, str(exc).splitlines()[0][:200] if str(exc) else type(exc))
            logger.debug("The refused values' error", exc_info=True)
            raise BadValueError(BAD_VALUE) from None

    async def process_api(self, block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As Gradio's, but a validator's bad values fail the validation: Gradio would print the error of a
        validator that raises, not refuse it quietly."""
        try:
            return await super().process_api(block_fn, inputs, *args, **kwargs)
        except BadValueError as exc:
            fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
            if not getattr(fn, "is_validator_function", False):
                raise
            return {"data": [gr.validate(i > 0, exc.message) for i in range(len(fn.inputs))]}


def _holds_file(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds a Gradio file reference (a dict with a "path") at any depth Gradio would look."""
    if depth > 32:
        return True  # nesting no page value has
    if isinstance(value, dict):
        return "path" in value or any(_holds_file(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_file(v, depth + 1) for v in value)
    return False
