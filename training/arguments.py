"""The fine-tuning script's own settings (``python -m scripts.train --help``): data split, LoRA, optimisation,
checkpoint selection and the decision policy fitted after training. Every step of the script reads them from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from pubmedqa.data import SplitSettings
from pubmedqa.prompts import ANSWER_TARGETS


@dataclass
class TrainArguments(SplitSettings):
    output_dir: str = field(default="outputs/adapter", metadata={"help": "Where the adapter and its card are written."})
    train_base_model: str = field(
        default="",
        metadata={
            "help": "When --base_model is a GGUF file (a .gguf path or a Hub GGUF; not 'embedded'): the transformers "
            "model (Hub id or folder) whose weights the GGUF holds, which LoRA trains on. Default: what the GGUF says "
            "it was converted from (general.source.repo_url, or a base-model entry of its own name, or its Hub repo "
            "card's base_model); an error names this flag when it says nothing usable."
        },
    )
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
    answer_target: str = field(
        default="first_sentence",
        metadata={
            "help": "What the answer after the decision is tuned to be: 'first_sentence' of the abstract's conclusion "
            "(short answers that end; chosen on dev, see docs/results.md, 'Readable answers') or the whole 'conclusion'.",
            "choices": list(ANSWER_TARGETS),
        },
    )
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
            "features that no training label has shaped (see scripts/decision_probe.py). 0: LoRA on every layer, "
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
