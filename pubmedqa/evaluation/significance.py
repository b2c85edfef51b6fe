"""How sure a run's figures are: a 95 % bootstrap interval and standard error for each metric, and paired tests of
fine-tuned against base on the same questions (McNemar's exact test for accuracy, a paired bootstrap for macro-F1
and the text metrics).

Everything is computed from the per-question lines of a run folder (``examples.jsonl``), resampling questions with a
fixed seed, so the dashboard shows the same interval every time. The resampling is SciPy's (``scipy.stats.bootstrap``,
percentile method, questions paired across the two variants); the statistics are vectorised over the resamples.
BLEU is a corpus score, so it is resampled through sacrebleu's sufficient statistics (n-gram matches and lengths per
sentence), not averaged over sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from pubmedqa.prompts import ANSWER_OPTIONS

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
#: Per-question scores in examples.jsonl whose run figure is their mean (0-100): key -> the name a sentence uses.
MEAN_SCORES = {"token_f1": "Token-F1", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore F1"}


@dataclass(frozen=True)
class Interval:
    """A figure with its 95 % interval and the bootstrap standard error, on the figure's own scale."""

    value: float
    low: float
    high: float
    stderr: float


@dataclass(frozen=True)
class PairedTest:
    """Fine-tuned minus base on the same questions: the difference, its 95 % interval and a two-sided p-value."""

    metric: str
    difference: Interval
    p_value: float
    test: str  # "McNemar (exact)" or "paired bootstrap"

    def sentence(self, first: str = "fine-tuned", second: str = "base", alpha: float = 1 - LEVEL) -> str:
        """E.g. "fine-tuned is better than base on accuracy: not shown at this size (p = 0.41, McNemar (exact))"."""
        better = self.difference.value > 0
        verdict = "shown" if self.p_value < alpha else "not shown at this size"
        return (f"{first} is {'better' if better else 'worse'} than {second} on {self.metric}: {verdict} "
                f"(p = {format_p(self.p_value)}, {self.test})")


def format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def to_codes(labels: Sequence[str]) -> np.ndarray:
    """Decisions as option codes (an unknown decision: a code of its own, never right)."""
    index = {label: i for i, label in enumerate(ANSWER_OPTIONS)}
    return np.array([index.get(label, len(ANSWER_OPTIONS)) for label in labels])  # unknown: a class of its own


def from_code(code: int) -> str:
    """The option a code of :func:`to_codes` stands for ("?" for an unknown decision)."""
    return ANSWER_OPTIONS[code] if 0 <= code < len(ANSWER_OPTIONS) else "?"


def accuracy(gold: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(gold == predicted, axis=axis)


def macro_f1(gold: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """Macro-F1 over the three options, as scikit-learn's ``f1_score(average="macro", labels=options)`` (a class
    neither predicted nor present scores 0), for arrays of option codes; vectorised over leading axes."""
    gold, predicted = np.moveaxis(gold, axis, -1), np.moveaxis(predicted, axis, -1)
    scores = []
    for option in range(len(ANSWER_OPTIONS)):
        is_gold, is_predicted = gold == option, predicted == option
        true_positive = np.sum(is_gold & is_predicted, axis=-1)
        denominator = np.sum(is_gold, axis=-1) + np.sum(is_predicted, axis=-1)
        scores.append(np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1), 0.0))
    return np.mean(scores, axis=0)


def _interval(result: Any, value: float) -> Interval:
    low, high = result.confidence_interval
    return Interval(float(value), float(low), float(high), float(result.standard_error))


def bootstrap_interval(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray]) -> Interval:
    """The statistic of the paired ``samples`` (one array per argument, one entry per question) with its 95 %
    percentile interval over :data:`RESAMPLES` resamples of the questions (seed :data:`SEED`)."""
    samples = tuple(np.asarray(s) for s in samples)
    value = float(statistic(*samples))
    if len(samples[0]) < 2:
        return Interval(value, value, value, 0.0)  # one question: nothing to resample
    result = stats.bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                             confidence_level=LEVEL, method="percentile", rng=np.random.default_rng(SEED))
    return _interval(result, value)


