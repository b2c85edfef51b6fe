"""Fit an adapter's decision calibration on the dev questions and save it next to the adapter.

    python -m training.calibrate --adapter outputs/adapter        # writes outputs/adapter/decision_calibration.json

``python -m training.train`` does this at the end of training; this command (re)fits an existing adapter, e.g.
after changing how the app loads the base (quantization moves the option likelihoods a little). Only the dev split
is used — the offsets never see a test question.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pubmedqa.adapter import PROBE_FILE
from pubmedqa.backends.base import LoadedModel, ModelBackend, Variant
from pubmedqa.backends.factory import create_backend
from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.data import DataFormatError, SplitSettings
from pubmedqa.decisions.fitting import fit_calibration
from pubmedqa.evaluation.runner import in_batches
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import fit_prompt

logger = logging.getLogger("training.calibrate")

@dataclass
class CalibrateArguments(SplitSettings):
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass."})


def local_adapter_dir(model_settings: ModelSettings, what: str) -> Path:
    """The --adapter folder a command writes its ``what`` into, or a ValueError saying it must be one."""
    if not model_settings.adapter_source or not Path(model_settings.adapter_source).expanduser().is_dir():
        raise ValueError(f"--adapter must be a local adapter folder (the {what} is written into it)")
    return Path(model_settings.adapter_source).expanduser()


def load_adapter_to_fit(
    model_settings: ModelSettings, what: str, backend_factory: Callable[[ModelSettings], ModelBackend] = create_backend
) -> tuple[ModelBackend, LoadedModel]:
    """Load a local adapter folder as the app does (same quantization) for a command that writes its ``what`` into
    it, with a clear error where that cannot work."""
    local_adapter_dir(model_settings, what)
    backend = backend_factory(model_settings)
    loaded = backend.load()
    if not loaded.adapter_loaded:
        raise ModelLoadError(f"No {what} can be fitted: {backend.adapter_unavailable_reason()}")
    return backend, loaded


def calibrate_adapter(model_settings: ModelSettings, args: CalibrateArguments) -> Path:
    split = args.load_split()
    backend, loaded = load_adapter_to_fit(model_settings, "calibration")
    if loaded.policy.probe is not None:
        raise ValueError(
            f"{model_settings.adapter_source} decides with its decision probe: refit the probe and its offsets (out of "
            f"fold, on 500 questions) with `python -m training.decision_probe --adapter {model_settings.adapter_source}`; "
            f"for a server's own logits, calibrate a copy without {PROBE_FILE}"
        )
    # Dev only: on training questions the adapter is over-confident, and offsets fitted there over-correct (tried:
    # fitted on train + dev, test accuracy fell from 55.4 % to 49.2 %).
    questions = split.dev
    prompts = [fit_prompt(r.prompt_input(), loaded.tokenizer, backend.prompt_budget(1)) for r in questions]
    probabilities = in_batches(
        prompts, args.batch_size,
        lambda batch: loaded.policy.without_offsets(
            backend.score_decisions(batch, [Variant.TUNED] * len(batch), len(batch))
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
