"""LoRA / QLoRA fine-tuning on PubMedQA PQA-L with the official split.

    python -m training.train                                   # embedded Gemma 3 270M, local data, CPU
    python -m training.train --base_model meta-llama/Llama-2-13b-chat-hf --quantization 4bit   # QLoRA on a GPU

Parse settings -> load data (official split, test never seen) -> build prompt/completion pairs in the shared
format -> TRL SFTTrainer with a LoRA config (loss on the answer only, dynamic padding) -> keep the best checkpoint
by dev accuracy -> save adapter, settings, dev metrics and model card -> optionally push to the Hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from transformers import TrainerCallback

from pubmedqa.adapter_metadata import AdapterMetadata
from pubmedqa.backends.transformers_passes import decoder_layers, score_options
from pubmedqa.config import BaseModelSettings, ModelSettings, parse_settings
from pubmedqa.data import DataFormatError, PubMedQARecord, Split, SplitSettings, load_artificial
from pubmedqa.decisions.options import option_token_ids
from pubmedqa.decisions.probe import probe_layer
from pubmedqa.evaluation.metrics import probability_metrics
from pubmedqa.model_loading import ModelLoadError, load_base_model
from pubmedqa.prompts import ANSWER_OPTIONS, PromptTooLongError, fit_prompt, format_completion
from training.calibrate import fit_calibration
from training.decision_probe import ProbeFitError, fit_for_model, labelled_prompts
from training.hub import HubError
from training.model_card import write_model_card

logger = logging.getLogger("training.train")

PQA_A_RECORD = "pqa_a/phase.json"  # what the PQA-A phase used, kept for --resume of the PQA-L phase


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


def build_examples(records: Sequence[PubMedQARecord], tokenizer: Any, max_length: int) -> list[dict[str, str]]:
    """Prompt/completion pairs in the shared format. The completion is the decision followed by the conclusion;
    when a pair is too long, the context is shortened (never the question or the answer)."""
    examples = []
    eos = tokenizer.eos_token or ""
    for record in records:
        completion = format_completion(record.reference_answer, tokenizer)
        completion_tokens = len(tokenizer(completion + eos, add_special_tokens=False)["input_ids"])
        try:
            fitted = fit_prompt(record.prompt_input(), tokenizer, max_length - completion_tokens)
        except PromptTooLongError:
            logger.warning("Skipping %s: question + answer alone exceed max_length=%d", record.pubid, max_length)
            continue
        examples.append({"pubid": record.pubid, "prompt": fitted.text, "completion": completion})
    return examples


def balanced_class_weights(records: Sequence[PubMedQARecord], tokenizer: Any) -> dict[int, float]:
    """Inverse label frequency (mean 1 over the training examples), keyed by the token id each answer starts with."""
    counts = Counter(r.final_decision for r in records)
    weights = {}
    for option, ids in zip(ANSWER_OPTIONS, option_token_ids(tokenizer)):
        if counts[option]:
            weights[ids[0]] = len(records) / (len(counts) * counts[option])
    logger.info("Balanced decision weights: %s", {o: round(len(records) / (len(counts) * counts[o]), 2) for o in counts})
    return weights


def dev_probabilities(model: Any, tokenizer: Any, prompts: list[str]) -> list[dict[str, float]]:
    was_training = model.training
    model.eval()
    probabilities = score_options(model, tokenizer, prompts)
    if was_training:
        model.train()
    return probabilities


def dev_decision_metrics(model: Any, tokenizer: Any, prompts: list[str], gold: list[str]) -> dict[str, Any]:
    return probability_metrics(dev_probabilities(model, tokenizer, prompts), gold)


def _dev_summary(metrics: dict[str, Any]) -> str:
    return f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, pairwise AUC {metrics['pairwise_auc']:.3f}"


def selection_score(metrics: dict[str, Any], select_by: str) -> float:
    # A 270M base collapses onto one label easily: accuracy alone would reward "always yes".
    if select_by == "auc":
        return metrics["pairwise_auc"]
    return (metrics["accuracy"] + metrics["macro_f1"]) / 2


def answer_only_loss(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    num_items: Any = None,
    decision_weight: float = 1.0,
    class_weights: dict[int, float] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Causal-LM loss on the answer tokens, computing logits only at the positions that predict them.

    Only answer tokens carry a loss (prompt labels are -100), and with a 262k vocabulary the output projection of
    every prompt position would cost more than the whole transformer body. ``decision_weight`` scales the loss of
    each answer's first token — the yes/no/maybe decision, one token among ~60 of explanation — and
    ``class_weights`` (that token's id -> factor) scales it further per label."""
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep)
    logits = outputs.logits.float()
    kept = targets[:, keep]
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(kept)
    if decision_weight != 1.0 or class_weights:
        answer = kept != -100
        first = answer & (answer.cumsum(dim=1) == 1)
        weight = torch.full_like(token_loss, decision_weight)
        for token_id, factor in (class_weights or {}).items():
            weight = torch.where(kept == token_id, weight * factor, weight)
        token_loss = token_loss * torch.where(first, weight, 1.0)
    return token_loss.sum() / (num_items if num_items is not None else (targets != -100).sum()), outputs


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training: the last step was checkpointed."""


class StopOnInterrupt(TrainerCallback):
    """On Ctrl-C, finish the current step, save a resumable checkpoint and stop (instead of losing the run)."""

    requested = False

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[None]:
        def request(signum: int, frame: Any) -> None:
            if cls.requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            logger.warning("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")
            cls.requested = True

        cls.requested = False
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.signal(signal.SIGINT, request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if StopOnInterrupt.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class EvaluateAtEnd(TrainerCallback):
    """Evaluate (and so checkpoint) the last step too, so the best-checkpoint choice includes the finished model."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


