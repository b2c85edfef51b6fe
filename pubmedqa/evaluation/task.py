"""The PubMedQA task as the evaluation runs it, written the way lm-evaluation-harness defines its ``pubmedqa`` task:
which documents (the official test questions), how a document becomes a prompt, the choices and the target, the
reference long answer, and the metrics. The runner (``runner.py``) knows no PubMedQA detail beyond this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pubmedqa.data import PubMedQARecord, load_records, load_test_ids, stratified_sample
from pubmedqa.evaluation.metrics import decision_metrics, text_metrics
from pubmedqa.prompts import ANSWER_OPTIONS, PromptInput


@dataclass(frozen=True)
class Task:
    name: str
    choices: Sequence[str]
    doc_to_prompt: Callable[[PubMedQARecord], PromptInput]
    doc_to_target: Callable[[PubMedQARecord], str]  # the gold decision, one of ``choices``
    doc_to_reference: Callable[[PubMedQARecord], str]  # what a long answer is compared with
    decision_metrics: Callable[[Sequence[str], Sequence[str]], dict[str, Any]]  # (gold, predicted)
    answer_metrics: Callable[[Sequence[str], Sequence[str]], dict[str, Any]]  # (answers, references)

    def documents(self, data: str, limit: int = 0, seed: int = 0) -> list[PubMedQARecord]:
        """The official test questions from ``data`` (a folder or 'hub'); with ``limit``, a label-stratified sample."""
        records = load_records(data)
        test = [records[pubid] for pubid in load_test_ids(data if Path(data).is_dir() else None)]
        if not 0 <= limit <= len(test):
            raise ValueError(f"--limit must be between 1 and {len(test)} (0 = all), got {limit}")
        # The ground-truth file is sorted by label: a sample must be stratified, never the first N.
        return stratified_sample(test, limit, seed) if limit else test


PUBMEDQA = Task(
    name="pubmedqa",
    choices=ANSWER_OPTIONS,
    doc_to_prompt=lambda record: record.prompt_input(),
    doc_to_target=lambda record: record.final_decision,
    doc_to_reference=lambda record: record.long_answer,
    decision_metrics=decision_metrics,  # PubMedQA's official accuracy and macro-F1, per class, confusion matrix
    answer_metrics=text_metrics,  # Token-F1, BLEU, ROUGE-1/L
)
