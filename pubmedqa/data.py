"""PubMedQA PQA-L: one loader for the local JSON files and the Hub dataset, and the official split.

Test = the 500 official test ids; the other 500 are split, stratified by label with a fixed seed, into train and
dev. Every consumer (training, evaluation, the app's examples) gets its records from here.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from pubmedqa.config import PROJECT_ROOT
from pubmedqa.prompts import ANSWER_OPTIONS, PromptInput, format_answer

logger = logging.getLogger(__name__)

HUB_DATASET = "qiaojin/PubMedQA"
HUB_CONFIG = "pqa_labeled"
HUB_ARTIFICIAL_CONFIG = "pqa_artificial"  # PQA-A: 211k questions labelled yes/no by a heuristic
ARTIFICIAL_FILE = "ori_pqaa.json"  # its name in the PubMedQA repository
# The official test ids (no labels), shipped so that the Hub copy, which has no split, can be split the same way.
SHIPPED_TEST_IDS = PROJECT_ROOT / "assets" / "pubmedqa_test_ids.json"
DEFAULT_SPLIT_SEED = 0
#: Where the commands read PubMedQA from when no --data is given: a folder, or "hub" (the default).
DATA_ENV = "PUBMEDQA_DATA"


def default_data_source() -> str:
    """``$PUBMEDQA_DATA`` when set (a folder with ``ori_pqal.json``), else ``hub``: qiaojin/PubMedQA through the
    datasets cache, so a clone needs no data folder and a second run works offline."""
    return os.environ.get(DATA_ENV, "").strip() or "hub"


class DataFormatError(ValueError):
    """A PubMedQA file or record does not have the expected shape."""


@dataclass(frozen=True)
class PubMedQARecord:
    pubid: str
    question: str
    contexts: tuple[str, ...]
    context_labels: tuple[str, ...]
    long_answer: str
    final_decision: str

    @property
    def context(self) -> str:
        """The abstract without its conclusion, one labelled paragraph per line."""
        labels = self.context_labels if len(self.context_labels) == len(self.contexts) else ("",) * len(self.contexts)
        return "\n".join(f"{label}: {text}" if label else text for label, text in zip(labels, self.contexts))

    @property
    def reference_answer(self) -> str:
        """The answer a tuned model should give: decision, then the abstract's conclusion."""
        return format_answer(self.final_decision, self.long_answer)

    def prompt_input(self) -> PromptInput:
        return PromptInput(question=self.question, context=self.context)


def _record(pubid: str, question: Any, contexts: Any, labels: Any, long_answer: Any, decision: Any) -> PubMedQARecord:
    where = f"record {pubid}"
    if not isinstance(question, str) or not question.strip():
        raise DataFormatError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise DataFormatError(f"{where}: 'contexts' must be a list of strings")
    if not isinstance(labels, list):
        labels = []
    if not isinstance(long_answer, str):
        raise DataFormatError(f"{where}: 'long_answer' must be a string")
    if decision not in ANSWER_OPTIONS:
        raise DataFormatError(f"{where}: 'final_decision' must be one of {ANSWER_OPTIONS}, got {decision!r}")
    return PubMedQARecord(
        pubid=str(pubid),
        question=question.strip(),
        contexts=tuple(contexts),
        context_labels=tuple(str(label) for label in labels),
        long_answer=long_answer.strip(),
        final_decision=decision,
    )


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataFormatError(f"{path} does not exist (set --data / {DATA_ENV} to the PubMedQA folder, or use hub)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path} is not valid JSON: {exc}") from None


def load_local(data_dir: str | Path) -> dict[str, PubMedQARecord]:
    """Records from ``ori_pqal.json`` in ``data_dir`` (the PubMedQA repository's format), keyed by PubMed id."""
    return load_local_file(Path(data_dir) / "ori_pqal.json")


