"""The evaluation run folder: a versioned ``results.json``, official-format predictions and per-example lines.

Schema (``schema_version`` 1)::

    results.json  {"schema_version": 1,
                   "run": {models, adapter, dataset source, split, n, settings, decision_calibration, decision_probe,
                           library versions, timings, errors},
                   "models": {"base" | "tuned": {accuracy, macro_f1, per_class, confusion_matrix, predicted_counts,
                                                  uncalibrated (tuned, when the adapter ships a calibration):
                                                      {accuracy, macro_f1, predicted_counts},
                                                  token_f1, bleu, rouge1, rougeL,
                                                  bertscore: {model, precision, recall, f1},
                                                  judge: {enabled, mean, distribution, graded, failures}}}}
    predictions_base.json / predictions_tuned.json   {pmid: "yes" | "no" | "maybe"}  (the official format)
    examples.jsonl   one object per question: id, question, reference, gold, and per model its decision,
                     option probabilities, long answer and per-example scores

Accuracy, macro-F1 and per-class scores are fractions (0-1); text metrics are on a 0-100 scale.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pubmedqa import variants

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
EXAMPLES_FILE = "examples.jsonl"


class ResultsError(ValueError):
    """A results folder is missing, malformed or of another schema version."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a crash never leaves a half-written file in place of a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def write_predictions(run_dir: Path, variant_key: str, predictions: dict[str, str]) -> Path:
    path = run_dir / f"predictions_{variant_key}.json"
    write_json_atomic(path, predictions)
    return path


def write_examples(run_dir: Path, examples: list[dict[str, Any]]) -> None:
    path = run_dir / EXAMPLES_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=run_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass
class RunResults:
    path: Path
    results: dict[str, Any]
    examples: list[dict[str, Any]]

    @property
    def model_keys(self) -> list[str]:
        return [key for key in (variants.BASE_KEY, variants.TUNED_KEY) if key in self.results["models"]]


def load_results(run_dir: str | Path) -> RunResults:
    """Read and check a run folder; ResultsError says what is wrong in one line."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    # Files are named relative to the run folder: the app shows these messages on a public page.
    name, examples_name = f"{run_dir.name}/{RESULTS_FILE}", f"{run_dir.name}/{EXAMPLES_FILE}"
    if not path.is_file():
        raise ResultsError(f"no {RESULTS_FILE} in {run_dir.name}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(results, dict) or results.get("schema_version") != SCHEMA_VERSION:
        found = results.get("schema_version") if isinstance(results, dict) else None
        raise ResultsError(f"{name} has schema version {found!r}; this app reads version {SCHEMA_VERSION}")
    models = results.get("models")
    if not isinstance(models, dict) or not models or any(not isinstance(m, dict) or "accuracy" not in m for m in models.values()):
        raise ResultsError(f"{name} has no per-model metrics")
    examples: list[dict[str, Any]] = []
    examples_path = run_dir / EXAMPLES_FILE
    if examples_path.is_file():
        for number, line in enumerate(examples_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ResultsError(f"{examples_name}, line {number}, is not valid JSON") from None
    return RunResults(run_dir, results, examples)
