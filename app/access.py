"""Who may do what: start an evaluation (:class:`OwnerAccess`), call the APIs (:func:`bearer_key_matches`).

Evaluations: anyone on an app that only this machine can reach; on a public one, the owner alone.

An evaluation holds the model for minutes to half an hour, so on a public page (a Space, or any interface other than
loopback) it is the owner's: signed in with Hugging Face (``gr.LoginButton``; the Space needs ``hf_oauth: true`` in
its README front matter) as the owner user or a member of the owner organisation, or holding the admin key set in
``PUBMEDQA_ADMIN_KEY``. With neither configured, nobody can start one there, and the page says why.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pubmedqa.config import ServerSettings

logger = logging.getLogger(__name__)

ADMIN_KEY_ENV = "PUBMEDQA_ADMIN_KEY"
API_KEY_ENV = "PUBMEDQA_API_KEY"  # read from the environment only, never a flag, never logged
MAX_LOCKOUT_S = 60.0  # the longest wait after wrong keys: a guesser is slowed down, the owner never locked out long
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class OwnerAccess:
    public: bool  # reachable from other machines (or a Space)
    owner: str  # Hugging Face user or organisation that owns the app
    sign_in: bool  # Hugging Face sign-in is available (a Space with hf_oauth)
    admin_key: str | None = field(default=None, repr=False)
    _failures: KeyFailures = field(default_factory=lambda: KeyFailures(), repr=False, compare=False)

    @classmethod
    def from_settings(cls, server: ServerSettings, environ: Mapping[str, str] = os.environ) -> OwnerAccess:
        on_space = bool(environ.get("SPACE_ID"))
        public = on_space or server.server_name not in LOOPBACK
        sign_in = on_space and bool(environ.get("OAUTH_CLIENT_ID")) and bool(server.owner)
        return cls(public, server.owner, sign_in, environ.get(ADMIN_KEY_ENV) or None)

    @property
    def needs_key(self) -> bool:
        return self.public and self.admin_key is not None

    def closed_reason(self) -> str | None:
        """Why nobody can start an evaluation on this app, or None."""
        if not self.public or self.sign_in or self.admin_key:
            return None
        return (
            "Starting an evaluation is reserved for the owner of this public app, and it has no way to recognise them: "
            "on a Space, add hf_oauth: true to its README front matter (owner sign-in), or set the "
            f"{ADMIN_KEY_ENV} secret."
        )

    def how_to(self) -> str:
        """How the owner gets in, for the page (plain text: it is also shown in a toast, which renders no Markdown)."""
        if not self.public:
            return ""
        ways = ([f"sign in with Hugging Face as {self.owner}"] if self.sign_in else []) + (
            ["enter the admin key"] if self.admin_key else []
        )
        return self.closed_reason() or "Only the owner can start an evaluation here: " + " or ".join(ways) + "."

    def refusal(self, profile: Mapping[str, Any] | None, key: str = "") -> str | None:
        """None when this visitor may start an evaluation, else why not (one line)."""
        if not self.public:
            return None
        if reason := self.closed_reason():
            return reason
        if self.sign_in and profile is not None and self._is_owner(profile):
            return None
        if self.admin_key and key:
            if wait := self._failures.wait_s():
                return f"Too many wrong admin keys: try again in {wait:.0f} s."
            if secrets.compare_digest(key.encode(), self.admin_key.encode()):
                self._failures.reset()
                return None
            self._failures.add()
            return "Wrong admin key: only the owner can start an evaluation."
        return self.how_to()

    def _is_owner(self, profile: Mapping[str, Any]) -> bool:
        names = [profile.get("preferred_username")]
        names += [org.get("preferred_username") for org in profile.get("orgs") or [] if isinstance(org, Mapping)]
        return self.owner.lower() in {str(name).lower() for name in names if name}


class KeyFailures:
    """Wrong admin keys in a row: each one is logged on one line and doubles the wait before the next try is even
    compared (1, 2, 4 ... up to MAX_LOCKOUT_S seconds); the right key resets it. Counted for the whole app, since a
    guesser can change address at will."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._count = 0
        self._until = 0.0
        self._lock = threading.Lock()

    def wait_s(self) -> float:
        with self._lock:
            return max(0.0, self._until - self._clock())

    def add(self) -> None:
        with self._lock:
            self._count += 1
            self._until = self._clock() + min(MAX_LOCKOUT_S, 2.0 ** (self._count - 1))
            count = self._count
        logger.warning("Refused an evaluation start: wrong admin key (%d in a row)", count)

    def reset(self) -> None:
        with self._lock:
            self._count, self._until = 0, 0.0


def bearer_key_matches(headers: Mapping[str, str], key: str) -> bool:
    """Whether ``headers`` carry ``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, given = str(headers.get("authorization", "")).partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), key.encode())
