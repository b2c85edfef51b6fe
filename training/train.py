"""LoRA / QLoRA fine-tuning on PubMedQA PQA-L with the official split.

    python -m training.train                                   # embedded Gemma 3 270M, local data, CPU
    python -m training.train --base_model meta-llama/Llama-2-13b-chat-hf --quantization 4bit   # QLoRA on a GPU

Parse settings -> load data (official split, test never seen) -> build prompt/completion pairs in the shared
format -> TRL SFTTrainer with a LoRA config (loss on the answer only, dynamic padding) -> keep the best checkpoint
by dev accuracy -> save adapter, settings, dev metrics and model card -> optionally push to the Hub.
Each step is a function of its own module: sft_data, lora, pqa_a_phase, trainer, adapter_files, run_record.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from pubmedqa.config import BaseModelSettings, parse_settings
from pubmedqa.data import DataFormatError, SplitSettings
from pubmedqa.model_loading import ModelLoadError, load_base_model
from training.adapter_files import fit_decisions, save_adapter
from training.hub import HubError
from training.lora import lora_config, trainable_base
from training.pqa_a_phase import pqa_a_phase
from training.run_record import run_info, write_run_record
from training.sft_data import load_pqa_l, pqa_l_examples
from training.trainer import TrainingInterrupted, dev_decision_metrics, dev_summary, pqa_l_trainer, train_interruptibly

logger = logging.getLogger("training.train")


@dataclass
class TrainArguments(SplitSettings):
    output_dir: str = field(default="outputs/adapter", metadata={"help": "Where the adapter and its card are written."})
    limit_train: int = field(default=0, metadata={"help": "Train on only this many questions (0 = all); for quick runs."})
    pqa_a: str = field(
        default="",
        metadata={
            "help": "Optional first phase on PubMedQA's 211k artificial questions (PQA-A), as the PubMedQA authors "
            "did before PQA-L: 'hub' (qiaojin/PubMedQA, config pqa_artificial), a JSON file shaped like ori_pqal.json "
            "(ori_pqaa.json), or a folder holding ori_pqaa.json. The PQA-L phase then continues the same adapter."
        },
    )
    pqa_a_limit: int = field(default=0, metadata={"help": "Use only this many PQA-A questions, chosen at random (0 = all)."})
    pqa_a_epochs: float = field(default=1.0, metadata={"help": "Epochs over the PQA-A questions."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names, or 'all-linear' (every attention and MLP projection)."},
    )
    decision_loss_weight: float = field(
        default=1.0, metadata={"help": "Loss weight of the answer's first token (the yes/no/maybe decision)."}
    )
    balance_decisions: bool = field(
        default=False,
        metadata={
            "help": "Weight each decision's loss by the inverse frequency of its label in the training set, so the "
            "rare 'maybe' and 'no' count as much as 'yes' (against collapsing onto the majority label)."
        },
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (cosine schedule, warm-up 5%%)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training questions."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1 = use epochs)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Questions per forward pass."})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Forward passes per optimizer step."})
    max_length: int = field(
        default=384, metadata={"help": "Token limit of prompt + answer; the context is shortened to fit, never the answer."}
    )
    eval_steps: int = field(default=30, metadata={"help": "Evaluate on dev (loss, accuracy) every N optimizer steps."})
    logging_steps: int = field(default=5, metadata={"help": "Log the training loss every N optimizer steps."})
    seed: int = field(default=42, metadata={"help": "Seed of model initialisation and data order."})
    select_by: str = field(
        default="accuracy_f1",
        metadata={
            "help": "How dev picks the checkpoint: 'accuracy_f1' = (accuracy + macro-F1) / 2 of the raw decisions; "
            "'auc' = pairwise AUC of the option scores, which the decision calibration does not change (it rewards "
            "separating the labels, not the lean of the moment).",
            "choices": ["accuracy_f1", "auc"],
        },
    )
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "Fit per-option decision offsets on dev after training and save them with the adapter "
            "(--no_calibrate: raw option likelihoods)."
        },
    )
    probe_depth: float | None = field(
        default=None,
        metadata={
            "help": "LoRA trains only the decoder layers above this fraction of the model's depth (0.55: layers 10-17 "
            "of Gemma 3 270M's 18), so the hidden states there stay the base model's and the decision probe reads "
            "features that no training label has shaped (see training/decision_probe.py). 0: LoRA on every layer, "
            "and no probe. Default: 0.55, or 0 with --pqa_a (after 211k artificial questions the adapter's own "
            "decision is the one to trust, and it needs every layer)."
        },
    )
    decision_probe: bool = field(
        default=True,
        metadata={
            "help": "After training, fit the decision probe (a logistic regression on the hidden states at "
            "--probe_depth, cross-validated on the 500 non-test questions) and ship it with the adapter. "
            "--no_decision_probe: the adapter's own option logits decide."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Train into an output_dir that already has files."})
    push_to_hub: str = field(default="", metadata={"help": "Upload the adapter to this Hub repo id when done."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        if self.probe_depth is None:
            self.probe_depth = 0.0 if self.pqa_a else 0.55
        if not 0 <= self.probe_depth < 1:
            raise ValueError(f"--probe_depth must be at least 0 and below 1, got {self.probe_depth}")


def train(model_settings: BaseModelSettings, args: TrainArguments) -> Path:
    """One run: data, LoRA, the optional PQA-A phase, the PQA-L phase, then the adapter folder (returned)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (args.overwrite or args.resume):
        raise ValueError(f"{output_dir} already exists and is not empty: pass --overwrite, --resume or another --output_dir")
    split, train_records = load_pqa_l(args)
    base = load_base_model(model_settings)
    model = trainable_base(base)
    examples = pqa_l_examples(split, train_records, base.tokenizer, args.max_length)
    lora = lora_config(args, model)
    has_checkpoint = args.resume and any(output_dir.glob("checkpoint-*"))
    model, peft_config, pqa_a = pqa_a_phase(model, base.tokenizer, lora, args, split, output_dir, has_checkpoint)
    trainer = pqa_l_trainer(model, base.tokenizer, peft_config, args, output_dir, examples)
    if args.resume and not has_checkpoint:
        logger.warning("--resume given but no checkpoint in %s: starting from scratch", output_dir)
    baseline = dev_decision_metrics(trainer.model, base.tokenizer, trainer.dev_prompts, trainer.dev_gold)
    logger.info("Dev before training: %s", dev_summary(baseline))
    result = train_interruptibly(trainer, has_checkpoint)

    if not trainer.is_world_process_zero():
        return output_dir  # under `accelerate launch`, the main process alone writes the adapter and its files

    metadata = save_adapter(trainer, base, model_settings, lora, output_dir)
    decisions = fit_decisions(trainer, base, args, [*train_records, *split.dev], metadata, output_dir)
    info = run_info(model_settings, args, base, split, train_records, pqa_a, trainer, result)
    write_run_record(output_dir, info, baseline, decisions, trainer.state.log_history)
    logger.info("Adapter written to %s; serve it with: PUBMEDQA_ADAPTER=%s python app.py", output_dir, output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    # Under `accelerate launch` every process runs this; only the main one (RANK 0) logs progress.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = _parse(argv)
        output_dir = train(model_settings, args)
        if args.push_to_hub:
            from training.push import push_adapter

            push_adapter(output_dir, args.push_to_hub, private=args.private)
    except (DataFormatError, ModelLoadError, ValueError, TrainingInterrupted, HubError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


def _parse(argv: Sequence[str] | None) -> tuple[BaseModelSettings, TrainArguments]:
    model_settings, args = parse_settings([BaseModelSettings, TrainArguments], argv)
    given = list(argv) if argv is not None else sys.argv[1:]
    chosen = "PUBMEDQA_QUANTIZATION" in os.environ or any(a.startswith("--quantization") for a in given)
    if not chosen and not torch.cuda.is_available():
        # QLoRA exists to fit big models in GPU memory; on a CPU with a small model, full precision LoRA is simpler.
        logger.info("No GPU: plain LoRA on full-precision weights (pass --quantization 4bit for QLoRA)")
        model_settings.quantization = "none"
    return model_settings, args


if __name__ == "__main__":
    sys.exit(main())
