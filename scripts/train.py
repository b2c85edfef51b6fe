"""LoRA / QLoRA fine-tuning on PubMedQA PQA-L with the official split.

    python -m scripts.train                                   # embedded Gemma 3 270M, local data, CPU
    python -m scripts.train --base_model meta-llama/Llama-2-13b-chat-hf --quantization 4bit   # QLoRA on a GPU
    python -m scripts.train --base_model bartowski/Qwen2.5-1.5B-Instruct-GGUF:Q4_K_M \
        --train_base_model Qwen/Qwen2.5-1.5B-Instruct   # a GGUF base: LoRA trains on its transformers checkpoint

Parse settings -> load data (official split, test never seen) -> build prompt/completion pairs in the shared
format -> TRL SFTTrainer with a LoRA config (loss on the answer only, dynamic padding) -> keep the best checkpoint
by dev accuracy -> save adapter, settings, dev metrics and model card -> optionally push to the Hub.
Each step is a function of its own module: sft_data, lora, pqa_a_phase, trainer, adapter_files, run_record.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from pubmedqa.config import EMBEDDED_MODEL, BaseModelSettings, parse_settings
from pubmedqa.data import DataFormatError
from pubmedqa.model_loading import ModelLoadError, load_base_model
from training.adapter_files import fit_decisions, save_adapter
from training.arguments import TrainArguments
from training.gguf_base import training_base
from training.hub import HubError
from training.lora import lora_config, trainable_base
from training.pqa_a_phase import pqa_a_phase
from training.run_record import run_info, write_run_record
from training.sft_data import load_pqa_l, pqa_l_examples
from training.trainer import TrainingInterrupted, dev_decision_metrics, dev_summary, pqa_l_trainer, train_interruptibly

logger = logging.getLogger("scripts.train")


def train(model_settings: BaseModelSettings, args: TrainArguments) -> Path:
    """One run: data, LoRA, the optional PQA-A phase, the PQA-L phase, then the adapter folder (returned)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (args.overwrite or args.resume):
        raise ValueError(f"{output_dir} already exists and is not empty: pass --overwrite, --resume or another --output_dir")
    split, train_records = load_pqa_l(args)
    served_base = model_settings.base_model
    model_settings = training_base(model_settings, args.train_base_model)  # a GGUF base trains on its transformers twin
    base = load_base_model(model_settings)
    model = trainable_base(base)
    examples = pqa_l_examples(split, train_records, base.tokenizer, args.max_length, args.answer_target)
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
    serve_base = f"PUBMEDQA_BASE_MODEL={served_base} " if served_base != EMBEDDED_MODEL else ""
    logger.info("Adapter written to %s; serve it with: %sPUBMEDQA_ADAPTER=%s python app.py", output_dir, serve_base, output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    # Under `accelerate launch` every process runs this; only the main one (RANK 0) logs progress.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = _parse(argv)
        output_dir = train(model_settings, args)
        if args.push_to_hub:
            from scripts.push import push_adapter

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
