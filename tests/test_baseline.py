"""The TF-IDF reference classifier: it learns word cues, never sees a test question, and fails cleanly on bad data."""

from __future__ import annotations

import json

from pubmedqa.data import PubMedQARecord
from scripts import baseline


def _record(pubid: str, decision: str, cue: str) -> PubMedQARecord:
    return PubMedQARecord(pubid, f"Does treatment {pubid} work?", (f"Patients were followed. {cue}",), ("RESULTS",), "", decision)


CUES = {"yes": "outcomes improved markedly", "no": "no difference was found", "maybe": "results were inconclusive"}


def test_the_classifier_learns_word_cues_and_reports_the_models_metrics():
    train = [_record(f"t{i}{d}", d, cue) for i in range(6) for d, cue in CUES.items()]
    held_out = [_record(f"h{i}{d}", d, cue) for i in range(3) for d, cue in CUES.items()]
    scored = baseline.fit_and_score(train, {"held_out": held_out})["held_out"]
    assert scored["accuracy"] == 1.0 and scored["pairwise_auc"] == 1.0
    assert scored["predicted_counts"] == {"yes": 3, "no": 3, "maybe": 3} and scored["n"] == 9


def test_the_cli_fits_on_training_questions_only(pubmedqa_dir, tmp_path, monkeypatch):
    fitted_on = []
    real = baseline.fit_and_score
    monkeypatch.setattr(baseline, "fit_and_score", lambda train, parts: fitted_on.extend(train) or real(train, parts))
    out = tmp_path / "baseline.json"
    assert baseline.main(["--data", str(pubmedqa_dir), "--output", str(out)]) == 0
    test_ids = set(json.loads((pubmedqa_dir / "test_ground_truth.json").read_text()))
    assert len(fitted_on) == 450 and not test_ids & {r.pubid for r in fitted_on}
    written = json.loads(out.read_text())
    assert written["train_questions"] == 450 and written["test"]["n"] == 500 and written["dev"]["n"] == 50
    assert sum(written["test"]["predicted_counts"].values()) == 500


def test_a_malformed_data_file_is_a_one_line_error(tmp_path, caplog):
    (tmp_path / "ori_pqal.json").write_text("{not json")
    assert baseline.main(["--data", str(tmp_path)]) == 2
    assert "not valid JSON" in caplog.text
