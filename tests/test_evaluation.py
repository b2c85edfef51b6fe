"""Evaluation: metrics with hand-computed values, the LLM judge against a fake OpenAI-compatible server, and a full
run on the tiny model (official prediction format, results schema round trip, bad input)."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from pubmedqa.config import ModelSettings
from pubmedqa.decisions.calibration import DecisionCalibration
from pubmedqa.evaluation.judge import Judge, parse_grade, summarize_grades
from pubmedqa.evaluation.metrics import decision_metrics, pairwise_auc, text_metrics, token_f1
from pubmedqa.evaluation.results import ResultsError, load_results
from pubmedqa.evaluation.runner import EvalArguments, evaluate
from tests.conftest import JsonHandler


def test_decision_metrics_match_hand_computed_values():
    gold = ["yes", "yes", "no", "maybe", "no", "yes"]
    pred = ["yes", "no", "no", "yes", "no", "yes"]
    m = decision_metrics(gold, pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # yes: P=2/3 R=2/3 F=2/3; no: P=2/3 R=1 F=0.8; maybe: F=0 -> macro (2/3 + 0.8 + 0) / 3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["per_class"]["no"]["recall"] == 1.0 and m["per_class"]["maybe"]["support"] == 1
    assert m["confusion_matrix"]["rows_gold_columns_predicted"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["predicted_counts"] == {"yes": 3, "no": 3, "maybe": 0}


def _probs(yes, no, maybe):
    total = yes + no + maybe
    return {"yes": yes / total, "no": no / total, "maybe": maybe / total}


def test_pairwise_auc_measures_separation_whatever_the_offsets():
    gold = ["yes", "yes", "no", "no", "maybe"]
    probabilities = [_probs(8, 1, 1), _probs(3, 2, 1), _probs(4, 3, 1), _probs(2, 1, 1), _probs(1, 1, 3)]
    # yes-vs-no margins log(p_yes/p_no): yes rows 2.08, 0.41; no rows 0.29, 0.69 -> 3 of 4 pairs ordered: 0.75.
    # yes-vs-maybe and no-vs-maybe are perfectly ordered: 1.0 each. Mean (0.75 + 1 + 1) / 3.
    assert pairwise_auc(probabilities, gold) == pytest.approx((0.75 + 1 + 1) / 3)
    # Every prediction is "yes", yet the AUC is the same: a calibration offset cannot change it.
    assert {max(p, key=p.get) for p in probabilities[:4]} == {"yes"}
    shifted = DecisionCalibration({"yes": 0.0, "no": 2.0, "maybe": -1.0}).apply(probabilities)
    assert pairwise_auc(shifted, gold) == pytest.approx(pairwise_auc(probabilities, gold))
    assert math.isnan(pairwise_auc(probabilities[:2], gold[:2]))  # one label only: nothing to separate


def test_token_f1_uses_squad_normalisation():
    assert token_f1("The aspirin reduces risk.", "aspirin reduces the risk") == 1.0
    # pred {a, b, c, d} vs ref {a, b, e}: overlap 2, P=1/2, R=2/3 -> F1 = 4/7
    assert token_f1("alpha beta gamma delta", "alpha beta epsilon") == pytest.approx(4 / 7)
    assert token_f1("", "something") == 0.0 and token_f1("", "") == 1.0


def test_text_metrics_are_on_a_0_to_100_scale():
    same = text_metrics(["aspirin lowers the risk of stroke"], ["aspirin lowers the risk of stroke"])
    assert same["token_f1"] == pytest.approx(100) and same["rougeL"] == pytest.approx(100) and same["bleu"] == pytest.approx(100)
    different = text_metrics(["completely unrelated words here"], ["aspirin lowers the risk of stroke"])
    assert different["token_f1"] == 0 and different["rouge1"] == 0


@pytest.mark.parametrize(
    "reply, score",
    [
        ('{"score": 4, "reason": "Same decision."}', 4),
        ('```json\n{"score": 2, "reason": "x"}\n```', 2),
        ("Score: 5 - correct and complete", 5),
        ("3/5", 3),
        ("I cannot grade this.", None),
        ('{"score": 9}', None),
    ],
)
def test_judge_replies_are_parsed_robustly(reply, score):
    grade = parse_grade(reply)
    assert grade.score == score
    assert (grade.error is None) == (score is not None)


class _FakeOpenAI(JsonHandler):
    mode = "good"

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"
        if self.mode == "slow":
            time.sleep(3)
        content = {"good": '{"score": 4, "reason": "ok"}', "garbage": "no idea", "slow": "5"}[self.mode]
        payload = {
            "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }
        self.reply(payload)


@pytest.fixture
def fake_judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("mode, score, failed", [("good", 4, False), ("garbage", None, True), ("slow", None, True)])
def test_judge_against_a_fake_openai_compatible_server(fake_judge_server, mode, score, failed, monkeypatch):
    monkeypatch.setattr(_FakeOpenAI, "mode", mode)
    grade = Judge(fake_judge_server, "judge-model", api_key="sk-test", timeout=1).grade("Q?", "yes. Because.", "yes.")
    assert grade.score == score and (grade.error is not None) == failed
    summary = summarize_grades([grade])
    assert summary["failures"] == int(failed) and summary["graded"] == int(not failed)


def test_unreachable_judge_is_a_failure_not_a_score():
    grade = Judge("http://127.0.0.1:9/v1", "m", timeout=2).grade("Q?", "ref", "cand")
    assert grade.score is None and "failed" in grade.error


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tiny_adapter_dir, pubmedqa_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    settings = ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none")
    args = EvalArguments(data=str(pubmedqa_dir), limit=9, batch_size=4, max_new_tokens=6, output_dir=str(out),
                         judge_base_url="http://127.0.0.1:9/v1", judge_model="down", judge_timeout=1)
    fractions = []
    evaluate(settings, args, progress=lambda f, m: fractions.append(f))
    return out, fractions


def test_evaluation_run_writes_official_predictions_and_a_readable_schema(tiny_run, pubmedqa_dir):
    out, fractions = tiny_run
    truth = json.loads((pubmedqa_dir / "test_ground_truth.json").read_text())
    for key in ("base", "tuned"):
        predictions = json.loads((out / f"predictions_{key}.json").read_text())
        assert len(predictions) == 9 and set(predictions) <= set(truth)
        assert set(predictions.values()) <= {"yes", "no", "maybe"}
    run = load_results(out)
    assert run.model_keys == ["base", "tuned"] and len(run.examples) == 9
    gold = [truth[e["id"]] for e in run.examples]
    assert sorted(gold).count("yes") == 5  # stratified: 9 x 55.2 % yes, not the file's first 9 (all "yes")
    for key in run.model_keys:
        metrics = run.results["models"][key]
        assert {"accuracy", "macro_f1", "token_f1", "bleu", "rouge1", "rougeL", "bertscore", "judge", "looping",
                "ended_by_itself"} <= metrics.keys()
        assert all({"looping", "ended"} <= e[key]["scores"].keys() for e in run.examples)
        assert metrics["judge"]["failures"] == 9 and metrics["judge"]["mean"] is None  # endpoint down: no fake scores
        recomputed = decision_metrics(gold, [e[key]["decision"] for e in run.examples])
        assert metrics["accuracy"] == recomputed["accuracy"]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_results_of_another_schema_or_malformed_are_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    data = json.loads((out / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ResultsError, match="schema version 99"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(tmp_path)
    with pytest.raises(ResultsError, match="no results.json"):
        load_results(tmp_path / "missing")


def test_limit_out_of_range_is_refused(tiny_model_dir, pubmedqa_dir, tmp_path):
    settings = ModelSettings(base_model=str(tiny_model_dir), adapter="none", quantization="none")
    with pytest.raises(ValueError, match="--limit must be between 1 and 500"):
        evaluate(settings, EvalArguments(data=str(pubmedqa_dir), limit=501, output_dir=str(tmp_path)))


def test_dashboard_builds_its_figures_and_table_from_a_results_file(tiny_run):
    from app.ui.evaluation_tab import confusion_figure, decision_figure, examples_frame, judge_figure, text_figure

    out, _ = tiny_run
    run = load_results(out)
    decision = decision_figure(run)
    assert [t.name for t in decision.data if t.type == "bar"] == ["base", "fine-tuned"]
    assert list(decision.data[0].y) == pytest.approx([100 * run.results["models"]["base"]["accuracy"],
                                                     100 * run.results["models"]["base"]["macro_f1"]])
    text = text_figure(run)
    assert list(text.data[1].x)[-1] == "BERTScore F1" and None not in list(text.data[1].y)
    assert list(judge_figure(run).data[0].text) == ["n/a"]  # judge was down: shown as n/a, not as a score
    heat = confusion_figure(run, "tuned").data[0]
    assert sum(map(sum, heat.z)) == 9
    everything, both_wrong = examples_frame(run), examples_frame(run, "both wrong")
    assert len(everything) == 9 and len(both_wrong) <= 9
    assert all((row["base decision"] != row["gold"]) and (row["tuned decision"] != row["gold"]) for _, row in both_wrong.iterrows())


def test_shipped_runs_load_and_their_keys_are_the_variants_stored_names():
    from pubmedqa import variants
    from pubmedqa.variants import Variant
    from tests.conftest import REPO_ROOT

    # The one table of names (pubmedqa/variants.py) holds the key the runner writes, a stored format every shipped
    # run uses: renaming a variant must not change it.
    assert {variant: names.results_key for variant, names in variants.NAMES.items()} == {
        Variant.BASE: "base", Variant.TUNED: "tuned"
    }
    shipped = sorted(path for path in (REPO_ROOT / "assets" / "eval").iterdir() if path.is_dir())
    assert shipped
    for folder in shipped:
        run = load_results(folder)
        assert [variants.from_results_key(key) for key in run.model_keys] == [Variant.BASE, Variant.TUNED], folder
        assert all((folder / f"predictions_{key}.json").is_file() for key in run.model_keys)
