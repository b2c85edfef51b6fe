"""Evaluate the base model and the fine-tuned one (same base, adapter on/off through the engine) on the official
PubMedQA test set, and write a run folder (see :mod:`pubmedqa.evaluation.results`).

    python -m scripts.evaluate                          # all 500 test questions, shipped adapter
    python -m scripts.evaluate --limit 100 --output_dir outputs/eval-100
    python -m scripts.evaluate --judge_base_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-7B-Instruct

It runs through whatever engine ``--engine`` picks (llama.cpp on a CPU by default, transformers, or a remote
``openai`` server), or through the app's already loaded one, which then lets visitors' requests go first between
batches. Questions go in batches of similar length, and each batch is one pass on the in-process engines: greedy
long answers whose first step also gives the yes/no/maybe decision (a remote server scores the options in requests of
their own), as the adapter's decision policy decides it (option likelihood, or its decision probe, then its calibration; the
fine-tuned decisions are also scored without the calibration); ``--no_long_answers`` scores the
decisions alone. Then Token-F1, BLEU, ROUGE-1/L, readable answers (looping, ended by
itself), BERTScore and, when configured, an LLM judge. The run folder keys the variants ``base`` and ``tuned``
(``results_key`` in :data:`pubmedqa.variants.NAMES`, the stored format every shipped run uses).
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

from pubmedqa.config import ModelSettings
from pubmedqa.data import PubMedQARecord, default_data_source
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.decisions.policy import DecisionPolicy
from pubmedqa.engines.base import (
    DEFAULT_MIN_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    Engine,
    GenerationSettings,
    LoadedModel,
    Variant,
)
from pubmedqa.engines.factory import create_engine
from pubmedqa.evaluation.bertscore import DEFAULT_LAYERS, DEFAULT_MODEL, bertscore
from pubmedqa.evaluation.judge import Judge, summarize_grades
from pubmedqa.evaluation.metrics import readability_metrics
from pubmedqa.evaluation.results import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    write_examples,
    write_json_atomic,
    write_predictions,
)
from pubmedqa.evaluation.task import PUBMEDQA, Task
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import FittedPrompt, fit_prompt
from pubmedqa.variants import NAMES

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
T = TypeVar("T")


@dataclass
class EvalArguments:
    data: str = field(
        default_factory=default_data_source,
        metadata={"help": "Folder with ori_pqal.json + test_ground_truth.json, or 'hub' (the default) for "
                          "qiaojin/PubMedQA, kept in the datasets cache."},
    )
    limit: int = field(
        default=0, metadata={"help": "Evaluate a label-stratified sample of N test questions (0 = all 500)."}
    )
    sample_seed: int = field(default=0, metadata={"help": "Seed of the stratified sample (with --limit)."})
    output_dir: str = field(default="", metadata={"help": "Run folder (default: outputs/eval/<UTC time>)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass / generate call."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated long answer."})
    repetition_penalty: float = field(
        default=DEFAULT_REPETITION_PENALTY,
        metadata={"help": "Repetition penalty of the long answers (1 = off; the decisions are not affected)."},
    )
    min_new_tokens: int = field(
        default=DEFAULT_MIN_NEW_TOKENS,
        metadata={"help": "No end of sequence before this many answer tokens, so an answer explains its decision (0 = off)."},
    )
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


@dataclass
class VariantRun:
    """One variant's results on the task's questions: what ``results.json`` holds under ``models[key]`` and the
    per-example lines hold under ``key``."""

    key: str
    probabilities: list[dict[str, float]]  # as the engine's decision policy decides them
    answers: list[str] | None  # None: decisions only
    ended: list[bool] | None = None  # per answer: ended by itself (EOS or a stop sequence) before the token limit
    metrics: dict[str, Any] = field(default_factory=dict)
    scores: list[dict[str, Any]] | None = None  # per-example answer scores

    @property
    def decisions(self) -> list[str]:
        return [predicted_decision(p) for p in self.probabilities]

    def example(self, i: int) -> dict[str, Any]:
        return {
            "decision": predicted_decision(self.probabilities[i]),
            "probabilities": self.probabilities[i],
            "answer": self.answers[i] if self.answers is not None else None,
            "scores": self.scores[i] if self.scores is not None else {},
        }


def evaluate(
    model_settings: ModelSettings,
    args: EvalArguments,
    progress: Progress | None = None,
    engine: Engine | None = None,
    task: Task = PUBMEDQA,
) -> Path:
    """Run the evaluation and return the run folder. ``progress(fraction, message)`` is called as work advances;
    pass the app's ``engine`` to evaluate through the already loaded model instead of loading a second copy."""
    started = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    run_dir = Path(args.output_dir or f"outputs/eval/{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    questions = task.documents(args.data, args.limit, args.sample_seed)
    judge = _make_judge(args)
    engine = engine or create_engine(model_settings)
    loaded = engine.load()
    variants = _variants(model_settings, engine)
    budget = engine.prompt_budget(args.max_new_tokens)
    prompts = [fit_prompt(task.doc_to_prompt(r), loaded.tokenizer, budget) for r in questions]
    gold = [task.doc_to_target(r) for r in questions]
    timings: dict[str, float] = {}
    errors: list[str] = []
    runs = []
    for step, variant in enumerate(variants):
        def step_progress(fraction: float, message: str, step: int = step) -> None:
            report((step + fraction) / len(variants), message)

        run = _decide_and_answer(engine, prompts, variant, args, timings, step_progress)
        run.metrics = _decision_metrics(task, run, gold, loaded.policy, variant)
        write_predictions(run_dir, run.key, {r.pubid: d for r, d in zip(questions, run.decisions)})
        if run.answers is not None:
            _score_answers(task, run, questions, args, judge, timings, errors, model_settings.cache_dir)
        runs.append(run)

    write_examples(run_dir, [_example(task, record, i, runs) for i, record in enumerate(questions)])
    timings["total_s"] = time.perf_counter() - started
    run_record = _run_record(model_settings, args, loaded, variants, judge, len(questions), timings, errors)
    results = {"schema_version": SCHEMA_VERSION, "run": run_record, "models": {run.key: run.metrics for run in runs}}
    write_json_atomic(run_dir / RESULTS_FILE, results)
    report(1.0, "done")
    logger.info("Results written to %s (%.0f s)", run_dir, timings["total_s"])
    for run in runs:
        m = run.metrics
        logger.info("%s: accuracy %.3f, macro-F1 %.3f%s", run.key, m["accuracy"], m["macro_f1"],
                    f", Token-F1 {m['token_f1']:.1f}, ROUGE-L {m['rougeL']:.1f}" if "token_f1" in m else "")
    return run_dir


def _variants(model_settings: ModelSettings, engine: Engine) -> list[Variant]:
    """Base, and fine-tuned when the engine serves an adapter (a local one, or the openai engine's adapter model);
    refused, with the reason, when a configured one did not load."""
    if engine.load().adapter_loaded:
        return [Variant.BASE, Variant.TUNED]
    if model_settings.adapter_source or (engine.name == "openai" and model_settings.adapter_model):
        raise ModelLoadError(f"The adapter cannot be evaluated: {engine.adapter_unavailable_reason()}")
    return [Variant.BASE]


def _decide_and_answer(
    engine: Engine, prompts: list[FittedPrompt], variant: Variant, args: EvalArguments,
    timings: dict[str, float], progress: Progress,
) -> VariantRun:
    """The variant's decisions (as the app serves them; :func:`_decision_metrics` also scores them without the
    policy's offsets) and, with ``args.long_answers``, its answers from the same pass."""
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens
    )

    def run(batch: list[FittedPrompt]) -> list[tuple[str | None, dict[str, float]]]:
        engine.give_way()  # in the app, visitors' requests go first: they wait at most for one batch
        if args.long_answers:  # one pass per batch: the decision comes from the generation's first step
            answers, scores = engine.generate_with_decisions(batch, [variant] * len(batch), settings)
            return list(zip(answers, scores))
        return [(None, s) for s in engine.score_decisions(batch, [variant] * len(batch), len(batch))]

    key = NAMES[variant].results_key
    task = "decisions and answers" if args.long_answers else "decisions"
    t0 = time.perf_counter()
    message = f"{key}: {task}"
    rows = in_batches(prompts, args.batch_size, run, message, lambda fraction: progress(fraction, message))
    timings[f"{key}_{task.replace(' ', '_')}_s"] = time.perf_counter() - t0
    answers = [a for a, _ in rows] if args.long_answers else None
    ended = ended_by_itself(engine, answers, args.max_new_tokens) if answers is not None else None
    return VariantRun(key, [p for _, p in rows], answers, ended)


