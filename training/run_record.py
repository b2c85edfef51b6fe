"""The run's record in the adapter folder: training_args.json (settings, data, split fingerprints, library versions),
dev_metrics.json (dev before and after, the probe's cross-validation, the log history) and the model card."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any, Sequence

from pubmedqa.config import BaseModelSettings
from pubmedqa.data import PubMedQARecord, Split
from pubmedqa.model_loading import BaseModel
from training.adapter_files import Decisions, canonical_base
from training.arguments import TrainArguments
from training.lora import is_qlora
from training.model_card import write_model_card


def ids_hash(records: Sequence[PubMedQARecord]) -> str:
    """A fingerprint of the question ids, to check a split without listing it."""
    return hashlib.sha256(",".join(sorted(r.pubid for r in records)).encode()).hexdigest()[:16]


def run_info(
    model_settings: BaseModelSettings,
    args: TrainArguments,
    base: BaseModel,
    split: Split,
    train_records: Sequence[PubMedQARecord],
    pqa_a: dict[str, Any] | None,
    trainer: Any,
    result: Any,
) -> dict[str, Any]:
    """What training_args.json and the model card say about the run: enough to reproduce it and to check that the
    test questions stayed out."""
    return {
        "base_model": model_settings.base_model,
        "base_model_canonical": canonical_base(model_settings, base.source),
        "base_description": base.description,
        "quantization": base.quantization,
        "method": "QLoRA" if is_qlora(base) else "LoRA",
        "model_settings": asdict(model_settings),
        "train_arguments": {k: v for k, v in asdict(args).items()},
        "data_source": "hub:qiaojin/PubMedQA (pqa_labeled)" if not Path(args.data).is_dir() else "local PQA-L files",
        "pqa_a_phase": pqa_a,
        "split": {
            "train": len(train_records),
            "dev": len(split.dev),
            "test_excluded": len(split.test),
            "train_ids_sha256_16": ids_hash(train_records),
            "dev_ids": [r.pubid for r in split.dev],
            "test_ids_sha256_16": ids_hash(split.test),
        },
        "train_result": {"global_step": result.global_step, "training_loss": result.training_loss, **result.metrics},
        "processes": trainer.args.world_size,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_dev_selection_score": trainer.state.best_metric,  # see train_arguments.select_by
        "library_versions": {p: version(p) for p in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
    }


def write_run_record(
    output_dir: Path, info: dict[str, Any], baseline: dict[str, Any], decisions: Decisions, log_history: list[Any]
) -> None:
    """training_args.json, dev_metrics.json and the model card (README.md)."""
    metrics = {
        "before_training": baseline, "after_training": decisions.dev,
        "decision_probe": decisions.probe.details if decisions.probe else None, "log_history": log_history,
    }
    (output_dir / "training_args.json").write_text(json.dumps(info, indent=2, default=str))
    (output_dir / "dev_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_model_card(output_dir, info, baseline, decisions.dev, decisions.calibration, probe=decisions.probe)