def _make_trainer_class():
    from trl import SFTTrainer

    class PubMedQATrainer(SFTTrainer):
        """SFTTrainer whose evaluation also reports yes/no/maybe accuracy and macro-F1 on dev (by option
        likelihood, the same scoring the evaluation uses), so the best checkpoint is chosen by dev accuracy."""

        def __init__(
            self,
            *args: Any,
            dev_prompts: list[str],
            dev_gold: list[str],
            decision_weight: float = 1.0,
            class_weights: dict[int, float] | None = None,
            select_by: str = "accuracy_f1",
            **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.dev_prompts, self.dev_gold, self.select_by = dev_prompts, dev_gold, select_by
            self.decision_weight, self.class_weights = decision_weight, class_weights

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            loss, outputs = answer_only_loss(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], num_items_in_batch,
                self.decision_weight, self.class_weights,
            )
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            metrics = super().evaluate(*args, **kwargs)
            scores = dev_decision_metrics(self.model, self.processing_class, self.dev_prompts, self.dev_gold)
            extra = {
                "eval_accuracy": scores["accuracy"],
                "eval_macro_f1": scores["macro_f1"],
                "eval_pairwise_auc": scores["pairwise_auc"],
                "eval_selection_score": selection_score(scores, self.select_by),
                **{f"eval_predicted_{label}": n for label, n in scores["predicted_counts"].items()},
            }
            self.log(extra)
            metrics.update(extra)
            return metrics

    return PubMedQATrainer


def _sft_config(args: TrainArguments, output_dir: Path, **phase: Any) -> Any:
    """The SFT settings both phases share; ``phase`` sets epochs, evaluation and checkpoint selection."""
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a float below 1 is a ratio of the total steps
        max_length=args.max_length,
        completion_only_loss=True,  # loss on the answer only: prompt tokens are masked
        packing=False,  # dynamic padding per batch
        save_strategy="steps",
        save_total_limit=2,
        logging_steps=args.logging_steps,
        seed=args.seed,
        bf16=cuda,
        use_cpu=not cuda,  # also what makes `accelerate launch` on a CPU-only machine run DDP over gloo
        gradient_checkpointing=cuda,
        report_to="none",
        prediction_loss_only=True,  # never gather full-vocabulary logits during evaluation
        save_only_model=False,
        dataloader_num_workers=0,
        **phase,
    )


def _train_interruptibly(trainer: Any, resume: bool) -> Any:
    """``trainer.train()``, resuming from its last checkpoint if asked; Ctrl-C saves a checkpoint and raises
    :class:`TrainingInterrupted` (used by both phases)."""
    trainer.add_callback(StopOnInterrupt())
    with StopOnInterrupt.installed():
        result = trainer.train(resume_from_checkpoint=True if resume else None)
    if StopOnInterrupt.requested:
        raise TrainingInterrupted(
            f"Interrupted: a checkpoint was saved in {trainer.args.output_dir}; continue with the same command plus "
            "--resume"
        )
    return result


