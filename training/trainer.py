"""The trainer: TRL's SFTTrainer with this project's loss (answer tokens only, the decision weighted), evaluation on
dev by yes/no/maybe scores (which choose the checkpoint kept), Ctrl-C that checkpoints, and the settings both training
phases share."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

from pubmedqa.engines.transformers_passes import score_options
from pubmedqa.evaluation.metrics import probability_metrics
from training.arguments import TrainArguments
from training.sft_data import PQALExamples, balanced_class_weights, sft_dataset

logger = logging.getLogger("scripts.train")  # every step of the script logs under the script's name


def dev_probabilities(model: Any, tokenizer: Any, prompts: list[str]) -> list[dict[str, float]]:
    """Option probabilities of the dev prompts, scored in eval mode (no dropout) whatever mode training left."""
    was_training = model.training
    model.eval()
    probabilities = score_options(model, tokenizer, prompts)
    if was_training:
        model.train()
    return probabilities


def dev_decision_metrics(model: Any, tokenizer: Any, prompts: list[str], gold: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and pairwise AUC of the option scores against the gold decisions."""
    return probability_metrics(dev_probabilities(model, tokenizer, prompts), gold)


def dev_summary(metrics: dict[str, Any]) -> str:
    """The dev scores as one log line."""
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


def make_trainer_class() -> type:
    """The trainer class, built on first use: TRL is imported only when a run trains."""
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


def sft_config(args: TrainArguments, output_dir: Path, **phase: Any) -> Any:
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


def train_interruptibly(trainer: Any, resume: bool) -> Any:
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


def build_trainer(
    model: Any,
    tokenizer: Any,
    config: Any,
    peft_config: Any,
    train_examples: list[dict[str, str]],
    *,
    decision_weight: float,
    eval_examples: list[dict[str, str]] | None = None,
    dev_gold: list[str] | None = None,
    class_weights: dict[int, float] | None = None,
    select_by: str = "accuracy_f1",
) -> Any:
    """A PubMedQATrainer on these pairs; ``peft_config`` None continues the adapter the model already carries."""
    return make_trainer_class()(
        model=model,
        args=config,
        train_dataset=sft_dataset(train_examples),
        eval_dataset=None if eval_examples is None else sft_dataset(eval_examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        dev_prompts=[e["prompt"] for e in eval_examples or []],
        dev_gold=dev_gold or [],  # aligned with dev_prompts
        decision_weight=decision_weight,
        class_weights=class_weights,
        select_by=select_by,
    )


def pqa_l_trainer(
    model: Any, tokenizer: Any, peft_config: Any, args: TrainArguments, output_dir: Path, examples: PQALExamples
) -> Any:
    """The PQA-L phase's trainer: dev every --eval_steps and at the last step, the best checkpoint (--select_by)
    reloaded at the end."""
    config = sft_config(
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
    trainer = build_trainer(
        model, tokenizer, config, peft_config, examples.train,
        decision_weight=args.decision_loss_weight,
        eval_examples=examples.dev,
        dev_gold=examples.dev_gold,
        class_weights=balanced_class_weights(examples.train_records, tokenizer) if args.balance_decisions else None,
        select_by=args.select_by,
    )
    trainer.add_callback(EvaluateAtEnd())
    return trainer
