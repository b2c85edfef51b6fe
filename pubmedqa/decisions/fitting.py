"""Fitting an adapter's decision policy: the decision probe (a regression on hidden states) and the decision offsets,
from features or option probabilities an engine read off labelled questions. The commands that read those
(``scripts/decision_probe.py``, ``scripts/calibrate.py``, ``scripts/train.py`` at its end) and the recipe benchmark
(``benchmarks/probe_recipe.py``) call these; the policy (``policy.py``) applies what they fit.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from pubmedqa.decisions.calibration import DecisionCalibration
from pubmedqa.decisions.options import option_probabilities, predicted_decision
from pubmedqa.decisions.probe import POOLINGS, DecisionProbe, pooled_part
from pubmedqa.evaluation.metrics import decision_metrics, probability_metrics
from pubmedqa.prompts import ANSWER_OPTIONS

logger = logging.getLogger(__name__)

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
    after = decision_metrics(list(gold), [predicted_decision(p) for p in calibration.apply(probabilities)])
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


L2_GRID = (0.1, 0.3, 1.0, 3.0)  # per mean cross-entropy, on standardised features
FOLDS = 5
#: Chosen by nested cross-validation on the 500 non-test questions (``python -m benchmarks.probe_recipe``: llama.cpp
#: features of the shipped adapter's layer 10, 10 repeats of 5 outer folds, L2 and offsets chosen inside each), on
#: the checkpoint-selection objective (accuracy + macro-F1) / 2: "mean+last" with "shares" offsets reached accuracy
#: 53.8 % and macro-F1 42.7 (48.3), with "score" offsets 55.5 % and 39.4 (47.5); "mean" with them 51.5 / 40.9 and
#: 54.4 / 37.9. The "shares" offsets also predicted each decision about as often as it is the gold one (285 / 163 /
#: 52 against 276 / 169 / 55, summed over held-out folds), where the "score" ones drift between fits.
DEFAULT_POOLING = "mean+last"
DEFAULT_OFFSETS = "shares"


class ProbeFitError(ValueError):
    """The probe cannot be fitted for this adapter or data."""


def _fit(features: np.ndarray, gold: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw-space weights (options x features) and intercepts of an L2-penalised multinomial regression on
    standardised features; ``l2`` multiplies the squared weights next to the mean cross-entropy."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    # scikit-learn's objective is C * (summed cross-entropy) + ||w||^2 / 2.
    model = LogisticRegression(C=1.0 / (2.0 * l2 * len(gold)), max_iter=5000)
    model.fit((features - mean) / std, gold)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # scikit-learn's binary form: one row, for the second class
        coef, intercept = np.vstack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    weight = np.zeros((len(ANSWER_OPTIONS), features.shape[1]))
    bias = np.full(len(ANSWER_OPTIONS), -30.0)  # an option missing from the training labels is never predicted
    for row, k in enumerate(model.classes_):
        weight[k] = coef[row] / std
        bias[k] = intercept[row] - weight[k] @ mean
    return weight, bias


def _logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(features @ weight.T + bias)


@dataclass
class CrossValidation:
    l2: float
    auc_by_l2: dict[str, float]
    probabilities: list[dict[str, float]]  # out of fold, with the chosen L2


def cross_validate(features: np.ndarray, gold: Sequence[str], grid: Sequence[float] = L2_GRID, seed: int = 0) -> CrossValidation:
    """Out-of-fold probabilities (stratified folds) for each L2 strength; keeps the one with the best pairwise AUC
    (ties: the stronger penalty)."""
    labels = np.array([ANSWER_OPTIONS.index(g) for g in gold])
    counts = np.bincount(labels, minlength=len(ANSWER_OPTIONS))
    if (counts > 0).sum() < 2:
        raise ProbeFitError("the questions need at least two different decisions to fit a probe")
    folds = min(FOLDS, int(counts[counts > 0].min()))
    if folds < 2:
        raise ProbeFitError("every decision present needs at least two questions to cross-validate a probe")
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels))
    results = {}
    for l2 in grid:
        logits = torch.zeros(len(labels), len(ANSWER_OPTIONS), dtype=torch.float64)
        for fit_rows, held_out in splits:
            logits[held_out] = _logits(features[held_out], *_fit(features[fit_rows], labels[fit_rows], l2))
        probabilities = option_probabilities(logits)
        results[l2] = (probability_metrics(probabilities, list(gold))["pairwise_auc"], probabilities)
    best = max(grid, key=lambda l2: (results[l2][0], l2))
    return CrossValidation(best, {f"{l2:g}": round(results[l2][0], 4) for l2 in grid}, results[best][1])


def fit_probe(
    features: np.ndarray, gold: Sequence[str], layer: int, fitted_on: str, calibrate: bool = True,
    pooling: str = DEFAULT_POOLING, offsets: str = DEFAULT_OFFSETS,
) -> tuple[DecisionProbe, DecisionCalibration | None]:
    """Choose the L2 and the decision offsets (by ``offsets``, one of ``OFFSET_OBJECTIVES``) by cross-validation,
    then fit the probe on every question. ``features`` are an engine's (``[mean | last]``); a ``pooling`` probe is
    fitted on its part of them."""
    if pooling not in POOLINGS:
        raise ProbeFitError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    features = pooled_part(features, pooling)
    cv = cross_validate(features, gold)
    calibration = fit_calibration(cv.probabilities, gold, f"{fitted_on}, out of fold", offsets) if calibrate else None
    scored = calibration.apply(cv.probabilities) if calibration else cv.probabilities
    cross_validated = {k: v for k, v in probability_metrics(scored, list(gold)).items() if k != "confusion_matrix"}
    weight, bias = _fit(features, np.array([ANSWER_OPTIONS.index(g) for g in gold]), cv.l2)
    details = {
        "fitted_on": fitted_on, "questions": len(gold), "folds": FOLDS, "pooling": pooling, "l2": cv.l2,
        "cv_auc_by_l2": cv.auc_by_l2,
        "cross_validated": cross_validated,
    }
    logger.info(
        "Decision probe on layer %d (%s): L2 %g (out-of-fold AUC by L2: %s); out of fold with the offsets: accuracy "
        "%.3f, macro-F1 %.3f, predicted %s", layer, pooling, cv.l2, cv.auc_by_l2, cross_validated["accuracy"],
        cross_validated["macro_f1"], cross_validated["predicted_counts"],
    )
    probe = DecisionProbe(
        layer, torch.from_numpy(weight).float(), torch.from_numpy(bias - bias[0]).float(), details, pooling
    )
    return probe, calibration
