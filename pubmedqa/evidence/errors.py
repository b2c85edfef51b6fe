"""The one exception evidence retrieval raises internally, and the redaction every message and log line goes
through."""

from __future__ import annotations

import re

# Why PubMed could not be used, as short words the user reads inside one sentence.
TIMEOUT = "timeout"
RATE_LIMITED = "rate limited"
BAD_RESPONSE = "unreadable response"

# Reasons that say PubMed is down or unreachable from here (as opposed to one bad answer): 'auto' remembers them
# and uses the local index for a while without trying PubMed again.
UNREACHABLE_PREFIXES = (TIMEOUT, "DNS", "connection", "server error", "network")


class EvidenceUnavailable(Exception):
    """A source of evidence could not be used. ``reason`` is a few words ("timeout", "connection refused",
    "server error, HTTP 503"); ``str(exc)`` and :attr:`user_message` are one line meant for the user. Neither ever
    holds the NCBI API key."""

    def __init__(self, reason: str, source: str = "PubMed", message: str | None = None) -> None:
        self.reason = reason
        self.source = source
        self.user_message = message or f"{source} could not be reached ({reason}); answering without evidence."
        super().__init__(self.user_message)

    @property
    def unreachable(self) -> bool:
        return is_unreachable(self.reason)


def is_unreachable(reason: str) -> bool:
    """Whether ``reason`` says PubMed is down or unreachable from here, rather than one answer having been bad."""
    return reason.startswith(UNREACHABLE_PREFIXES)


_KEY_PARAM = re.compile(r"(api_key=)[^&\s\"']+", re.IGNORECASE)


def redact(text: str, secret: str | None = None) -> str:
    """``text`` with the API key removed: any ``api_key=...`` query parameter, and the key's value wherever it
    appears (an exception's text may quote a request)."""
    text = _KEY_PARAM.sub(r"\1***", text)
    if secret:
        text = text.replace(secret, "***")
    return text