def load_local_file(path: Path) -> dict[str, PubMedQARecord]:
    """Records from one JSON file in the PubMedQA repository's format (``ori_pqal.json``, ``ori_pqaa.json``)."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f"{path}: expected a non-empty JSON object keyed by PubMed id")
    records = {}
    for pubid, item in raw.items():
        if not isinstance(item, dict):
            raise DataFormatError(f"{path}: record {pubid} is not an object")
        records[str(pubid)] = _record(
            pubid,
            item.get("QUESTION"),
            item.get("CONTEXTS"),
            item.get("LABELS"),
            item.get("LONG_ANSWER"),
            item.get("final_decision"),
        )
    return records


def records_from_hub_rows(rows: Iterable[dict[str, Any]]) -> dict[str, PubMedQARecord]:
    """Records from rows of the Hub dataset ``qiaojin/PubMedQA`` (configs ``pqa_labeled`` and ``pqa_artificial``
    share this shape)."""
    records = {}
    for row in rows:
        context = row.get("context") or {}
        pubid = str(row.get("pubid"))
        records[pubid] = _record(
            pubid,
            row.get("question"),
            context.get("contexts"),
            context.get("labels"),
            row.get("long_answer"),
            row.get("final_decision"),
        )
    if not records:
        raise DataFormatError("the Hub dataset returned no rows")
    return records


def load_artificial(source: str | Path) -> dict[str, PubMedQARecord]:
    """PQA-A, the artificial questions of an optional first training phase: ``hub`` (config ``pqa_artificial``),
    a JSON file of the same shape as ``ori_pqal.json``, or a folder holding ``ori_pqaa.json``."""
    if str(source) == "hub":
        return load_hub(HUB_DATASET, HUB_ARTIFICIAL_CONFIG)
    path = Path(source) / ARTIFICIAL_FILE if Path(source).is_dir() else Path(source)
    if not path.is_file():
        raise DataFormatError(f"{path} does not exist (--pqa_a takes 'hub', an {ARTIFICIAL_FILE} file or its folder)")
    return load_local_file(path)


def hub_rows(repo_id: str = HUB_DATASET, config: str = HUB_CONFIG) -> Iterable[dict[str, Any]]:
    """The rows of a Hub dataset's train split, through the datasets cache (downloaded once, then read offline)."""
    from datasets import load_dataset

    logger.info("Loading %s (%s) from the Hugging Face Hub or its datasets cache", repo_id, config)
    try:
        return load_dataset(repo_id, config, split="train")
    except Exception as exc:  # offline, unknown repo, no access: one clear line instead of a traceback
        raise DataFormatError(
            f"could not load {repo_id} ({config}) from the Hub ({type(exc).__name__}); check the network, "
            f"or use local files (--data / {DATA_ENV}: a folder with ori_pqal.json)"
        ) from None


def load_hub(repo_id: str = HUB_DATASET, config: str = HUB_CONFIG) -> dict[str, PubMedQARecord]:
    return records_from_hub_rows(hub_rows(repo_id, config))


def load_records(source: str | Path) -> dict[str, PubMedQARecord]:
    """Records from a local folder (with ``ori_pqal.json``) or, for ``hub`` or a Hub dataset id, from the Hub."""
    if str(source) == "hub":
        return load_hub()
    if Path(source).is_dir():
        return load_local(source)
    if "/" in str(source) and not Path(source).exists() and not str(source).startswith((".", "/")):
        return load_hub(str(source))
    raise DataFormatError(f"data source {source} is neither a folder with ori_pqal.json nor 'hub'")


def load_test_ids(data_dir: str | Path | None = None) -> list[str]:
    """The official 500 test ids: from ``test_ground_truth.json`` in ``data_dir`` when present, else the shipped list."""
    if data_dir is not None and (Path(data_dir) / "test_ground_truth.json").is_file():
        path = Path(data_dir) / "test_ground_truth.json"
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise DataFormatError(f"{path}: expected an object {{pmid: label}}")
        return [str(pubid) for pubid in raw]
    raw = _read_json(SHIPPED_TEST_IDS)
    return [str(pubid) for pubid in raw["test_ids"]]