def ended_by_itself(engine: Engine, answers: Sequence[str], max_new_tokens: int) -> list[bool]:
    """Per answer, whether it ended before the token limit (EOS or a stop sequence). An answer that used its whole
    budget hit the limit; the budget less one allows for the whitespace answers are stripped of, so an answer ending in
    its very last token counts as cut off (never the reverse)."""
    return [engine.count_tokens(a) < max_new_tokens - 1 for a in answers]


def _decision_metrics(
    task: Task, run: VariantRun, gold: list[str], policy: DecisionPolicy, variant: Variant
) -> dict[str, Any]:
    """The task's decision metrics; for a calibrated variant, also without the policy's offsets."""
    metrics = task.decision_metrics(gold, run.decisions)
    if variant is Variant.TUNED and policy.calibration is not None:  # what the adapter scores without its offsets
        raw = [predicted_decision(p) for p in policy.without_offsets(run.probabilities, [True] * len(run.probabilities))]
        uncalibrated = task.decision_metrics(gold, raw)
        metrics["uncalibrated"] = {k: uncalibrated[k] for k in ("accuracy", "macro_f1", "predicted_counts")}
    return metrics


def _make_judge(args: EvalArguments) -> Judge | None:
    if not args.judge_base_url:
        return None
    if not args.judge_model:
        raise ValueError("--judge_model is required with --judge_base_url")
    return Judge(args.judge_base_url, args.judge_model, os.environ.get(args.judge_api_key_env), args.judge_timeout)


