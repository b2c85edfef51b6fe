"""The optional first phase on PubMedQA's 211k artificial questions (PQA-A), as the PubMedQA authors did before
PQA-L: the same recipe without dev selection, in its own checkpoint folder; the PQA-L phase then continues its adapter."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

from pubmedqa.data import DataFormatError, Split, load_artificial
from training.arguments import TrainArguments
from training.sft_data import build_examples
from training.trainer import build_trainer, sft_config, train_interruptibly

logger = logging.getLogger("scripts.train")  # every step of the script logs under the script's name

PQA_A_RECORD = "pqa_a/phase.json"  # what the PQA-A phase used, kept for --resume of the PQA-L phase


def pqa_a_phase(
    model: Any, tokenizer: Any, peft_config: Any, args: TrainArguments, split: Split, output_dir: Path, resume: bool
) -> tuple[Any, Any, dict[str, Any] | None]:
    """The model and LoRA config the PQA-L phase starts from, and what the PQA-A phase used (None without --pqa_a).

    ``resume``: the PQA-L phase has a checkpoint to resume from."""
    if not args.pqa_a:
        return model, peft_config, None
    if resume and (output_dir / PQA_A_RECORD).is_file():
        # The PQA-L checkpoint already holds the adapter that the first phase started.
        logger.info("Resuming the PQA-L phase; the PQA-A phase is done")
        return model, peft_config, json.loads((output_dir / PQA_A_RECORD).read_text())
    model, info = _train_on_artificial(model, tokenizer, peft_config, args, split, output_dir)
    return model, None, info  # the PQA-L phase continues the adapter of the first phase


def _train_on_artificial(
    model: Any, tokenizer: Any, peft_config: Any, args: TrainArguments, split: Split, output_dir: Path
) -> tuple[Any, dict[str, Any]]:
    """First phase on PQA-A: the same recipe, no dev selection. Returns the model with its adapter, and what was used.

    PQA-A and PQA-L are disjoint by construction; any PQA-L dev or test id found in PQA-A is dropped all the same, so
    the no-test guarantee does not rest on it."""
    records = load_artificial(args.pqa_a)
    held_out = {r.pubid for r in (*split.dev, *split.test)}
    kept = [r for pubid, r in sorted(records.items()) if pubid not in held_out]
    dropped = len(records) - len(kept)
    if args.pqa_a_limit > 0 and len(kept) > args.pqa_a_limit:
        kept = sorted(random.Random(args.seed).sample(kept, args.pqa_a_limit), key=lambda r: r.pubid)
    logger.info("PQA-A phase: %d questions (%d dropped as PQA-L dev/test ids)", len(kept), dropped)
    examples = build_examples(kept, tokenizer, args.max_length, args.answer_target)
    if not examples:
        raise DataFormatError(f"no usable PQA-A questions in {args.pqa_a}")
    config = sft_config(
        args, output_dir / "pqa_a", num_train_epochs=args.pqa_a_epochs, eval_strategy="no", save_steps=500
    )
    trainer = build_trainer(model, tokenizer, config, peft_config, examples, decision_weight=args.decision_loss_weight)
    result = train_interruptibly(trainer, args.resume and any((output_dir / "pqa_a").glob("checkpoint-*")))
    info = {
        "source": args.pqa_a,
        "questions": len(examples),
        "dropped_pqa_l_ids": dropped,
        "labels": dict(Counter(r.final_decision for r in kept)),
        "epochs": args.pqa_a_epochs,
        "global_step": result.global_step,
        "training_loss": result.training_loss,
    }
    if trainer.is_world_process_zero():
        (output_dir / PQA_A_RECORD).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / PQA_A_RECORD).write_text(json.dumps(info, indent=2))
    return trainer.model, info
