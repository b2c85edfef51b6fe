"""The PubMedQA tasks for lm-evaluation-harness (``--include_path lm_eval_tasks``), read with this project's loader
(:mod:`pubmedqa.data`): from a folder with ``ori_pqal.json`` (``--metadata '{"data": "<folder>"}'`` or
``PUBMEDQA_DATA``), else ``qiaojin/PubMedQA`` from the Hub. The harness's own ``pubmedqa`` task reads
``bigbio/pubmed_qa`` with a loading script, which current ``datasets`` refuses.

The prompt is the harness's (``Abstract: ...\\nQuestion: ...\\nAnswer:``, the options `` yes`` / `` no`` /
`` maybe``): the numbers are comparable with what the harness reports for other models, not with the app's own
evaluation (its prompt, answer format and decision probe: docs/evaluation.md).
"""

from __future__ import annotations

from typing import Any

import datasets

from pubmedqa.data import default_data_source, load_records, load_test_ids


def _rows(records: list[Any]) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"pubid": r.pubid, "question": r.question, "contexts": list(r.contexts), "final_decision": r.final_decision}
        for r in records
    ])


def load(data: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``test``: the official 500 test questions; ``pqal``: all 1,000 expert-labelled questions (as the harness's
    task scores them)."""
    source = data or default_data_source()
    records = load_records(source)
    test_ids = load_test_ids(source if source != "hub" else None)
    # By PMID: the official test list is grouped by label (its first 100 are all "yes"), so that --limit N takes a
    # mix, not one class.
    return datasets.DatasetDict({
        "test": _rows(sorted((records[i] for i in test_ids if i in records), key=lambda r: int(r.pubid))),
        "pqal": _rows(sorted(records.values(), key=lambda r: int(r.pubid))),
    })


def doc_to_text(doc: dict[str, Any]) -> str:
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(doc["contexts"]), doc["question"])
