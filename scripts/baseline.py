"""A classical reference point for the decision task: TF-IDF + logistic regression on the same official split.

    python -m scripts.baseline                  # fit on the 450 training questions, score dev and the 500 test ones

It answers the question a reviewer asks of any fine-tuned model's yes/no/maybe numbers: how much of the task can a
bag of words learn from the same 450 labelled questions? The settings are fixed (word 1-2-grams, balanced class
weights, C = 1) rather than tuned, so the test questions pick nothing. No language model is involved: it runs in
seconds and needs only scikit-learn.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from pubmedqa.config import parse_settings
from pubmedqa.data import DataFormatError, PubMedQARecord, SplitSettings
from pubmedqa.evaluation.metrics import probability_metrics
from pubmedqa.evaluation.results import write_json_atomic
from pubmedqa.prompts import ANSWER_OPTIONS

logger = logging.getLogger("scripts.baseline")


@dataclass
class BaselineArguments(SplitSettings):
    output: str = field(default="", metadata={"help": "Also write the metrics to this JSON file."})


def _text(record: PubMedQARecord) -> str:
    return f"{record.question}\n{record.context}"


def fit_and_score(train: Sequence[PubMedQARecord], parts: dict[str, Sequence[PubMedQARecord]]) -> dict[str, Any]:
    """Fit on ``train``; for each named part, the decision metrics and pairwise AUC of the classifier's
    probabilities (the same metrics as the language models')."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform([_text(r) for r in train])
    classifier = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    classifier.fit(features, [r.final_decision for r in train])
    results = {}
    for name, records in parts.items():
        rows = classifier.predict_proba(vectorizer.transform([_text(r) for r in records]))
        probabilities = [{o: float(p) for o, p in zip(classifier.classes_, row)} for row in rows]
        probabilities = [{o: p.get(o, 0.0) for o in ANSWER_OPTIONS} for p in probabilities]
        results[name] = {**probability_metrics(probabilities, [r.final_decision for r in records]), "n": len(records)}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (args,) = parse_settings([BaselineArguments], argv)
        split = args.load_split()
    except (DataFormatError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    results = fit_and_score(split.train, {"dev": split.dev, "test": split.test})
    for name, m in results.items():
        logger.info(
            "TF-IDF + logistic regression, %s (%d questions): accuracy %.1f %%, macro-F1 %.1f, pairwise AUC %.3f, "
            "predicted %s", name, m["n"], 100 * m["accuracy"], 100 * m["macro_f1"], m["pairwise_auc"],
            m["predicted_counts"],
        )
    if args.output:
        write_json_atomic(Path(args.output), {"train_questions": len(split.train), **results})
        logger.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
