"""Evaluate the base model and the fine-tuned one (same base, adapter on/off through the backend) on the official
PubMedQA test set, and write a run folder (see :mod:`pubmedqa.evaluation.results`).

    python -m training.evaluate                          # all 500 test questions, shipped adapter
    python -m training.evaluate --limit 100 --output_dir outputs/eval-100
    python -m training.evaluate --judge_base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-7B-Instruct

Decisions are scored by option likelihood (batched, ``logits_to_keep=1``); long answers by batched greedy
generation; then Token-F1, BLEU, ROUGE-1/L, BERTScore and, when configured, an LLM judge.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from pubmedqa.backends.base import GenerationSettings, ModelBackend, Variant
from pubmedqa.backends.factory import create_backend
from pubmedqa.config import PROJECT_ROOT, ModelSettings
from pubmedqa.data import PubMedQARecord, load_records, load_test_ids, stratified_sample
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.decisions.policy import DecisionPolicy
from pubmedqa.evaluation.bertscore import DEFAULT_LAYERS, DEFAULT_MODEL, bertscore
from pubmedqa.evaluation.judge import Judge, summarize_grades
from pubmedqa.evaluation.metrics import decision_metrics, text_metrics
from pubmedqa.evaluation.results import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    write_examples,
    write_json_atomic,
    write_predictions,
)
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import FittedPrompt, fit_prompt

logger = logging.getLogger(__name__)

VARIANT_KEYS = {Variant.BASE: "base", Variant.TUNED: "tuned"}
Progress = Callable[[float, str], None]
T = TypeVar("T")


@dataclass
class EvalArguments:
    data: str = field(
        default=str(PROJECT_ROOT.parent / "shared" / "data" / "pubmedqa"),
        metadata={"help": "Folder with ori_pqal.json + test_ground_truth.json, or 'hub' for qiaojin/PubMedQA."},
    )
    limit: int = field(
        default=0, metadata={"help": "Evaluate a label-stratified sample of N test questions (0 = all 500)."}
    )
    sample_seed: int = field(default=0, metadata={"help": "Seed of the stratified sample (with --limit)."})
    output_dir: str = field(default="", metadata={"help": "Run folder (default: outputs/eval/<UTC time>)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass / generate call."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated long answer."})
    long_answers: bool = field(
        default=True, metadata={"help": "Generate long answers and score them (--no_long_answers: decisions only)."}
    )
    bertscore_model: str = field(
        default=DEFAULT_MODEL, metadata={"help": "BERTScore model: the offline default, a Hub id or a folder; 'none' skips."}
    )
    bertscore_num_layers: int = field(default=DEFAULT_LAYERS, metadata={"help": "Layer of the BERTScore model to use."})
    judge_base_url: str = field(
        default="", metadata={"help": "OpenAI-compatible endpoint of the LLM judge (off when empty)."}
    )
    judge_model: str = field(default="", metadata={"help": "Model name to ask at the judge endpoint."})
    judge_api_key_env: str = field(
        default="JUDGE_API_KEY", metadata={"help": "Environment variable holding the judge's API key (never logged)."}
    )
    judge_timeout: float = field(default=60.0, metadata={"help": "Seconds before a judge request counts as failed."})


def select_questions(records: dict[str, PubMedQARecord], args: EvalArguments) -> list[PubMedQARecord]:
    test = [records[pubid] for pubid in load_test_ids(args.data if Path(args.data).is_dir() else None)]
    if not 0 <= args.limit <= len(test):
        raise ValueError(f"--limit must be between 1 and {len(test)} (0 = all), got {args.limit}")
    # The ground-truth file is sorted by label: a sample must be stratified, never the first N.
    return stratified_sample(test, args.limit, args.sample_seed) if args.limit else test


def length_batches(prompts: Sequence[FittedPrompt], size: int) -> list[list[int]]:
    """Indices of ``prompts`` in batches of similar token length (longest first), so a batch pads little and an
    out-of-memory error, if any, comes at once rather than at the end."""
    order = sorted(range(len(prompts)), key=lambda i: -prompts[i].n_tokens)
    return [order[i : i + size] for i in range(0, len(order), size)]


def in_batches(
    prompts: Sequence[FittedPrompt], size: int, run: Callable[[list[FittedPrompt]], list[T]], desc: str,
    progress: Callable[[float], None] = lambda fraction: None,
) -> list[T]:
    """``run`` over length-sorted batches of ``prompts``, with a progress bar; results back in the prompts' order."""
    results: list[Any] = [None] * len(prompts)
    batches = length_batches(prompts, size)
    done = 0
    for batch in tqdm(batches, desc=desc):
        for index, result in zip(batch, run([prompts[i] for i in batch])):
            results[index] = result
        done += len(batch)
        progress(done / len(prompts))
    return results


