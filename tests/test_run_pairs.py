"""Two evaluation runs side by side: the questions both answered, the flips from wrong to right and back, and the
paired tests of the second run against the first."""

from __future__ import annotations

import json

from app.eval_runs import RunCatalogue
from app.ui.run_pairs import flips_frame, pair_runs, show_pair
from pubmedqa.evaluation.results import load_results
from tests.conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "assets" / "eval"


def test_two_shipped_runs_pair_by_question_and_count_the_flips():
    first, second = load_results(SHIPPED / "test-500"), load_results(SHIPPED / "test-500-llama-cpp")
    pair = pair_runs(first, second, "tuned")
    assert len(pair.ids) == 500
    a = {e["id"]: e for e in first.examples}
    b = {e["id"]: e for e in second.examples}
    gained = sum(a[i]["tuned"]["decision"] != a[i]["gold"] and b[i]["tuned"]["decision"] == b[i]["gold"] for i in a)
    lost = sum(a[i]["tuned"]["decision"] == a[i]["gold"] and b[i]["tuned"]["decision"] != b[i]["gold"] for i in a)
    frame = flips_frame(pair, "one", "two")
    assert (frame["change"] == "wrong → right").sum() == gained and (frame["change"] == "right → wrong").sum() == lost
    accuracy, f1 = pair.tests()
    expected = second.results["models"]["tuned"]["accuracy"] - first.results["models"]["tuned"]["accuracy"]
    assert accuracy.difference.value == __import__("pytest").approx(expected)
    assert accuracy.test == "McNemar (exact)" and 0 <= accuracy.p_value <= 1 and f1.metric == "macro-F1"


def test_the_page_says_what_it_cannot_compare(tmp_path):
    catalogue = RunCatalogue(tmp_path / "own", 3)
    summary, _ = show_pair(catalogue, "shipped/test-500", "shipped/test-500-llama-cpp", "fine-tuned")
    assert "500 questions in both runs" in summary and "questions went from wrong to right" in summary
    assert "McNemar (exact)" in summary and "(p = " in summary
    assert show_pair(catalogue, "shipped/test-500", "../../etc", "fine-tuned")[0].startswith("⚠️ Cannot compare")
    assert show_pair(catalogue, "shipped/test-500", "shipped/test-500", "nonsense")[0] == "Choose two runs and a model."
    # A run of other questions: nothing in common.
    own = tmp_path / "own" / "20260101-000000"
    own.mkdir(parents=True)
    results = json.loads((SHIPPED / "test-500" / "results.json").read_text())
    (own / "results.json").write_text(json.dumps(results))
    (own / "examples.jsonl").write_text(json.dumps({"id": "1", "gold": "yes", "tuned": {"decision": "no"}}) + "\n")
    key = catalogue.own_key(own)
    assert "no question in common" in show_pair(catalogue, "shipped/test-500", key, "fine-tuned")[0]
