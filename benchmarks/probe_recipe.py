"""Not a speed test: which features the decision probe should read and how its decision offsets are chosen, by nested
cross-validation on the 500 non-test questions (how ``scripts.decision_probe``'s defaults ``--pooling`` and
``--offsets`` were chosen).

The probe's own out-of-fold figures flatter it: its decision offsets are fitted on the very out-of-fold scores they
are then scored on. Here the whole recipe (``fit_probe``: L2 by inner cross-validation, offsets on the inner
out-of-fold scores, final fit) runs inside each outer fold, and only the held-out outer fold is scored; the outer
split is repeated with other seeds. The test questions are never read.

    python -m benchmarks.probe_recipe [--adapter assets/adapter] [--engine llama.cpp] [--repeats 10]

Prints, per recipe (pooling x offsets), accuracy and macro-F1 (mean and spread over the repeats), the predicted
decisions' counts (summed over the repeats' held-out folds, against the gold counts) and the paired difference to the
defaults.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.decisions.fitting import DEFAULT_OFFSETS, DEFAULT_POOLING, FOLDS, OFFSET_OBJECTIVES, fit_probe
from pubmedqa.decisions.options import option_probabilities, predicted_decision
from pubmedqa.decisions.probe import POOLINGS
from pubmedqa.evaluation.metrics import decision_metrics
from pubmedqa.prompts import ANSWER_OPTIONS
from scripts.decision_probe import ProbeArguments, engine_features


@dataclass
class RecipeArguments(ProbeArguments):
    repeats: int = field(default=10, metadata={"help": "Outer cross-validations, each with its own split."})


def nested_scores(
    features: np.ndarray, gold: Sequence[str], pooling: str, offsets: str, repeats: int
) -> tuple[np.ndarray, Counter]:
    """Accuracy and macro-F1 (repeats x 2) of the probe recipe on held-out outer folds, and its predicted decisions
    over all repeats."""
    gold = list(gold)
    scores, predicted_counts = [], Counter()
    for repeat in tqdm(range(repeats), desc=f"nested cross-validation: {pooling}, {offsets}", unit="repeat"):
        predicted = [""] * len(gold)
        for fit_rows, held_out in StratifiedKFold(FOLDS, shuffle=True, random_state=100 + repeat).split(features, gold):
            probe, calibration = fit_probe(
                features[fit_rows], [gold[i] for i in fit_rows], 1, "outer fold", True, pooling, offsets
            )
            probabilities = option_probabilities(probe.logits(torch.from_numpy(features[held_out])))
            for row, p in zip(held_out, calibration.apply(probabilities) if calibration else probabilities):
                predicted[row] = predicted_decision(p)
        metrics = decision_metrics(gold, predicted)
        scores.append((100 * metrics["accuracy"], 100 * metrics["macro_f1"]))
        predicted_counts.update(predicted)
    return np.array(scores), predicted_counts


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model_settings, args = parse_settings([ModelSettings, RecipeArguments], argv)
    read = engine_features(model_settings, args)
    print(f"{len(read.gold)} non-test questions, layer {read.layer} features, {read.fitted_on}; "
          f"{args.repeats} x {FOLDS}-fold nested cross-validation")
    gold_counts = Counter(read.gold)
    print("gold decisions: " + " / ".join(f"{gold_counts[o]} {o}" for o in ANSWER_OPTIONS))
    results = {
        recipe: nested_scores(read.features, read.gold, *recipe, args.repeats)
        for recipe in itertools.product(POOLINGS, OFFSET_OBJECTIVES)
    }
    reference = results[(DEFAULT_POOLING, DEFAULT_OFFSETS)][0]
    for (pooling, offsets), (scores, predicted) in results.items():
        (accuracy, macro_f1), (accuracy_sd, macro_f1_sd) = scores.mean(axis=0), scores.std(axis=0)
        gain = (scores - reference).mean(axis=0)
        shares = " / ".join(f"{predicted[o] / args.repeats:.0f}" for o in ANSWER_OPTIONS)
        print(f"{pooling:<10} {offsets:<7} accuracy {accuracy:5.1f} ± {accuracy_sd:.1f}   macro-F1 {macro_f1:5.1f} ± "
              f"{macro_f1_sd:.1f}   predicted {shares}   vs defaults: {gain[0]:+.1f} / {gain[1]:+.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