def evaluate(
    model_settings: ModelSettings,
    args: EvalArguments,
    progress: Progress | None = None,
    backend: ModelBackend | None = None,
) -> Path:
    """Run the evaluation and return the run folder. ``progress(fraction, message)`` is called as work advances;
    pass the app's ``backend`` to evaluate through the already loaded model instead of loading a second copy."""
    started = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    run_dir = Path(args.output_dir or f"outputs/eval/{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    questions = select_questions(load_records(args.data), args)
    judge = _make_judge(args)

    backend = backend or create_backend(model_settings)
    loaded = backend.load()
    variants = [Variant.BASE]
    if model_settings.adapter_source:
        if not loaded.adapter_loaded:
            raise ModelLoadError(f"The adapter cannot be evaluated: {backend.adapter_unavailable_reason()}")
        variants.append(Variant.TUNED)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    budget = backend.prompt_budget(args.max_new_tokens)
    prompts: list[FittedPrompt] = [fit_prompt(r.prompt_input(), loaded.tokenizer, budget) for r in questions]
    timings: dict[str, float] = {}
    errors: list[str] = []
    gold = [r.final_decision for r in questions]
    per_model: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}

    for step, variant in enumerate(variants):
        key = VARIANT_KEYS[variant]
        t0 = time.perf_counter()
        def run(batch: list[FittedPrompt], v: Variant = variant) -> list[tuple[str, dict[str, float]]]:
            if args.long_answers:  # one pass per batch: the decision comes from the generation's first step
                answers, scores = backend.generate_with_decisions(batch, [v] * len(batch), settings, calibrated=False)
                return list(zip(answers, scores))
            return [("", s) for s in backend.score_decisions(batch, [v] * len(batch), len(batch), calibrated=False)]

        task = "decisions and answers" if args.long_answers else "decisions"
        message = f"{key}: {task}"
        rows = in_batches(
            prompts, args.batch_size, run, message, lambda f, d=step, m=message: report((d + f) / len(variants), m)
        )
        answers, probabilities = [a for a, _ in rows], [p for _, p in rows]
        timings[f"{key}_{task.replace(' ', '_')}_s"] = time.perf_counter() - t0
        raw_metrics = None
        if variant is Variant.TUNED and loaded.policy.calibration is not None:
            raw_metrics = decision_metrics(gold, [predicted_decision(p) for p in probabilities])
            probabilities = loaded.policy.calibrated(probabilities, [True] * len(probabilities))
        decisions = [predicted_decision(p) for p in probabilities]
        write_predictions(run_dir, key, {r.pubid: d for r, d in zip(questions, decisions)})
        per_model[key] = decision_metrics(gold, decisions)
        if raw_metrics is not None:  # what the adapter scores without its dev-fitted offsets
            per_model[key]["uncalibrated"] = {k: raw_metrics[k] for k in ("accuracy", "macro_f1", "predicted_counts")}
        outputs[key] = {"decision": decisions, "probabilities": probabilities}
        if args.long_answers:
            outputs[key]["answer"] = answers
            _score_answers(key, answers, questions, args, judge, per_model, outputs, timings, errors, model_settings.cache_dir)

    examples = _examples(questions, variants, outputs)
    write_examples(run_dir, examples)
    timings["total_s"] = time.perf_counter() - started
    results = {
        "schema_version": SCHEMA_VERSION,
        "run": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": model_settings.base_model,
            "base_description": loaded.description,
            "quantization": loaded.quantization,
            "adapter": model_settings.adapter_source,
            "dataset": "local PQA-L files" if Path(args.data).is_dir() else "hub:qiaojin/PubMedQA (pqa_labeled)",
            "split": "official test set" + (f", stratified sample (seed {args.sample_seed})" if args.limit else ""),
            "n": len(questions),
            "decision_method": "option likelihood: softmax over the log-likelihoods of yes/no/maybe after the prompt",
            **(loaded.policy if Variant.TUNED in variants else DecisionPolicy()).record(),
            "settings": {k: v for k, v in asdict(args).items() if k not in ("judge_api_key_env",)},
            "bertscore_model": args.bertscore_model if args.long_answers else None,
            "judge": {"model": args.judge_model, "base_url": args.judge_base_url} if judge else "not run (no --judge_base_url)",
            "library_versions": {p: version(p) for p in ("torch", "transformers", "peft", "sacrebleu", "rouge-score", "bert-score")},
            "timings": timings,
            "errors": errors,
        },
        "models": per_model,
    }
    write_json_atomic(run_dir / RESULTS_FILE, results)
    report(1.0, "done")
    logger.info("Results written to %s (%.0f s)", run_dir, timings["total_s"])
    for key, metrics in per_model.items():
        logger.info("%s: accuracy %.3f, macro-F1 %.3f%s", key, metrics["accuracy"], metrics["macro_f1"],
                    f", Token-F1 {metrics['token_f1']:.1f}, ROUGE-L {metrics['rougeL']:.1f}" if "token_f1" in metrics else "")
    return run_dir