def _dataset(examples: list[dict[str, str]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{k: e[k] for k in ("prompt", "completion")} for e in examples])


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
    examples = build_examples(kept, tokenizer, args.max_length)
    if not examples:
        raise DataFormatError(f"no usable PQA-A questions in {args.pqa_a}")
    config = _sft_config(
        args, output_dir / "pqa_a", num_train_epochs=args.pqa_a_epochs, eval_strategy="no", save_steps=500
    )
    trainer = _make_trainer_class()(
        model=model,
        args=config,
        train_dataset=_dataset(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        dev_prompts=[],
        dev_gold=[],
        decision_weight=args.decision_loss_weight,
    )
    result = _train_interruptibly(trainer, args.resume and any((output_dir / "pqa_a").glob("checkpoint-*")))
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


def lora_layers(model: Any, probe_depth: float) -> list[int] | None:
    """The decoder layers LoRA trains: those above the probe (all of them without one)."""
    layers = len(decoder_layers(model))
    below = probe_layer(layers, probe_depth)
    return None if below is None else list(range(below, layers))


def lora_targets(model: Any, targets: str, layers: list[int] | None) -> str | list[str]:
    """--lora_target_modules as PEFT takes it. PEFT restricts "all-linear" to some layers only as a list of names:
    there, the linear projections of one decoder layer."""
    if targets != "all-linear":
        return [t.strip() for t in targets.split(",") if t.strip()]
    if layers is None:
        return targets
    block = decoder_layers(model)[0]
    return sorted({name.rsplit(".", 1)[-1] for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)})


def _ids_hash(records: Sequence[PubMedQARecord]) -> str:
    return hashlib.sha256(",".join(sorted(r.pubid for r in records)).encode()).hexdigest()[:16]


def _canonical_base(model_settings: BaseModelSettings, loaded_source: str) -> str:
    # The embedded checkpoint lives in a local cache folder; the model it is a quantisation of is on the Hub.
    return "google/gemma-3-270m" if model_settings.base_model == "embedded" else loaded_source