def mcnemar(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test: the questions only base got right (b), only fine-tuned got right (c), and the two-sided
    p-value of b vs c under "both equally good" (a binomial test on the b + c discordant questions)."""
    base, tuned = np.asarray(base_correct, bool), np.asarray(tuned_correct, bool)
    b, c = int(np.sum(base & ~tuned)), int(np.sum(~base & tuned))
    p = 1.0 if b + c == 0 else float(stats.binomtest(c, b + c, 0.5).pvalue)
    return b, c, p


def paired_bootstrap(base: Sequence[np.ndarray], tuned: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                     metric: str) -> PairedTest:
    """Fine-tuned minus base of ``statistic`` on the same resampled questions; the p-value is twice the share of
    resamples on the other side of zero than the observed difference (at least 1/RESAMPLES)."""
    n_args = len(base)

    def difference(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*arrays[n_args:], axis=axis) - statistic(*arrays[:n_args], axis=axis)

    samples = tuple(np.asarray(s) for s in (*base, *tuned))
    observed = float(difference(*samples))
    rng = np.random.default_rng(SEED)
    n = len(samples[0])
    picks = rng.integers(0, n, size=(RESAMPLES, n))
    resampled = difference(*(s[picks] for s in samples))
    low, high = np.quantile(resampled, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    other_side = np.mean(resampled <= 0) if observed > 0 else np.mean(resampled >= 0) if observed < 0 else 1.0
    p = float(min(1.0, max(2 * other_side, 1 / RESAMPLES)))
    return PairedTest(metric, Interval(observed, float(low), float(high), float(np.std(resampled, ddof=1))), p,
                      "paired bootstrap")


def bleu_statistic(
    references: Sequence[str],
) -> tuple[Callable[..., np.ndarray], Callable[[Sequence[str]], np.ndarray]]:
    """Corpus BLEU as a statistic of per-sentence sufficient statistics: (a function of an array of per-sentence
    statistics, resampled along ``axis``, giving BLEU; a function turning answers into that array)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()

    def sentence_stats(answers: Sequence[str]) -> np.ndarray:
        return np.array([bleu._extract_corpus_statistics([answer], [[reference]])[0]
                         for answer, reference in zip(answers, references)], dtype=float)

    def corpus(index: np.ndarray, axis: int = -1, *, table: np.ndarray) -> np.ndarray:
        sums = table[index].sum(axis=-2)  # (..., n, k) -> (..., k)
        flat = sums.reshape(-1, sums.shape[-1])
        scores = [bleu._compute_score_from_stats(list(row)).score for row in flat]
        return np.array(scores).reshape(sums.shape[:-1])

    return corpus, sentence_stats


@dataclass(frozen=True)
class RunSignificance:
    """The intervals of one run's figures (by variant key, then metric key) and its paired tests (by metric key)."""

    intervals: dict[str, dict[str, Interval]]
    tests: dict[str, PairedTest]


def _per_question(examples: list[dict[str, Any]], key: str) -> dict[str, np.ndarray] | None:
    rows = [e[key] for e in examples if isinstance(e.get(key), dict)]
    if len(rows) != len(examples) or not rows:
        return None
    values: dict[str, np.ndarray] = {"decision": to_codes([str(r.get("decision")) for r in rows])}
    for name in MEAN_SCORES:
        column = [r.get("scores", {}).get(name) for r in rows]
        if all(isinstance(v, (int, float)) for v in column):
            values[name] = np.asarray(column, float)
    for name in ("looping", "ended"):
        column = [r.get("scores", {}).get(name) for r in rows]
        if all(isinstance(v, bool) for v in column):
            values[name] = 100.0 * np.asarray(column, float)
    values["answers"] = np.array([str(r.get("answer") or "") for r in rows], dtype=object)
    return values


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def run_significance(examples: list[dict[str, Any]], keys: Sequence[str], base_key: str, tuned_key: str,
                     with_bleu: bool = True) -> RunSignificance:
    """Intervals for every figure the examples can give for each variant in ``keys``, and the paired tests where
    both variants answered the same questions. Accuracy and macro-F1 on a 0-1 scale, the rest 0-100."""
    gold = to_codes([str(e.get("gold")) for e in examples])
    per = {key: values for key in keys if (values := _per_question(examples, key)) is not None}
    intervals: dict[str, dict[str, Interval]] = {}
    bleu = bleu_statistic([str(e.get("reference") or "") for e in examples]) if with_bleu and examples else None
    tables = {}
    for key, values in per.items():
        found = {
            "accuracy": bootstrap_interval((gold, values["decision"]), accuracy),
            "macro_f1": bootstrap_interval((gold, values["decision"]), macro_f1),
        }
        for name in (*MEAN_SCORES, "looping", "ended"):
            if name in values:
                found[name] = bootstrap_interval((values[name],), _mean)
        if bleu is not None and any(values["answers"]):
            corpus, sentence_stats = bleu
            tables[key] = sentence_stats(list(values["answers"]))
            index = np.arange(len(examples))
            found["bleu"] = bootstrap_interval((index,), lambda i, axis=-1, t=tables[key]: corpus(i, axis, table=t))
        intervals[key] = found
    tests: dict[str, PairedTest] = {}
    if base_key in per and tuned_key in per:
        base, tuned = per[base_key], per[tuned_key]
        b, c, p = mcnemar(base["decision"] == gold, tuned["decision"] == gold)
        observed = (c - b) / len(gold)
        spread = paired_bootstrap((gold, base["decision"]), (gold, tuned["decision"]), accuracy, "accuracy")
        tests["accuracy"] = PairedTest("accuracy", Interval(observed, spread.difference.low, spread.difference.high,
                                                            spread.difference.stderr), p, "McNemar (exact)")
        tests["macro_f1"] = paired_bootstrap((gold, base["decision"]), (gold, tuned["decision"]), macro_f1, "macro-F1")
        for name, label in MEAN_SCORES.items():
            if name in base and name in tuned:
                tests[name] = paired_bootstrap((base[name],), (tuned[name],), _mean, label)
    return RunSignificance(intervals, tests)
