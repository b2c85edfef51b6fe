"""Human ratings: the Compare tab's votes and the Chat's thumbs up/down, one JSON line each in one local file (a
Chat rating has ``"kind": "chat"``), optionally synced to a Hub dataset with ``huggingface_hub.CommitScheduler``
(the Space pattern for collecting feedback)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VOTE_CHOICES = ("base better", "fine-tuned better", "tie", "both bad")
RATING_CHOICES = ("like", "dislike")  # a Chat answer's thumbs up / down


class VoteError(RuntimeError):
    """A vote could not be recorded; the message says why."""


def context_hash(context: str) -> str:
    return hashlib.sha256(context.encode("utf-8")).hexdigest()[:16] if context else ""


class VoteLog:
    """The votes file, append-only and bounded: past ``max_bytes`` further votes are refused with a message (a public
    page's visitors must not be able to fill the disk), and the owner is told once in the log."""

    def __init__(self, path: str | Path, hub_repo: str = "", max_bytes: int = 20 << 20):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._full_logged = False
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
        if vote not in VOTE_CHOICES + RATING_CHOICES:
            raise VoteError(f"Unknown vote {vote!r}: choose one of {', '.join(VOTE_CHOICES + RATING_CHOICES)}.")
        line = json.dumps({"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "vote": vote, **record},
                          ensure_ascii=False)
        data = (line + "\n").encode("utf-8")
        with self._lock:
            if self._size() + len(data) > self.max_bytes:
                raise self._full()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _append_whole(self.path, data)
            except OSError as exc:
                logger.error("Could not record a vote in %s: %s", self.path, exc)
                raise VoteError(
                    f"The vote could not be saved ({exc.strerror or type(exc).__name__}); earlier votes are safe. "
                    "Please tell the owner."
                ) from None

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def _full(self) -> VoteError:
        if not self._full_logged:
            self._full_logged = True
            logger.warning("The votes file %s reached its limit of %.3g MB; new votes are refused (raise "
                           "--max_votes_mb or move the file away)", self.path, self.max_bytes / 2**20)
        return VoteError("Voting is closed for now: the vote box is full. Thank you — the owner has been told.")

    @property
    def full(self) -> bool:
        return self._size() >= self.max_bytes

    def records(self) -> list[dict[str, Any]]:
        """Every vote and rating in the file (at most ``max_bytes`` of it), oldest first; a damaged line costs
        itself, not the others."""
        try:
            with self.path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError:
            return []
        records = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("vote") in VOTE_CHOICES + RATING_CHOICES:
                records.append(record)
        return records

    def summary(self) -> dict[str, int]:
        """The Compare votes by choice."""
        counts = Counter(r["vote"] for r in self.records())
        return {choice: counts.get(choice, 0) for choice in VOTE_CHOICES}

    def reset(self) -> Path | None:
        """Start a new file (the owner's): the current one is kept beside it, renamed with the time, and no longer
        counted; None when there was nothing to reset."""
        with self._lock:
            if not self.path.is_file():
                return None
            kept = self.path.with_name(f"{self.path.stem}.until-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.jsonl")
            self.path.replace(kept)
            self._full_logged = False
        logger.info("Ratings reset by the owner; the earlier ones are kept in %s", kept)
        return kept


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
