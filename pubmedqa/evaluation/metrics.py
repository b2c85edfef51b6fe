"""Metrics: PubMedQA's official decision metrics (accuracy and macro-F1 over yes/no/maybe, computed with
scikit-learn as the official script does, plus per-class scores and the confusion matrix) and long-answer overlap
metrics (Token-F1, BLEU, ROUGE-1/L)."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any, Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from pubmedqa.decisions.options import predicted_decision
from pubmedqa.prompts import ANSWER_OPTIONS


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


def probability_metrics(probabilities: Sequence[dict[str, float]], gold: Sequence[str]) -> dict[str, Any]:
    """The decision metrics of the most likely options, and the threshold-free :func:`pairwise_auc`."""
    predicted = [predicted_decision(p) for p in probabilities]
    return {**decision_metrics(list(gold), predicted), "pairwise_auc": pairwise_auc(probabilities, gold)}


def pairwise_auc(probabilities: Sequence[dict[str, float]], gold: Sequence[str]) -> float:
    """How well the option scores rank the questions, whatever the decision threshold: for each pair of labels
    (a, b) present in ``gold``, the ROC AUC of log p(a) - log p(b) between the questions labelled a and those
    labelled b, averaged over the pairs. Per-option offsets (the decision calibration) add a constant to every
    difference, so this does not move with them: it tells a checkpoint that separates the labels from one that
    only leans a different way. 0.5 is chance; NaN when fewer than two labels occur."""
    aucs = []
    for i, a in enumerate(ANSWER_OPTIONS):
        for b in ANSWER_OPTIONS[i + 1 :]:
            rows = [(p, g == a) for p, g in zip(probabilities, gold) if g in (a, b)]
            if len({is_a for _, is_a in rows}) < 2:
                continue
            margin = [math.log(max(p[a], 1e-30)) - math.log(max(p[b], 1e-30)) for p, _ in rows]
            aucs.append(roc_auc_score([is_a for _, is_a in rows], margin))
    return float(sum(aucs) / len(aucs)) if aucs else float("nan")


def _normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return [word for word in text.split() if word not in ("a", "an", "the")]


_PUNCTUATION = set(string.punctuation)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token-overlap F1 of one answer against its reference."""
    pred, ref = _normalize(prediction), _normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus Token-F1, BLEU (sacrebleu) and ROUGE-1/L F-measure (rouge-score), all on a 0-100 scale, plus the
    per-example values."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    per_example = []
    for prediction, reference in zip(predictions, references):
        rouge = scorer.score(reference, prediction)
        per_example.append(
            {
                "token_f1": 100 * token_f1(prediction, reference),
                "bleu": sacrebleu.sentence_bleu(prediction, [reference]).score,
                "rouge1": 100 * rouge["rouge1"].fmeasure,
                "rougeL": 100 * rouge["rougeL"].fmeasure,
            }
        )
    n = max(1, len(per_example))
    return {
        "token_f1": sum(e["token_f1"] for e in per_example) / n,
        "bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
        "rouge1": sum(e["rouge1"] for e in per_example) / n,
        "rougeL": sum(e["rougeL"] for e in per_example) / n,
        "per_example": per_example,
    }


LOOP_NGRAM, LOOP_REPEATS = 3, 3  # "looping": some 3-word sequence said 3 or more times


def is_looping(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Whether some ``n``-word sequence (case and punctuation ignored) occurs ``repeats`` or more times in ``text``."""
    words = re.findall(r"\w+", text.lower())
    counts = Counter(zip(*(words[i:] for i in range(n))))
    return bool(counts) and max(counts.values()) >= repeats


def readability_metrics(answers: Sequence[str], ended: Sequence[bool]) -> dict[str, Any]:
    """The share of answers that loop and of answers that ended by themselves (EOS or a stop sequence before the
    token limit), in %, plus the per-example flags."""
    per_example = [{"looping": is_looping(a), "ended": bool(e)} for a, e in zip(answers, ended)]
    n = max(1, len(per_example))
    return {
        "looping": 100 * sum(e["looping"] for e in per_example) / n,
        "ended_by_itself": 100 * sum(e["ended"] for e in per_example) / n,
        "per_example": per_example,
    }
