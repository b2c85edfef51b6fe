"""The evaluation runs the app shows: the shipped ones and its own, offered by name.

A visitor picks a run from a list; the value sent back is a name from that list, looked up here among the folders the
app found itself. Whatever else arrives (a path, ``..``, a name of a folder that is a symlink leading out) matches
nothing and is refused before any file is read, and no server path ever reaches the page.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

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
