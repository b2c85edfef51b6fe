"""Fit the decision probe of an adapter (see ``pubmedqa/decisions/probe.py``) and the decision calibration that goes with it.

    python -m scripts.decision_probe --adapter outputs/adapter                        # the app's engine
    python -m scripts.decision_probe --adapter outputs/adapter --engine transformers  # decision_probe.safetensors

``python -m scripts.train`` does this at the end of training, on the training engine (transformers); this command
refits an existing adapter on the features of the engine and precision that serve it, since each engine's weights
move the hidden states a little. On llama.cpp (the default on a CPU for the embedded GGUF) the pair is written as
``decision_probe.llama-cpp.safetensors`` and ``decision_calibration.llama-cpp.json``, which that engine prefers to
the shared files (``pubmedqa/decisions/policy_files.py``).

The probe is a multinomial logistic regression (scikit-learn, L2 on standardised features) on the hidden states of
each prompt at the probe's layer — their mean over the prompt, then the prompt's last token's (``--pooling``) — the
first layer the adapter trains, so the features are the base model's and no training label has shaped them. That
makes cross-validation honest on all 500 non-test questions (train and dev; the test questions are never read): the
L2 strength is chosen by the out-of-fold pairwise AUC, and the decision offsets are fitted on the out-of-fold scores
— 500 questions rather than the 50 dev ones, whose offsets over-corrected — so that each decision is predicted about
as often as it is the gold one, the best (accuracy + macro-F1) / 2 breaking ties (``--offsets shares``; ``score``
takes the best objective alone). The final probe is then fitted on all of them.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from pubmedqa.adapter import CALIBRATION_FILE
from pubmedqa.adapter_metadata import AdapterMetadata, AdapterMetadataError
from pubmedqa.config import ModelSettings, parse_settings
from pubmedqa.data import DataFormatError, PubMedQARecord, SplitSettings
from pubmedqa.decisions.fitting import DEFAULT_OFFSETS, DEFAULT_POOLING, OFFSET_OBJECTIVES, ProbeFitError, fit_probe
from pubmedqa.decisions.options import single_token_options
from pubmedqa.decisions.policy_files import engine_file
from pubmedqa.decisions.probe import POOLINGS, DecisionProbe
from pubmedqa.engines.factory import resolve_engine
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import encode_prompt
from training.decision_features import collect_features, labelled_prompts, load_adapter_to_fit, local_adapter_dir

logger = logging.getLogger("scripts.decision_probe")

@dataclass
class ProbeArguments(SplitSettings):
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass."})
    calibrate: bool = field(
        default=True, metadata={"help": "Also fit the decision offsets (out of fold); --no_calibrate removes them."}
    )
    pooling: str = field(
        default=DEFAULT_POOLING,
        metadata={"help": "What the probe reads of its layer over the prompt.", "choices": list(POOLINGS)},
    )
    offsets: str = field(
        default=DEFAULT_OFFSETS,
        metadata={
            "help": "How the decision offsets are chosen: 'score' = best (accuracy + macro-F1) / 2 out of fold; "
            "'shares' = predicted decisions closest to the gold decisions' counts, then the best score.",
            "choices": list(OFFSET_OBJECTIVES),
        },
    )


def collect_llama_features(
    model_settings: ModelSettings, records: Sequence[PubMedQARecord], layer: int, budget: int
) -> tuple[np.ndarray, list[str], str]:
    """The probe's features of each question (``[mean | last]``) as the llama.cpp engine reads them during the prompt's
    decode (the base model's: the adapter trains no layer below the probe), their gold decisions, and the weights'
    description."""
    import llama_cpp  # noqa: F401 - a clear ImportError before anything loads

    from pubmedqa.engines.llama_cpp_engine import GgufTokenizer, file_type
    from pubmedqa.engines.llama_cpp_features import open_llama, prompt_features
    from pubmedqa.gguf.source import gguf_file

    llm, reader = open_llama(str(gguf_file(model_settings.base_model, model_settings.cache_dir)), budget + 16, os.cpu_count(), layer)
    try:
        tokenizer = GgufTokenizer(llm)
        if single_token_options(tokenizer) is None:
            raise ProbeFitError("a decision probe needs answer options of one token each in this tokenizer")
        prompts, gold = labelled_prompts(records, tokenizer, budget)
        rows = [
            prompt_features(llm, reader, encode_prompt(prompt, tokenizer)).numpy()[0]
            for prompt in tqdm(prompts, desc="decision probe: llama.cpp features", unit="question")
        ]
        return np.stack(rows).astype(np.float64), gold, f"{file_type(llm)} GGUF, llama.cpp"
    finally:
        llm.close()


@dataclass
class EngineFeatures:
    """The probe's features of the train + dev questions on the engine that serves an adapter."""

    adapter_dir: Path
    engine: str
    layer: int
    features: np.ndarray  # questions x 2 hidden size, [mean | last]
    gold: list[str]
    fitted_on: str


def engine_features(model_settings: ModelSettings, args: ProbeArguments) -> EngineFeatures:
    """Read the features of train + dev on the engine the app serves the adapter with (same weights); the test
    questions are never read."""
    if model_settings.engine == "openai":
        raise ProbeFitError(
            "--engine openai: a remote server returns no hidden states, so the probe is fitted on an engine in this "
            "process: --engine llama.cpp or transformers (the one the app serves the adapter with; auto picks it)"
        )
    adapter_dir = local_adapter_dir(model_settings, "decision probe")
    metadata = AdapterMetadata.load(adapter_dir)
    if metadata.probe_layer is None:
        raise ProbeFitError(
            "the adapter trains every decoder layer, so no layer keeps the base model's hidden states for a probe: "
            "train it with `python -m scripts.train --probe_depth 0.55` (the default)"
        )
    split = args.load_split()
    records = [*split.train, *split.dev]
    engine, note = resolve_engine(model_settings)
    if note:
        logger.warning("%s", note)
    if engine == "llama.cpp":
        features, gold, weights = collect_llama_features(model_settings, records, metadata.probe_layer, metadata.prompt_budget)
    else:
        _, loaded = load_adapter_to_fit(model_settings, "decision probe", TransformersEngine)
        prompts, gold = labelled_prompts(records, loaded.tokenizer, metadata.prompt_budget)
        features = collect_features(loaded.model, loaded.tokenizer, prompts, metadata.probe_layer, args.batch_size)
        weights = loaded.quantization
    fitted_on = f"train + dev ({len(records)} questions, {weights})"
    return EngineFeatures(adapter_dir, engine, metadata.probe_layer, features, gold, fitted_on)


def fit_probe_for_adapter(model_settings: ModelSettings, args: ProbeArguments) -> DecisionProbe:
    """The CLI: fit on the serving engine's features (:func:`engine_features`) and save next to the adapter, under
    that engine's names when it is not the training engine (``policy_files.py``)."""
    read = engine_features(model_settings, args)
    adapter_dir, engine = read.adapter_dir, read.engine
    probe, calibration = fit_probe(
        read.features, read.gold, read.layer, read.fitted_on, args.calibrate, args.pooling, args.offsets
    )
    path = probe.save(adapter_dir, engine)
    if calibration is not None:
        calibration.save(adapter_dir, engine)
    else:
        (adapter_dir / engine_file(CALIBRATION_FILE, engine)).unlink(missing_ok=True)  # it was fitted for other scores
    logger.info("Wrote %s", path)
    return probe


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = parse_settings([ModelSettings, ProbeArguments], argv)
        fit_probe_for_adapter(model_settings, args)
    except (AdapterMetadataError, DataFormatError, ModelLoadError, ProbeFitError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("Decision probe written to %s; rewrite its card with `python -m scripts.model_card %s`",
                model_settings.adapter_source, model_settings.adapter_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
