"""PubMedQA's official decision metrics: accuracy and macro-F1 over yes/no/maybe (as the official script computes
them, with scikit-learn), plus per-class scores and the confusion matrix."""

from __future__ import annotations

from typing import Any, Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from app.prompts import ANSWER_OPTIONS


def decision_metrics(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    if len(gold) != len(predicted) or not gold:
        raise ValueError("gold and predicted decisions must be non-empty and of equal length")
    labels = list(ANSWER_OPTIONS)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)),
        "predicted_counts": {label: sum(1 for p in predicted if p == label) for label in labels},
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": {"labels": labels, "rows_gold_columns_predicted": confusion_matrix(gold, predicted, labels=labels).tolist()},
    }
