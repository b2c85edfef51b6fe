"""Fit an adapter's decision calibration on the dev questions and save it next to the adapter.

    python -m training.calibrate --adapter outputs/adapter        # writes outputs/adapter/decision_calibration.json

``python -m training.train`` does this at the end of training; this command (re)fits an existing adapter, e.g.
after changing how the app loads the base (quantization moves the option likelihoods a little). Only the dev split
is used — the offsets never see a test question.
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pubmedqa.adapter import PROBE_FILE
from pubmedqa.backends.base import LoadedModel, ModelBackend, Variant
from pubmedqa.backends.factory import create_backend
from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.data import DataFormatError, SplitSettings
from pubmedqa.decisions.calibration import DecisionCalibration
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.evaluation.metrics import decision_metrics
from pubmedqa.evaluation.runner import in_batches
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import ANSWER_OPTIONS, fit_prompt

logger = logging.getLogger("training.calibrate")

OFFSET_GRID = np.round(np.arange(-4.0, 4.0 + 1e-9, 0.25), 2)


def _selection_scores(predicted: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(accuracy + macro-F1) / 2 of each candidate's predictions (candidates x examples), computed at once."""
    accuracy = (predicted == gold[None, :]).mean(axis=1)
    f1s = []
    for k in range(len(ANSWER_OPTIONS)):
        tp = ((predicted == k) & (gold[None, :] == k)).sum(axis=1)
        fp = ((predicted == k) & (gold[None, :] != k)).sum(axis=1)
        fn = ((predicted != k) & (gold[None, :] == k)).sum(axis=1)
        f1s.append(np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0))
    return (accuracy + np.mean(f1s, axis=0)) / 2


#: How the offsets are chosen. "score": the best (accuracy + macro-F1) / 2 on the fitting examples. "shares": the
#: offsets whose predicted decisions come closest to the gold decisions' counts, then the best score among those —
#: with a weak reader, the score alone lets the predicted shares drift far from the gold ones, either way.
OFFSET_OBJECTIVES = ("score", "shares")


def fit_calibration(
    probabilities: Sequence[dict[str, float]], gold: Sequence[str], fitted_on: str, objective: str = "score"
) -> DecisionCalibration:
    """The offsets (yes fixed at 0) chosen by ``objective`` (:data:`OFFSET_OBJECTIVES`) on these examples; the
    score is the one that picks the best checkpoint. Among equally good offsets the smallest wins, so a calibration
    that cannot help changes nothing."""
    if objective not in OFFSET_OBJECTIVES:
        raise ValueError(f"unknown offset objective {objective!r}; expected one of {', '.join(OFFSET_OBJECTIVES)}")
    log_probs = np.log(np.clip([[p[o] for o in ANSWER_OPTIONS] for p in probabilities], 1e-30, None))
    gold_ids = np.array([ANSWER_OPTIONS.index(g) for g in gold])
    candidates = np.array([(0.0, a, b) for a, b in itertools.product(OFFSET_GRID, OFFSET_GRID)])
    predicted = np.argmax(log_probs[None, :, :] + candidates[:, None, :], axis=2)  # candidates x examples
    size = np.abs(candidates).sum(axis=1)
    keys = [size, -_selection_scores(predicted, gold_ids)]  # np.lexsort: the last key is the primary one
    if objective == "shares":
        counts = np.stack([(predicted == k).sum(axis=1) for k in range(len(ANSWER_OPTIONS))], axis=1)
        keys.append(np.abs(counts - np.bincount(gold_ids, minlength=len(ANSWER_OPTIONS))).sum(axis=1))
    best = candidates[np.lexsort(keys)[0]]
    calibration = DecisionCalibration(dict(zip(ANSWER_OPTIONS, best.tolist())), fitted_on)
    before = decision_metrics(list(gold), [predicted_decision(p) for p in probabilities])
    after = decision_metrics(list(gold), [predicted_decision(calibration.apply(p)) for p in probabilities])
    summary: dict = {
        name: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "predicted_counts": m["predicted_counts"]}
        for name, m in (("before", before), ("after", after))
    }
    summary["objective"] = objective
    logger.info(
        "Calibration on %s (%s): offsets %s; accuracy %.3f -> %.3f, macro-F1 %.3f -> %.3f, predicted %s -> %s",
        fitted_on, objective, calibration.log_offsets, before["accuracy"], after["accuracy"], before["macro_f1"],
        after["macro_f1"], before["predicted_counts"], after["predicted_counts"],
    )
    return DecisionCalibration(calibration.log_offsets, fitted_on, summary)


@dataclass
class CalibrateArguments(SplitSettings):
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass."})


def local_adapter_dir(model_settings: ModelSettings, what: str) -> Path:
    """The --adapter folder a command writes its ``what`` into, or a ValueError saying it must be one."""
    if not model_settings.adapter_source or not Path(model_settings.adapter_source).expanduser().is_dir():
        raise ValueError(f"--adapter must be a local adapter folder (the {what} is written into it)")
    return Path(model_settings.adapter_source).expanduser()


def load_adapter_to_fit(
    model_settings: ModelSettings, what: str, backend_factory: Callable[[ModelSettings], ModelBackend] = create_backend
) -> tuple[ModelBackend, LoadedModel]:
    """Load a local adapter folder as the app does (same quantization) for a command that writes its ``what`` into
    it, with a clear error where that cannot work."""
    local_adapter_dir(model_settings, what)
    backend = backend_factory(model_settings)
    loaded = backend.load()
    if not loaded.adapter_loaded:
        raise ModelLoadError(f"No {what} can be fitted: {backend.adapter_unavailable_reason()}")
    return backend, loaded


def calibrate_adapter(model_settings: ModelSettings, args: CalibrateArguments) -> Path:
    split = args.load_split()
    backend, loaded = load_adapter_to_fit(model_settings, "calibration")
    if loaded.policy.probe is not None:
        raise ValueError(
            f"{model_settings.adapter_source} decides with its decision probe: refit the probe and its offsets (out of "
            f"fold, on 500 questions) with `python -m training.decision_probe --adapter {model_settings.adapter_source}`; "
            f"for a server's own logits, calibrate a copy without {PROBE_FILE}"
        )
    # Dev only: on training questions the adapter is over-confident, and offsets fitted there over-correct (tried:
    # fitted on train + dev, test accuracy fell from 55.4 % to 49.2 %).
    questions = split.dev
    prompts = [fit_prompt(r.prompt_input(), loaded.tokenizer, backend.prompt_budget(1)) for r in questions]
    probabilities = in_batches(
        prompts, args.batch_size,
        lambda batch: backend.score_decisions(batch, [Variant.TUNED] * len(batch), len(batch), calibrated=False),
        "dev: decisions",
    )
    calibration = fit_calibration(
        probabilities, [r.final_decision for r in questions],
        f"dev ({len(questions)} questions, {loaded.quantization})",
    )
    return calibration.save(model_settings.adapter_source)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = parse_settings([ModelSettings, CalibrateArguments], argv)
        path = calibrate_adapter(model_settings, args)
    except (DataFormatError, ModelLoadError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
