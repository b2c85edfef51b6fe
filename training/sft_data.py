"""The training data: the official PQA-L split, and prompt/completion pairs in the shared prompt format (the one the
app and the evaluation build), so that the adapter is trained on exactly the prompts it will be served."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from pubmedqa.data import PubMedQARecord, Split
from pubmedqa.decisions.options import option_token_ids
from pubmedqa.prompts import ANSWER_OPTIONS, PromptTooLongError, fit_prompt, format_completion, training_answer
from training.arguments import TrainArguments

logger = logging.getLogger("scripts.train")  # every step of the script logs under the script's name


@dataclass(frozen=True)
class PQALExamples:
    """The PQA-L phase's pairs; ``dev_gold`` is aligned with ``dev`` (a question too long to fit has neither)."""

    train_records: Sequence[PubMedQARecord]  # all of them, the ones too long to fit included
    train: list[dict[str, str]]
    dev: list[dict[str, str]]
    dev_gold: list[str]


def load_pqa_l(args: TrainArguments) -> tuple[Split, Sequence[PubMedQARecord]]:
    """The official split and the questions trained on (--limit_train of the training part)."""
    split = args.load_split()
    train_records = split.train[: args.limit_train] if args.limit_train > 0 else split.train
    logger.info("Official split: %d train, %d dev, %d test (never used here)", len(split.train), len(split.dev), len(split.test))
    return split, train_records


def build_examples(
    records: Sequence[PubMedQARecord], tokenizer: Any, max_length: int, target: str = "first_sentence"
) -> list[dict[str, str]]:
    """Prompt/completion pairs in the shared format. The completion is the decision followed by the conclusion, or
    its first sentence (``target``, see ``pubmedqa.prompts.ANSWER_TARGETS``); when a pair is too long, the context
    is shortened (never the question or the answer)."""
    examples = []
    eos = tokenizer.eos_token or ""
    for record in records:
        completion = format_completion(training_answer(record.final_decision, record.long_answer, target), tokenizer)
        completion_tokens = len(tokenizer(completion + eos, add_special_tokens=False)["input_ids"])
        try:
            fitted = fit_prompt(record.prompt_input(), tokenizer, max_length - completion_tokens)
        except PromptTooLongError:
            logger.warning("Skipping %s: question + answer alone exceed max_length=%d", record.pubid, max_length)
            continue
        examples.append({"pubid": record.pubid, "prompt": fitted.text, "completion": completion})
    return examples


def pqa_l_examples(
    split: Split, train_records: Sequence[PubMedQARecord], tokenizer: Any, max_length: int, target: str
) -> PQALExamples:
    train = build_examples(train_records, tokenizer, max_length, target)
    dev = build_examples(split.dev, tokenizer, max_length, target)
    dev_decisions = {r.pubid: r.final_decision for r in split.dev}
    return PQALExamples(train_records, train, dev, [dev_decisions[e["pubid"]] for e in dev])


def sft_dataset(examples: list[dict[str, str]]) -> Any:
    """The pairs as the ``datasets.Dataset`` SFTTrainer tokenizes (the pubid is for bookkeeping only)."""
    from datasets import Dataset

    return Dataset.from_list([{k: e[k] for k in ("prompt", "completion")} for e in examples])


def balanced_class_weights(records: Sequence[PubMedQARecord], tokenizer: Any) -> dict[int, float]:
    """Inverse label frequency (mean 1 over the training examples), keyed by the token id each answer starts with."""
    counts = Counter(r.final_decision for r in records)
    weights = {}
    for option, ids in zip(ANSWER_OPTIONS, option_token_ids(tokenizer)):
        if counts[option]:
            weights[ids[0]] = len(records) / (len(counts) * counts[option])
    logger.info("Balanced decision weights: %s", {o: round(len(records) / (len(counts) * counts[o]), 2) for o in counts})
    return weights