def train(model_settings: BaseModelSettings, args: TrainArguments) -> Path:
    from peft import LoraConfig, prepare_model_for_kbit_training

    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (args.overwrite or args.resume):
        raise ValueError(f"{output_dir} already exists and is not empty: pass --overwrite, --resume or another --output_dir")
    split = args.load_split()
    train_records = split.train[: args.limit_train] if args.limit_train > 0 else split.train
    logger.info("Official split: %d train, %d dev, %d test (never used here)", len(split.train), len(split.dev), len(split.test))

    base = load_base_model(model_settings)
    model, tokenizer = base.model, base.tokenizer
    quantized = base.quantization in ("4bit", "8bit")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=torch.cuda.is_available())

    train_examples = build_examples(train_records, tokenizer, args.max_length)
    dev_examples = build_examples(split.dev, tokenizer, args.max_length)
    dev_decisions = {r.pubid: r.final_decision for r in split.dev}
    targets, layers = args.lora_target_modules, lora_layers(model, args.probe_depth)
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_targets(model, targets, layers),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    has_checkpoint = args.resume and any(output_dir.glob("checkpoint-*"))
    pqa_a = None
    if args.pqa_a and has_checkpoint and (output_dir / PQA_A_RECORD).is_file():
        # The PQA-L checkpoint already holds the adapter that the first phase started.
        logger.info("Resuming the PQA-L phase; the PQA-A phase is done")
        pqa_a = json.loads((output_dir / PQA_A_RECORD).read_text())
    elif args.pqa_a:
        model, pqa_a = _train_on_artificial(model, tokenizer, peft_config, args, split, output_dir)
        peft_config = None  # the PQA-L phase continues the adapter of the first phase
    config = _sft_config(
        args,
        output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        load_best_model_at_end=True,
        metric_for_best_model="selection_score",  # see --select_by
        greater_is_better=True,
    )
    trainer = _make_trainer_class()(
        model=model,
        args=config,
        train_dataset=_dataset(train_examples),
        eval_dataset=_dataset(dev_examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        dev_prompts=[e["prompt"] for e in dev_examples],
        dev_gold=[dev_decisions[e["pubid"]] for e in dev_examples],  # aligned with dev_prompts
        decision_weight=args.decision_loss_weight,
        class_weights=balanced_class_weights(train_records, tokenizer) if args.balance_decisions else None,
        select_by=args.select_by,
    )
    if args.resume and not has_checkpoint:
        logger.warning("--resume given but no checkpoint in %s: starting from scratch", output_dir)
    baseline = dev_decision_metrics(trainer.model, tokenizer, trainer.dev_prompts, trainer.dev_gold)
    logger.info("Dev before training: %s", _dev_summary(baseline))
    trainer.add_callback(EvaluateAtEnd())
    result = _train_interruptibly(trainer, has_checkpoint)

    if not trainer.is_world_process_zero():
        return output_dir  # under `accelerate launch`, the main process alone writes the adapter and its files

    # load_best_model_at_end has put the best checkpoint's adapter back; save it as the output.
    trainer.model.peft_config["default"].base_model_name_or_path = _canonical_base(model_settings, base.source)
    trainer.model.save_pretrained(str(output_dir))  # the adapter only; checkpoints stay in checkpoint-*/
    if base.tokenizer_changed:
        tokenizer.save_pretrained(str(output_dir))
    # What serving and refitting read back: the probe's layer (the first layer LoRA trains) and prompt budget.
    metadata = AdapterMetadata(layers[0] if layers else None, ModelSettings.max_input_tokens, base.quantization)
    metadata.save(output_dir)
    probabilities = dev_probabilities(trainer.model, tokenizer, trainer.dev_prompts)
    dev = probability_metrics(probabilities, trainer.dev_gold)
    logger.info("Dev after training (best checkpoint): %s", _dev_summary(dev))
    fitted_on = f"dev ({len(trainer.dev_gold)} questions, {base.quantization})"
    calibration, probe = None, None
    if args.decision_probe and not args.probe_depth:
        logger.info("No decision probe: LoRA trains every decoder layer (--probe_depth 0)")
    elif args.decision_probe:
        try:
            # Train and dev: the probe reads hidden states no label has shaped, so cross-validation on all 500
            # non-test questions is honest, and ten times less noisy than the 50 dev questions alone. Prompts at the
            # app's budget, not training's --max_length: the hidden states the probe will be applied to.
            probe, calibration = fit_for_model(
                trainer.model, tokenizer,
                labelled_prompts([*train_records, *split.dev], tokenizer, metadata.prompt_budget), metadata.probe_layer,
                f"train + dev ({len(train_records) + len(split.dev)} questions, {base.quantization})",
                calibrate=args.calibrate,
            )
            probe.save(output_dir)
        except ProbeFitError as exc:  # the trained adapter is kept, without a probe
            logger.warning("No decision probe: %s", exc)
    if args.calibrate and calibration is None:
        calibration = fit_calibration(probabilities, trainer.dev_gold, fitted_on)
    if calibration is not None:
        calibration.save(output_dir)
    run_info = {
        "base_model": model_settings.base_model,
        "base_model_canonical": _canonical_base(model_settings, base.source),
        "base_description": base.description,
        "quantization": base.quantization,
        "method": "QLoRA" if quantized else "LoRA",
        "model_settings": asdict(model_settings),
        "train_arguments": {k: v for k, v in asdict(args).items()},
        "data_source": "hub:qiaojin/PubMedQA (pqa_labeled)" if not Path(args.data).is_dir() else "local PQA-L files",
        "pqa_a_phase": pqa_a,
        "split": {
            "train": len(train_records),
            "dev": len(split.dev),
            "test_excluded": len(split.test),
            "train_ids_sha256_16": _ids_hash(train_records),
            "dev_ids": [r.pubid for r in split.dev],
            "test_ids_sha256_16": _ids_hash(split.test),
        },
        "train_result": {"global_step": result.global_step, "training_loss": result.training_loss, **result.metrics},
        "processes": trainer.args.world_size,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_dev_selection_score": trainer.state.best_metric,  # see train_arguments.select_by
        "library_versions": {p: version(p) for p in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
    }
    metrics = {
        "before_training": baseline, "after_training": dev, "decision_probe": probe.details if probe else None,
        "log_history": trainer.state.log_history,
    }
    (output_dir / "training_args.json").write_text(json.dumps(run_info, indent=2, default=str))
    (output_dir / "dev_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_model_card(output_dir, run_info, baseline, dev, calibration, probe=probe)
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
