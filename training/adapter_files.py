"""What the adapter folder holds besides the run's record: the LoRA weights (of the best checkpoint), the metadata that
serving and refitting read back, and the decision probe and calibration fitted on the trained adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pubmedqa.adapter_metadata import AdapterMetadata
from pubmedqa.config import BaseModelSettings, ModelSettings
from pubmedqa.data import PubMedQARecord
from pubmedqa.decisions.calibration import DecisionCalibration
from pubmedqa.decisions.fitting import ProbeFitError, fit_calibration
from pubmedqa.decisions.probe import DecisionProbe
from pubmedqa.evaluation.metrics import probability_metrics
from pubmedqa.model_loading import BaseModel
from training.arguments import TrainArguments
from training.decision_features import fit_for_model, labelled_prompts
from training.lora import first_lora_layer
from training.trainer import dev_probabilities, dev_summary

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger("scripts.train")  # every step of the script logs under the script's name


@dataclass(frozen=True)
class Decisions:
    """How the saved adapter decides: its own dev scores, and the probe and calibration shipped with it."""

    dev: dict[str, Any]
    probe: DecisionProbe | None
    calibration: DecisionCalibration | None


def canonical_base(model_settings: BaseModelSettings, loaded_source: str) -> str:
    # The embedded checkpoint lives in a local cache folder; the model it is a quantisation of is on the Hub.
    return "google/gemma-3-270m" if model_settings.base_model == "embedded" else loaded_source


def save_adapter(
    trainer: Any, base: BaseModel, model_settings: BaseModelSettings, lora: LoraConfig, output_dir: Path
) -> AdapterMetadata:
    """Save the adapter the trainer holds and the metadata that goes with it; returns that metadata."""
    # load_best_model_at_end has put the best checkpoint's adapter back; save it as the output.
    trainer.model.peft_config["default"].base_model_name_or_path = canonical_base(model_settings, base.source)
    trainer.model.save_pretrained(str(output_dir))  # the adapter only; checkpoints stay in checkpoint-*/
    if base.tokenizer_changed:
        base.tokenizer.save_pretrained(str(output_dir))
    # What serving and refitting read back: the probe's layer (the first layer LoRA trains) and prompt budget.
    metadata = AdapterMetadata(first_lora_layer(lora), ModelSettings.max_input_tokens, base.quantization)
    metadata.save(output_dir)
    return metadata


def fit_decisions(
    trainer: Any,
    base: BaseModel,
    args: TrainArguments,
    labelled: Sequence[PubMedQARecord],
    metadata: AdapterMetadata,
    output_dir: Path,
) -> Decisions:
    """Score dev with the saved adapter, then fit and save the decision probe (at ``metadata``'s layer and prompt
    budget, on the ``labelled`` non-test questions) and the calibration, as --decision_probe and --calibrate ask."""
    tokenizer = base.tokenizer
    probabilities = dev_probabilities(trainer.model, tokenizer, trainer.dev_prompts)
    dev = probability_metrics(probabilities, trainer.dev_gold)
    logger.info("Dev after training (best checkpoint): %s", dev_summary(dev))
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
                labelled_prompts(labelled, tokenizer, metadata.prompt_budget), metadata.probe_layer,
                f"train + dev ({len(labelled)} questions, {base.quantization})",
                calibrate=args.calibrate,
            )
            probe.save(output_dir)
        except ProbeFitError as exc:  # the trained adapter is kept, without a probe
            logger.warning("No decision probe: %s", exc)
    if args.calibrate and calibration is None:
        calibration = fit_calibration(probabilities, trainer.dev_gold, fitted_on)
    if calibration is not None:
        calibration.save(output_dir)
    return Decisions(dev, probe, calibration)
