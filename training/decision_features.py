"""Reading labelled questions off a model for its decision probe and offsets, and loading an adapter to refit them:
what the end of training (``adapter_files.py``) and the refit commands (``decision_probe.py``, ``calibrate.py``)
share. The fitting itself is ``pubmedqa/decisions/fitting.py``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pubmedqa.config import ModelSettings
from pubmedqa.data import PubMedQARecord
from pubmedqa.decisions.calibration import DecisionCalibration
from pubmedqa.decisions.fitting import DEFAULT_POOLING, ProbeFitError, fit_probe
from pubmedqa.decisions.options import single_token_options
from pubmedqa.decisions.probe import DecisionProbe
from pubmedqa.engines.base import Engine, LoadedModel
from pubmedqa.engines.factory import create_engine
from pubmedqa.engines.transformers_passes import option_scores
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import fit_prompt


def collect_features(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, batch_size: int = 8) -> np.ndarray:
    """Each prompt's probe features at ``layer`` (prompts x 2 hidden size, ``[mean | last]``), read as the app reads
    them."""
    was_training = model.training
    model.eval()
    try:
        _, features = option_scores(model, tokenizer, prompts, batch_size, feature_layer=layer, desc="decision probe: features")
    finally:
        if was_training:
            model.train()
    return features.numpy().astype(np.float64)


def labelled_prompts(records: Sequence[PubMedQARecord], tokenizer: Any, budget: int) -> tuple[list[str], list[str]]:
    """The questions' prompts fitted to ``budget`` tokens, and their gold decisions: what a probe is fitted on."""
    return [fit_prompt(r.prompt_input(), tokenizer, budget).text for r in records], [r.final_decision for r in records]


def fit_for_model(
    model: Any, tokenizer: Any, questions: tuple[list[str], list[str]], layer: int, fitted_on: str,
    calibrate: bool = True, batch_size: int = 8, pooling: str = DEFAULT_POOLING,
) -> tuple[DecisionProbe, DecisionCalibration | None]:
    """Fit the probe of a PEFT model on these (prompt, gold decision) pairs, on the features of ``layer`` (the
    adapter folder's recorded probe layer). With ``calibrate``, also returns the out-of-fold offsets, saved by the
    caller next to the probe."""
    if single_token_options(tokenizer) is None:
        raise ProbeFitError("a decision probe needs answer options of one token each in this tokenizer")
    prompts, gold = questions
    features = collect_features(model, tokenizer, prompts, layer, batch_size)
    return fit_probe(features, gold, layer, fitted_on, calibrate, pooling)


def local_adapter_dir(model_settings: ModelSettings, what: str) -> Path:
    """The --adapter folder a command writes its ``what`` into, or a ValueError saying it must be one."""
    if not model_settings.adapter_source or not Path(model_settings.adapter_source).expanduser().is_dir():
        raise ValueError(f"--adapter must be a local adapter folder (the {what} is written into it)")
    return Path(model_settings.adapter_source).expanduser()


def load_adapter_to_fit(
    model_settings: ModelSettings, what: str, engine_factory: Callable[[ModelSettings], Engine] = create_engine
) -> tuple[Engine, LoadedModel]:
    """Load a local adapter folder as the app does (same quantization) for a command that writes its ``what`` into
    it, with a clear error where that cannot work."""
    local_adapter_dir(model_settings, what)
    engine = engine_factory(model_settings)
    loaded = engine.load()
    if not loaded.adapter_loaded:
        raise ModelLoadError(f"No {what} can be fitted: {engine.adapter_unavailable_reason()}")
    return engine, loaded
