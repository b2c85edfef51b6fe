"""The PubMedQA loader and the official split, on the real PQA-L files (the tests' copy, ``PUBMEDQA_DATA``)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pubmedqa.data import (
    DataFormatError,
    load_artificial,
    load_examples,
    load_local,
    load_records,
    load_test_ids,
    official_split,
    records_from_hub_rows,
    stratified_sample,
)


@pytest.fixture(scope="module")
def records(pubmedqa_dir):
    return load_local(pubmedqa_dir)


def _hub_rows(raw: dict) -> list[dict]:
    """``ori_pqal.json`` records as rows of qiaojin/PubMedQA (the schema of its pqa_labeled config)."""
    return [
        {
            "pubid": int(pubid),
            "question": item["QUESTION"],
            "context": {"contexts": item["CONTEXTS"], "labels": item["LABELS"], "meshes": item.get("MESHES", [])},
            "long_answer": item["LONG_ANSWER"],
            "final_decision": item["final_decision"],
        }
        for pubid, item in raw.items()
    ]


def test_local_loader_reads_every_field(records):
    assert len(records) == 1000
    record = records["21645374"]
    assert record.question.startswith("Do mitochondria play a role")
    assert len(record.contexts) == len(record.context_labels) >= 2
    assert record.long_answer and record.final_decision in ("yes", "no", "maybe")
    assert record.context.startswith(f"{record.context_labels[0]}: {record.contexts[0][:30]}")
    assert record.reference_answer.startswith(f"{record.final_decision}. ")
    assert Counter(r.final_decision for r in records.values()) == {"yes": 552, "no": 338, "maybe": 110}


def test_hub_rows_give_the_same_records_as_the_local_files(records, pubmedqa_dir):
    raw = json.loads((pubmedqa_dir / "ori_pqal.json").read_text())
    assert records_from_hub_rows(_hub_rows(raw)) == records


def test_official_split_keeps_every_test_id_out_of_training(records, pubmedqa_dir):
    test_ids = load_test_ids(pubmedqa_dir)
    split = official_split(records, test_ids)
    assert (len(split.train), len(split.dev), len(split.test)) == (450, 50, 500)
    assert {r.pubid for r in split.test} == set(test_ids)
    assert not ({r.pubid for r in split.train} | {r.pubid for r in split.dev}) & set(test_ids)
    assert not {r.pubid for r in split.train} & {r.pubid for r in split.dev}
    assert Counter(r.final_decision for r in split.dev) == {"yes": 28, "no": 17, "maybe": 5}
    assert official_split(records, test_ids) == split  # fixed seed: the same split every time


def test_shipped_test_ids_match_the_official_ground_truth(pubmedqa_dir):
    assert load_test_ids(None) == sorted(load_test_ids(pubmedqa_dir), key=int)


def test_stratified_sample_keeps_label_proportions_not_file_order(records, pubmedqa_dir):
    test = [records[i] for i in load_test_ids(pubmedqa_dir)]  # the file is sorted by label
    sample = stratified_sample(test, 50, seed=0)
    assert Counter(r.final_decision for r in sample) == {"yes": 28, "no": 17, "maybe": 5}
    assert stratified_sample(test, 50, seed=1) != sample


def test_app_examples_come_from_the_training_side_only(pubmedqa_dir):
    examples = load_examples()
    assert len(examples) >= 5
    assert not {ex["pubid"] for ex in examples} & set(load_test_ids(pubmedqa_dir))
    assert all(ex["question"] and ex["context"] for ex in examples)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty JSON object"),
        ('{"1": {"QUESTION": "Q?", "CONTEXTS": ["c"], "LONG_ANSWER": "a", "final_decision": "perhaps"}}', "final_decision"),
        ('{"1": {"QUESTION": "", "CONTEXTS": ["c"], "LONG_ANSWER": "a", "final_decision": "yes"}}', "question"),
    ],
)
def test_malformed_data_files_get_a_clear_error(tmp_path, content, message):
    (tmp_path / "ori_pqal.json").write_text(content)
    with pytest.raises(DataFormatError, match=message):
        load_local(tmp_path)


def test_missing_data_folder_names_the_setting(tmp_path):
    with pytest.raises(DataFormatError, match="PUBMEDQA_DATA|neither"):
        load_records(tmp_path / "missing")
    assert load_examples(tmp_path / "missing.json") == []


def test_compare_examples_come_from_the_dev_side_with_their_reference(records, pubmedqa_dir):
    split = official_split(records, load_test_ids(pubmedqa_dir))
    examples = load_examples(key="dev_examples")
    assert examples and {ex["pubid"] for ex in examples} <= {r.pubid for r in split.dev}
    for ex in examples:
        assert ex["long_answer"] == records[ex["pubid"]].long_answer and ex["final_decision"] == records[ex["pubid"]].final_decision


def test_hub_source_offline_gives_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataFormatError, match="could not load qiaojin/PubMedQA"):
        load_records("hub")


def test_pqa_a_comes_from_the_hub_config_or_a_local_file(monkeypatch, tmp_path, pubmedqa_dir):
    import datasets

    raw = dict(list(json.loads((pubmedqa_dir / "ori_pqal.json").read_text()).items())[:3])
    asked = []

    def fake_load_dataset(repo, config, split):
        asked.append((repo, config, split))
        return _hub_rows(raw)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_artificial("hub")
    assert asked == [("qiaojin/PubMedQA", "pqa_artificial", "train")]
    (tmp_path / "ori_pqaa.json").write_text(json.dumps(raw))
    assert load_artificial(tmp_path) == load_artificial(tmp_path / "ori_pqaa.json") == from_hub
    with pytest.raises(DataFormatError, match="does not exist"):
        load_artificial(tmp_path / "missing.json")


def test_product_defaults_read_the_hub_dataset_not_a_folder_outside_the_project(monkeypatch, pubmedqa_dir):
    """A user's clone has no ../shared: with nothing set, every command and the local evidence index read
    qiaojin/PubMedQA (what the seed notebook loaded); the variable or flag names a folder instead."""
    import dataclasses

    import datasets

    from pubmedqa.config import (
        PROJECT_ROOT,
        BaseModelSettings,
        EvidenceSettings,
        ModelSettings,
        ServerSettings,
        parse_settings,
    )
    from pubmedqa.data import SplitSettings
    from pubmedqa.evaluation.runner import EvalArguments
    from pubmedqa.evidence.local_index import load_local_corpus
    from training.arguments import TrainArguments

    monkeypatch.delenv("PUBMEDQA_DATA")
    monkeypatch.delenv("PUBMEDQA_EVIDENCE_LOCAL_DATA", raising=False)
    outside = str(PROJECT_ROOT.parent)
    for cls in (BaseModelSettings, ModelSettings, ServerSettings, EvidenceSettings, SplitSettings, EvalArguments,
                TrainArguments):
        for value in dataclasses.asdict(cls()).values():
            assert not (isinstance(value, str) and value.startswith(outside) and not value.startswith(str(PROJECT_ROOT))), (cls, value)
    assert SplitSettings().data == EvalArguments().data == EvidenceSettings().evidence_local_data == "hub"
    monkeypatch.setenv("PUBMEDQA_DATA", str(pubmedqa_dir))
    assert SplitSettings().data == parse_settings([EvalArguments], [])[0].data == str(pubmedqa_dir)

    raw = json.loads((pubmedqa_dir / "ori_pqal.json").read_text())
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, config, split: _hub_rows(raw))
    from_hub = SplitSettings(data="hub").load_split()  # the shipped test ids split the Hub copy the official way
    from_folder = SplitSettings(data=str(pubmedqa_dir)).load_split()
    assert from_hub == from_folder and len(from_hub.test) == 500
    hub_corpus = load_local_corpus(EvidenceSettings(evidence_local_data="hub"))
    folder_corpus = load_local_corpus(EvidenceSettings(evidence_local_data=str(pubmedqa_dir)))
    assert [a.pmid for a in hub_corpus.articles] == [a.pmid for a in folder_corpus.articles]
    assert [a.context_text() for a in hub_corpus.articles] == [a.context_text() for a in folder_corpus.articles]


def test_hub_index_offline_before_the_first_download_answers_without_pubmedqa(monkeypatch, caplog, tmp_path):
    from pubmedqa.config import EvidenceSettings
    from pubmedqa.evidence.local_index import load_local_corpus

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps([{"pmid": "1", "title": "T", "abstract": "Aspirin lowers the risk."}]))
    with caplog.at_level("WARNING"):
        corpus = load_local_corpus(EvidenceSettings(evidence_local_data="hub", evidence_local_files=str(extra)))
    assert [a.pmid for a in corpus.articles] == ["1"]
    assert [r.message for r in caplog.records if "PubMedQA" in r.message][0].startswith("Local index without")
