"""Talking to the Hugging Face Hub: one place that turns the Hub client's failures into one-line messages without
secrets. The token comes from HF_TOKEN or the cached `huggingface-cli login` and is never printed."""

from __future__ import annotations

import contextlib
from typing import Iterator


class HubError(RuntimeError):
    """A Hub operation failed; the message says why in one line, without secrets."""


@contextlib.contextmanager
def hub_errors(action: str) -> Iterator[None]:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        yield
    except LocalTokenNotFoundError:
        raise HubError(f"{action}: no Hugging Face token; set HF_TOKEN or run `huggingface-cli login`") from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise HubError(f"{action}: the Hub refused it (HTTP {status}); check the repo id and the token's write access") from None
    except Exception as exc:  # network errors come from httpx and friends; their text is not shown (could hold URLs)
        raise HubError(f"{action}: could not reach the Hugging Face Hub ({type(exc).__name__}); check the network") from None
