"""Reviewer votes from the Compare tab: one JSON line per vote in a local file, optionally synced to a Hub dataset
with ``huggingface_hub.CommitScheduler`` (the Space pattern for collecting feedback)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, defaultdict, deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VOTE_CHOICES = ("base better", "fine-tuned better", "tie", "both bad")


class VoteError(RuntimeError):
    """A vote could not be recorded; the message says why."""


def context_hash(context: str) -> str:
    return hashlib.sha256(context.encode("utf-8")).hexdigest()[:16] if context else ""


class VoteLog:
    def __init__(self, path: str | Path, hub_repo: str = ""):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._scheduler = None
        if hub_repo:
            try:
                from huggingface_hub import CommitScheduler

                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._scheduler = CommitScheduler(
                    repo_id=hub_repo, repo_type="dataset", folder_path=self.path.parent, path_in_repo="votes", every=5
                )
                self._lock = self._scheduler.lock  # the scheduler must not upload a half-written line
            except Exception as exc:  # no token, no network: votes stay local, the app keeps running
                logger.warning("Vote sync to %s is off (%s); votes are kept in %s", hub_repo, type(exc).__name__, self.path)

    def append(self, vote: str, record: dict[str, Any]) -> None:
        if vote not in VOTE_CHOICES:
            raise VoteError(f"Unknown vote {vote!r}: choose one of {', '.join(VOTE_CHOICES)}.")
        line = json.dumps({"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "vote": vote, **record},
                          ensure_ascii=False)
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _append_whole(self.path, (line + "\n").encode("utf-8"))
            except OSError as exc:
                logger.error("Could not record a vote in %s: %s", self.path, exc)
                raise VoteError(
                    f"The vote could not be saved ({exc.strerror or type(exc).__name__}); earlier votes are safe. "
                    "Please tell the owner."
                ) from None

    def summary(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                counts[json.loads(line)["vote"]] += 1
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a damaged line costs itself, not the summary
        return {choice: counts.get(choice, 0) for choice in VOTE_CHOICES}


def _append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` completely or not at all: a full disk can leave half a line, which would swallow
    the next vote, so a failed write is cut off again."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


class VoteLimiter:
    """At most ``per_minute`` votes per browser session in any 60 seconds."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._times: defaultdict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, session: str) -> bool:
        """Whether ``session`` may vote now; an allowed vote counts against it."""
        now = self._clock()
        with self._lock:
            recent = self._times[session]
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if len(recent) >= self.per_minute:
                return False
            recent.append(now)
            if len(self._times) > 10_000:  # forget idle sessions so the table stays small
                for key in [k for k, v in self._times.items() if not v or now - v[-1] >= 60]:
                    del self._times[key]
            return True