def _make_judge(args: EvalArguments) -> Judge | None:
    if not args.judge_base_url:
        return None
    if not args.judge_model:
        raise ValueError("--judge_model is required with --judge_base_url")
    return Judge(args.judge_base_url, args.judge_model, os.environ.get(args.judge_api_key_env), args.judge_timeout)


def _score_answers(key, answers, questions, args, judge, per_model, outputs, timings, errors, cache_dir) -> None:
    """Long-answer metrics for one model; a metric that fails is recorded in ``errors``, the others still count."""
    references = [r.long_answer for r in questions]
    text = text_metrics(answers, references)
    per_model[key].update({k: text[k] for k in ("token_f1", "bleu", "rouge1", "rougeL")})
    outputs[key]["scores"] = text["per_example"]
    if args.bertscore_model.lower() != "none":
        t0 = time.perf_counter()
        try:
            scores = bertscore(answers, references, args.bertscore_model, args.bertscore_num_layers, cache_dir)
            per_model[key]["bertscore"] = {k: scores[k] for k in ("model", "num_layers", "precision", "recall", "f1")}
            for row, value in zip(outputs[key]["scores"], scores["per_example_f1"]):
                row["bertscore_f1"] = value
        except Exception as exc:  # a missing or broken BERTScore model must not cost the other metrics
            errors.append(f"{key}: BERTScore failed ({type(exc).__name__}: {exc})")
            logger.error("%s", errors[-1])
        timings[f"{key}_bertscore_s"] = time.perf_counter() - t0
    if judge is None:
        per_model[key]["judge"] = {"enabled": False, "note": "LLM judge not run (pass --judge_base_url)"}
        return
    t0 = time.perf_counter()
    grades = [judge.grade(r.question, r.long_answer, a) for r, a in tqdm(list(zip(questions, answers)), desc=f"{key}: judge")]
    per_model[key]["judge"] = {"model": judge.model, **summarize_grades(grades)}
    for row, grade in zip(outputs[key]["scores"], grades):
        row["judge"] = grade.score
        row["judge_reason"] = grade.reason or grade.error
    timings[f"{key}_judge_s"] = time.perf_counter() - t0


def _examples(questions, variants, outputs) -> list[dict[str, Any]]:
    examples = []
    for i, record in enumerate(questions):
        row: dict[str, Any] = {
            "id": record.pubid,
            "question": record.question,
            "reference": record.long_answer,
            "gold": record.final_decision,
        }
        for variant in variants:
            key = VARIANT_KEYS[variant]
            out = outputs[key]
            row[key] = {
                "decision": out["decision"][i],
                "probabilities": out["probabilities"][i],
                "answer": out.get("answer", [None] * len(questions))[i],
                "scores": out.get("scores", [{}] * len(questions))[i],
            }
        examples.append(row)
    return examples