@dataclass(frozen=True)
class Split:
    train: list[PubMedQARecord]
    dev: list[PubMedQARecord]
    test: list[PubMedQARecord]


def _stratified_order(records: Sequence[PubMedQARecord], seed: int) -> dict[str, list[PubMedQARecord]]:
    by_label: dict[str, list[PubMedQARecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.pubid):
        by_label[record.final_decision].append(record)
    rng = random.Random(seed)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    return by_label


def stratified_sample(records: Sequence[PubMedQARecord], n: int, seed: int = DEFAULT_SPLIT_SEED) -> list[PubMedQARecord]:
    """``n`` records with the label proportions of ``records``, chosen reproducibly by ``seed``."""
    if n >= len(records):
        return list(records)
    by_label = _stratified_order(records, seed)
    total = len(records)
    quotas = {label: int(n * len(items) / total) for label, items in by_label.items()}
    # Hand the rounding remainder to the labels with the largest fractional share.
    remainder = sorted(by_label, key=lambda lb: (n * len(by_label[lb]) / total) - quotas[lb], reverse=True)
    for label in remainder[: n - sum(quotas.values())]:
        quotas[label] += 1
    chosen = [r for label in sorted(by_label) for r in by_label[label][: quotas[label]]]
    return sorted(chosen, key=lambda r: r.pubid)


def official_split(
    records: dict[str, PubMedQARecord], test_ids: Sequence[str], dev_size: int = 50, seed: int = DEFAULT_SPLIT_SEED
) -> Split:
    """Official test set, and the remaining records split into train and a label-stratified dev set."""
    test_set = set(test_ids)
    missing = test_set - records.keys()
    if missing:
        raise DataFormatError(f"{len(missing)} official test ids are not in the data (e.g. {sorted(missing)[0]})")
    rest = [r for pubid, r in records.items() if pubid not in test_set]
    dev = stratified_sample(rest, dev_size, seed)
    dev_ids = {r.pubid for r in dev}
    train = sorted((r for r in rest if r.pubid not in dev_ids), key=lambda r: r.pubid)
    test = sorted((records[pubid] for pubid in test_set), key=lambda r: r.pubid)
    return Split(train=train, dev=dev, test=test)


@dataclass
class SplitSettings:
    """Where PubMedQA comes from and how its 500 non-test questions split into train and dev. The commands that
    reuse a training run's split (calibration, decision probe, baseline) must be given the same values."""

    data: str = field(
        default_factory=default_data_source,
        metadata={"help": "Folder with ori_pqal.json (+ test_ground_truth.json), or 'hub' (the default) for "
                          "qiaojin/PubMedQA, kept in the datasets cache."},
    )
    dev_size: int = field(default=50, metadata={"help": "Dev questions held out of the 500 non-test ones."})
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "Seed of the stratified train/dev split."})

    def load_split(self) -> Split:
        records = load_records(self.data)
        test_ids = load_test_ids(self.data if Path(self.data).is_dir() else None)
        return official_split(records, test_ids, self.dev_size, self.split_seed)


SHIPPED_EXAMPLES = PROJECT_ROOT / "assets" / "examples.json"


def load_examples(path: Path = SHIPPED_EXAMPLES, key: str = "examples") -> list[dict[str, str]]:
    """The app's example questions (``examples``: training side; ``dev_examples``: dev side, with the reference
    answer), shipped in assets/ since a Space has no data folder. A missing or malformed file only costs the
    examples, never the app."""
    fields_ = ("pubid", "question", "context", "final_decision", "long_answer")
    try:
        examples = _read_json(path)[key]
        return [{name: str(ex.get(name, "")) for name in fields_} for ex in examples if ex["question"]]
    except (DataFormatError, KeyError, TypeError) as exc:
        logger.warning("No example questions (%s): %s", key, exc)
        return []
