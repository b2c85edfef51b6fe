"""How sure a run's figures are: the intervals and paired tests against known values and SciPy / scikit-learn /
sacrebleu, and the dashboard showing them (error bars, reference lines, the figures table and its sentences)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pubmedqa.evaluation import significance as sig
from pubmedqa.evaluation.results import load_results
from tests.conftest import REPO_ROOT

RUN = load_results(REPO_ROOT / "assets" / "eval" / "test-500")


def test_mcnemar_on_a_hand_made_table():
    # 2 questions only base got right, 8 only fine-tuned, 5 both, 5 neither: the exact two-sided p is
    # 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024.
    base = [True] * 2 + [False] * 8 + [True] * 5 + [False] * 5
    tuned = [False] * 2 + [True] * 8 + [True] * 5 + [False] * 5
    assert sig.mcnemar(base, tuned) == (2, 8, pytest.approx(112 / 1024))
    assert sig.mcnemar(base, base) == (0, 0, 1.0)


def test_the_accuracy_interval_is_scipys_bootstrap_of_the_mean():
    rng = np.random.default_rng(7)
    gold, predicted = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    ours = sig.bootstrap_interval((gold, predicted), sig.accuracy)
    theirs = stats.bootstrap(((gold == predicted).astype(float),), np.mean, n_resamples=sig.RESAMPLES,
                             method="percentile", rng=np.random.default_rng(sig.SEED))
    assert ours.value == np.mean(gold == predicted)
    assert (ours.low, ours.high) == pytest.approx(tuple(theirs.confidence_interval), abs=0.01)
    assert ours.stderr == pytest.approx(theirs.standard_error, rel=0.1)
    # The textbook standard error of a proportion, sqrt(p (1 - p) / n), within bootstrap noise.
    assert ours.stderr == pytest.approx(np.sqrt(ours.value * (1 - ours.value) / 300), rel=0.1)


def test_vectorised_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    gold, predicted = rng.integers(0, 3, (40, 25)), rng.integers(0, 3, (40, 25))
    predicted[0] = 0  # a resample that never predicts two of the options
    expected = [f1_score(g, p, labels=[0, 1, 2], average="macro", zero_division=0) for g, p in zip(gold, predicted)]
    assert sig.macro_f1(gold, predicted) == pytest.approx(expected)


def test_corpus_bleu_is_resampled_through_sacrebleus_statistics():
    import sacrebleu

    answers = [e["tuned"]["answer"] for e in RUN.examples[:60]]
    references = [e["reference"] for e in RUN.examples[:60]]
    corpus, sentence_stats = sig.bleu_statistic(references)
    table = sentence_stats(answers)
    whole = sacrebleu.corpus_bleu(answers, [references]).score
    assert float(corpus(np.arange(60), table=table)) == pytest.approx(whole)
    picks = np.random.default_rng(1).integers(0, 60, (3, 60))
    assert corpus(picks, table=table) == pytest.approx([sacrebleu.corpus_bleu([answers[i] for i in row],
                                                                              [[references[i] for i in row]]).score
                                                        for row in picks])


def test_paired_bootstrap_sees_no_difference_in_equal_models_and_a_large_one_where_it_is():
    rng = np.random.default_rng(5)
    gold = rng.integers(0, 3, 200)
    base = np.where(rng.random(200) < 0.5, gold, (gold + 1) % 3)
    same = sig.paired_bootstrap((gold, base), (gold, base), sig.accuracy, "accuracy")
    assert same.difference.value == 0 and same.p_value == 1.0
    better = sig.paired_bootstrap((gold, base), (gold, gold), sig.accuracy, "accuracy")
    difference = better.difference
    assert better.p_value <= 2 / sig.RESAMPLES and 0.3 < difference.low < difference.value < difference.high
    assert "fine-tuned is better than base on accuracy: shown" in better.sentence()


def test_the_shipped_run_gets_its_figures_with_intervals_and_tests():
    found = sig.run_significance(RUN.examples, RUN.model_keys, "base", "tuned")
    for key in RUN.model_keys:
        model = RUN.results["models"][key]
        accuracy = found.intervals[key]["accuracy"]
        assert accuracy.value == pytest.approx(model["accuracy"]) and accuracy.low < accuracy.value < accuracy.high
        assert 0.03 < (accuracy.high - accuracy.low) / 2 < 0.06  # about +-4.4 points on 500 questions
        assert found.intervals[key]["macro_f1"].value == pytest.approx(model["macro_f1"])
        assert found.intervals[key]["bleu"].value == pytest.approx(model["bleu"])
        assert found.intervals[key]["token_f1"].value == pytest.approx(model["token_f1"])
    test = found.tests["accuracy"]
    gold = [e["gold"] for e in RUN.examples]
    b = sum(e["base"]["decision"] == g != e["tuned"]["decision"] for e, g in zip(RUN.examples, gold))
    c = sum(e["tuned"]["decision"] == g != e["base"]["decision"] for e, g in zip(RUN.examples, gold))
    assert test.p_value == pytest.approx(stats.binomtest(c, b + c, 0.5).pvalue) and test.test == "McNemar (exact)"
    assert test.difference.value == pytest.approx(RUN.results["models"]["tuned"]["accuracy"]
                                                  - RUN.results["models"]["base"]["accuracy"])
    again = sig.run_significance(RUN.examples, RUN.model_keys, "base", "tuned")
    assert again == found  # a fixed seed: the same interval every time


def test_the_dashboard_shows_error_bars_reference_lines_and_the_figures_table():
    from app.ui.eval_significance import comparison_markdown, figures_frame, significance
    from app.ui.evaluation_tab import decision_figure

    found = significance(RUN)
    figure = decision_figure(RUN, found)
    for bar in (trace for trace in figure.data if trace.type == "bar"):
        assert bar.error_y.array is not None and all(v > 0 for v in bar.error_y.array)
    legend = [trace.name for trace in figure.data if trace.type == "scatter"]
    assert legend == ['always "yes"', "human (PubMedQA paper)"] and len(figure.layout.shapes) == 4
    human = [shape.y0 for shape in figure.layout.shapes if shape.line.dash == "dot"]
    assert human == [pytest.approx(78.0), pytest.approx(72.2)] and figure.layout.yaxis.range[1] > 78  # in view
    majority = RUN.results["models"]["base"]["confusion_matrix"]
    assert majority  # the always-yes line sits at the gold share of yes
    yes_share = sum(e["gold"] == "yes" for e in RUN.examples) / len(RUN.examples)
    assert [shape.y0 for shape in figure.layout.shapes if shape.line.dash == "dash"][0] == pytest.approx(100 * yes_share)
    table = figures_frame(RUN, found)
    assert list(table["metric"])[:3] == ["accuracy", "macro-F1", "Token-F1"]
    assert {"base 95 % interval", "fine-tuned 95 % interval", "difference", "p", "test"} <= set(table.columns)
    text = comparison_markdown(RUN, found)
    assert "fine-tuned is" in text and "on accuracy:" in text and "(p = " in text and "78.0%" in text
    assert "on Token-F1:" in text and "token_f1" not in text  # the names the charts use