def _score_answers(
    task: Task, run: VariantRun, questions: list[PubMedQARecord], args: EvalArguments, judge: Judge | None,
    timings: dict[str, float], errors: list[str], cache_dir: str,
) -> None:
    """Long-answer metrics for one variant; a metric that fails is recorded in ``errors``, the others still count."""
    references = [task.doc_to_reference(r) for r in questions]
    answers = run.answers or []
    text = task.answer_metrics(answers, references)
    run.metrics.update({k: text[k] for k in ("token_f1", "bleu", "rouge1", "rougeL")})
    readable = readability_metrics(answers, run.ended or [False] * len(answers))
    run.metrics.update({k: readable[k] for k in ("looping", "ended_by_itself")})
    run.scores = [scores | flags for scores, flags in zip(text["per_example"], readable["per_example"])]
    if args.bertscore_model.lower() != "none":
        t0 = time.perf_counter()
        try:
            scores = bertscore(answers, references, args.bertscore_model, args.bertscore_num_layers, cache_dir)
            run.metrics["bertscore"] = {k: scores[k] for k in ("model", "num_layers", "precision", "recall", "f1")}
            for row, value in zip(run.scores, scores["per_example_f1"]):
                row["bertscore_f1"] = value
        except Exception as exc:  # a missing or broken BERTScore model must not cost the other metrics
            errors.append(f"{run.key}: BERTScore failed ({type(exc).__name__}: {exc})")
            logger.error("%s", errors[-1])
        timings[f"{run.key}_bertscore_s"] = time.perf_counter() - t0
    if judge is None:
        run.metrics["judge"] = {"enabled": False, "note": "LLM judge not run (pass --judge_base_url)"}
        return
    t0 = time.perf_counter()
    pairs = list(zip(questions, answers))
    grades = [judge.grade(r.question, task.doc_to_reference(r), a) for r, a in tqdm(pairs, desc=f"{run.key}: judge")]
    run.metrics["judge"] = {"model": judge.model, **summarize_grades(grades)}
    for row, grade in zip(run.scores, grades):
        row["judge"] = grade.score
        row["judge_reason"] = grade.reason or grade.error
    timings[f"{run.key}_judge_s"] = time.perf_counter() - t0


def _example(task: Task, record: PubMedQARecord, i: int, runs: list[VariantRun]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": record.pubid, "question": record.question, "reference": task.doc_to_reference(record),
        "gold": task.doc_to_target(record),
    }
    return row | {run.key: run.example(i) for run in runs}


def _run_record(
    model_settings: ModelSettings, args: EvalArguments, loaded: LoadedModel, variants: list[Variant],
    judge: Judge | None, n: int, timings: dict[str, float], errors: list[str],
) -> dict[str, Any]:
    """``results.json``'s ``run``: what was evaluated, how, with which libraries, in how long."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": model_settings.base_model,
        "base_description": loaded.description,
        "quantization": loaded.quantization,
        "adapter": model_settings.adapter_source,
        "dataset": "local PQA-L files" if Path(args.data).is_dir() else "hub:qiaojin/PubMedQA (pqa_labeled)",
        "split": "official test set" + (f", stratified sample (seed {args.sample_seed})" if args.limit else ""),
        "n": n,
        "decision_method": "option likelihood: softmax over the log-likelihoods of yes/no/maybe after the prompt",
        **(loaded.policy if Variant.TUNED in variants else DecisionPolicy()).record(),
        "settings": {k: v for k, v in asdict(args).items() if k not in ("judge_api_key_env",)},
        "bertscore_model": args.bertscore_model if args.long_answers else None,
        "judge": {"model": args.judge_model, "base_url": args.judge_base_url} if judge else "not run (no --judge_base_url)",
        "library_versions": {p: version(p) for p in ("torch", "transformers", "peft", "sacrebleu", "rouge-score", "bert-score")},
        "timings": timings,
        "errors": errors,
    }
