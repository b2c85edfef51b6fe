"""Decision calibration: per-option log-probability offsets fitted on dev and shipped with an adapter.

A small model's option likelihoods carry a strong prior (Gemma 3 270M almost never says "maybe"). Adding one offset
per option before the softmax moves the decision boundary without touching the model; the offsets are fitted on
the dev questions (``scripts/calibrate.py``) or out of fold with a probe (``scripts/decision_probe.py``), and applied
by the adapter's decision policy (``policy.py``) alone, so that every engine, the evaluation and the app agree.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from pubmedqa.adapter import CALIBRATION_FILE, Adapter
from pubmedqa.decisions.options import option_probabilities
from pubmedqa.decisions.policy_files import engine_file
from pubmedqa.prompts import ANSWER_OPTIONS

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A calibration file that cannot be used."""


@dataclass(frozen=True)
class DecisionCalibration:
    log_offsets: dict[str, float]
    fitted_on: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def shift(self, option_logits: torch.Tensor, rows: torch.Tensor | None = None, sign: float = 1.0) -> torch.Tensor:
        """The one formula that applies the offsets: added to each row's option logits (rows x options, in the order of
        ``ANSWER_OPTIONS``), only in the rows where ``rows`` (rows x 1, bool) is set; ``sign=-1`` takes them off."""
        offsets = torch.tensor([self.log_offsets.get(o, 0.0) for o in ANSWER_OPTIONS], device=option_logits.device)
        offsets = sign * offsets.to(option_logits.dtype)
        return option_logits + (offsets if rows is None else offsets * rows)

    def apply(self, probabilities: Sequence[dict[str, float]], sign: float = 1.0) -> list[dict[str, float]]:
        """Decisions (option probabilities) with the offsets added (``sign=-1``: taken off, which gives back the
        decisions before the offsets, since a softmax ignores the constant its normalisation adds)."""
        if not probabilities:
            return []
        log_p = torch.tensor([[p[o] for o in ANSWER_OPTIONS] for p in probabilities], dtype=torch.float64)
        return option_probabilities(self.shift(log_p.clamp_min(1e-300).log(), sign=sign))

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
