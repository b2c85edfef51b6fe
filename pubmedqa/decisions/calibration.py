"""Decision calibration: per-option log-probability offsets fitted on dev and shipped with an adapter.

A small model's option likelihoods carry a strong prior (Gemma 3 270M almost never says "maybe"). Adding one offset
per option before the softmax moves the decision boundary without touching the model; the offsets are fitted on
the dev questions (``training/calibrate.py``) or out of fold with a probe (``training/decision_probe.py``), and applied
by the adapter's decision policy (``policy.py``) alone, so that every backend, the evaluation and the app agree.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pubmedqa.adapter import CALIBRATION_FILE, Adapter
from pubmedqa.decisions.policy_files import engine_file
from pubmedqa.prompts import ANSWER_OPTIONS

logger = logging.getLogger(__name__)



class CalibrationError(ValueError):
    """A calibration file that cannot be used."""


def probabilities_from_log_scores(log_scores: dict[str, float]) -> dict[str, float]:
    """A softmax over the options' log-scores: probabilities that sum to 1."""
    top = max(log_scores.values())
    weights = {o: math.exp(v - top) for o, v in log_scores.items()}
    total = sum(weights.values())
    return {o: w / total for o, w in weights.items()}


@dataclass(frozen=True)
class DecisionCalibration:
    log_offsets: dict[str, float]
    fitted_on: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def apply(self, probabilities: dict[str, float]) -> dict[str, float]:
        """The option probabilities with the offsets added to their logarithms, renormalised."""
        return probabilities_from_log_scores(
            {o: math.log(max(p, 1e-30)) + self.log_offsets.get(o, 0.0) for o, p in probabilities.items()}
        )

    def offsets_vector(self) -> list[float]:
        """The offsets in the order of ``ANSWER_OPTIONS`` (0 for an option without one)."""
        return [self.log_offsets.get(option, 0.0) for option in ANSWER_OPTIONS]

    def save(self, directory: str | Path, engine: str | None = None) -> Path:
        path = Path(directory) / engine_file(CALIBRATION_FILE, engine)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def from_json(cls, text: str, origin: str) -> DecisionCalibration:
        try:
            data = json.loads(text)
            offsets = {str(k): float(v) for k, v in data["log_offsets"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationError(f"{origin} is not a decision calibration file ({type(exc).__name__}: {exc})") from exc
        unknown = set(offsets) - set(ANSWER_OPTIONS)
        if unknown or not all(math.isfinite(v) for v in offsets.values()):
            raise CalibrationError(f"{origin}: offsets must be finite numbers for {', '.join(ANSWER_OPTIONS)}")
        return cls(offsets, str(data.get("fitted_on", "")), dict(data.get("details") or {}))


def load_calibration(adapter: Adapter, engine: str | None = None) -> DecisionCalibration | None:
    """The calibration shipped with ``adapter`` for ``engine`` (None: the shared one; see
    ``policy_files.py``), or None when it has none or it is unusable — decisions then come from the raw option
    likelihoods, which is logged."""
    try:
        path = adapter.file(engine_file(CALIBRATION_FILE, engine))
        return DecisionCalibration.from_json(path.read_text(), path.name) if path is not None else None
    except Exception as exc:  # noqa: BLE001 - a missing or broken calibration must never stop the adapter
        logger.warning("Ignoring the adapter's decision calibration: %s", exc)
        return None
