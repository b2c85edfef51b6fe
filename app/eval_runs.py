"""The evaluation runs the app shows: the shipped ones and its own, offered by name.

A visitor picks a run from a list; the value sent back is a name from that list, looked up here among the folders the
app found itself. Whatever else arrives (a path, ``..``, a name of a folder that is a symlink leading out) matches
nothing and is refused before any file is read, and no server path ever reaches the page. The runs are listed from
disk at each call, so a run written after start-up (by this app or another) is offered at the next refresh.

:class:`CsvExports` holds the per-example CSV files the dashboard offers for download, in one bounded folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from pubmedqa.config import PROJECT_ROOT
from pubmedqa.evaluation.results import RESULTS_FILE

logger = logging.getLogger(__name__)

SHIPPED_RUNS = PROJECT_ROOT / "assets" / "eval"  # runs shipped with the app, one folder each
SHIPPED, OWN = "shipped", "run here"


class UnknownRunError(LookupError):
    """The requested run is not one the app offers."""


@dataclass(frozen=True)
class EvalRun:
    key: str  # what the page sends back: "<kind>/<folder name>"
    label: str  # what the page shows
    path: Path  # never leaves the server


class RunCatalogue:
    """The shipped runs and the app's own (in ``own_dir``, at most ``keep`` of them)."""

    def __init__(self, own_dir: str | Path, keep: int, shipped_dir: Path = SHIPPED_RUNS):
        self.own_dir = Path(own_dir)
        self.keep = keep
        self.shipped_dir = shipped_dir

    def runs(self) -> list[EvalRun]:
        """Shipped runs first, then the app's own, each newest first: the first is the latest shipped run (that of
        the shipped adapter), which the dashboard opens on."""
        shipped = sorted(_runs_in(self.shipped_dir, SHIPPED), key=_created, reverse=True)
        return shipped + _runs_in(self.own_dir, OWN)[::-1]

    def choices(self) -> list[tuple[str, str]]:
        """(label, key) pairs for a dropdown."""
        return [(run.label, run.key) for run in self.runs()]

    def resolve(self, key: str) -> EvalRun:
        for run in self.runs():
            if run.key == key:
                return run
        raise UnknownRunError("Unknown evaluation run: choose one from the list.")

    def new_run_dir(self) -> Path:
        return self.own_dir / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"

    def own_key(self, run_dir: Path) -> str:
        """The key of a run the app wrote in ``run_dir``."""
        return f"{OWN}/{run_dir.name}"

    def prune(self) -> list[str]:
        """Remove the app's oldest runs beyond ``keep``; the names removed."""
        own = _runs_in(self.own_dir, OWN)
        removed = []
        for run in own[: max(0, len(own) - self.keep)]:
            try:
                shutil.rmtree(run.path)
                removed.append(run.path.name)
            except OSError as exc:
                logger.warning("Could not remove the old evaluation run %s: %s", run.path.name, exc)
        if removed:
            logger.info("Removed %d old evaluation run(s), keeping %d: %s", len(removed), self.keep, ", ".join(removed))
        return removed


def _created(run: EvalRun) -> str:
    """When the run was made (ISO 8601, so it sorts as text), as its results say; '' when they do not."""
    try:
        return str(json.loads((run.path / RESULTS_FILE).read_text())["run"]["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _runs_in(root: Path, kind: str) -> list[EvalRun]:
    """Run folders directly under ``root`` (oldest first by name), skipping anything that leads outside it."""
    try:
        base = root.resolve(strict=True)
        children = sorted(root.iterdir())
    except OSError:
        return []
    runs = []
    for child in children:
        results = child / RESULTS_FILE
        if child.is_symlink() or results.is_symlink() or not results.is_file() or child.resolve().parent != base:
            continue
        runs.append(EvalRun(f"{kind}/{child.name}", f"{child.name} · {kind}", child.resolve()))
    return runs


def file_slug(text: str) -> str:
    """``text`` as a file-name part: letters, digits, dots and dashes ("fine-tuned right, base wrong" ->
    "fine-tuned-right-base-wrong")."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.").lower() or "run"


class CsvExports:
    """The per-example CSVs the dashboard offers for download, in one folder the app owns.

    Every page load and filter change offers a CSV; a new temporary folder each time grew the disk without bound. Here
    there is one file per (run, filter), rewritten in place (atomically: a download under way keeps the old copy),
    at most ``cap`` files in all (the least recently written go first), and the folder is removed when the app exits.
    It lies under the system's temp folder, which Gradio serves files from; the name a visitor sees is the file's
    own, ``pubmedqa-eval-<run>-<filter>.csv``, never the folder.
    """

    def __init__(self, cap: int = 32, root: Path | None = None):
        self.cap = cap
        self._root = root
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        """The app's CSV folder, made on first use."""
        with self._lock:
            return self._folder()

    def _folder(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="pubmedqa-eval-csv-"))
            weakref.finalize(self, shutil.rmtree, self._root, True)  # at exit, or when the app is dropped
        return self._root

    def name(self, run: EvalRun, filter_name: str) -> str:
        return f"pubmedqa-eval-{file_slug(run.path.name)}-{file_slug(filter_name)}.csv"

    def write(self, run: EvalRun, filter_name: str, frame: pd.DataFrame) -> Path:
        """The CSV of ``frame`` (``run``'s examples through ``filter_name``); the path to offer."""
        # A folder per kind: a run of the app's own may share its name with a shipped one.
        return self.write_named(file_slug(run.key.split("/", 1)[0]), self.name(run, filter_name), frame)

    def write_named(self, kind: str, name: str, frame: pd.DataFrame) -> Path:
        """The CSV of ``frame`` as ``<kind>/<name>`` in the folder, rewritten in place; the path to offer."""
        with self._lock:
            folder = self._folder() / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                    frame.to_csv(handle, index=False)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._prune(keep=path)
        return path

    def files(self) -> list[Path]:
        root = self._root
        return sorted(root.rglob("*.csv")) if root is not None and root.is_dir() else []

    def _prune(self, keep: Path) -> None:
        def written(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return 0.0

        files = sorted((p for p in self.files() if p != keep), key=written)
        for old in files[: max(0, len(files) + 1 - self.cap)]:
            old.unlink(missing_ok=True)
