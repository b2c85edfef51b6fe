"""Experiment: how decoding settings change the long answers, on the dev questions (never the test set). For each
repetition penalty and token budget, base and fine-tuned answer the dev questions through the app's engine (greedy),
and the script prints, per variant: looping (some 3-word sequence 3+ times), ended by itself (EOS or a stop sequence
before the limit), bare decisions (the answer is the decision word alone), mean words, Token-F1 and ROUGE-L
against the abstract's conclusion — the figures the defaults
were chosen from (docs/results.md, "Readable answers").

    python -m benchmarks.readable_answers [--penalties 1.0 1.1 1.2 1.3] [--budgets 64] [--min_new_tokens 0 3] [--adapter DIR]
        [--limit 50]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from app import model_status
from pubmedqa.config import ModelSettings
from pubmedqa.data import SplitSettings
from pubmedqa.engines.base import DEFAULT_MIN_NEW_TOKENS, GenerationSettings
from pubmedqa.engines.factory import create_engine
from pubmedqa.evaluation.metrics import readability_metrics, text_metrics
from pubmedqa.evaluation.runner import ended_by_itself
from pubmedqa.variants import Variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64])
    parser.add_argument("--min_new_tokens", type=int, nargs="+", default=[DEFAULT_MIN_NEW_TOKENS])
    parser.add_argument("--adapter", default="", help="Adapter folder (default: the shipped one).")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--limit", type=int, default=50, help="Dev questions used (all 50 by default).")
    parser.add_argument("--json", default="", help="Also write the figures to this JSON file.")
    args = parser.parse_args()

    settings = ModelSettings(engine=args.engine, **({"adapter": args.adapter} if args.adapter else {}))
    engine = create_engine(settings)
    engine.load()
    dev = SplitSettings().load_split().dev[: args.limit]
    references = [r.long_answer for r in dev]
    rows = []
    print(f"{len(dev)} dev questions; {model_status.summary(engine)}")
    print(f"{'budget':>6} {'penalty':>7} {'min':>3} {'variant':<10} {'looping':>7} {'ended':>6} {'bare':>5} {'words':>5} "
          f"{'TokF1':>5} {'ROUGE-L':>7}  time")
    for budget, penalty, minimum in itertools.product(args.budgets, args.penalties, args.min_new_tokens):
        generation = GenerationSettings(max_new_tokens=budget, repetition_penalty=penalty, min_new_tokens=minimum)
        prompts = [engine.prepare(r.prompt_input(), generation) for r in dev]
        for variant in (Variant.BASE, Variant.TUNED):
            started = time.perf_counter()
            answers = engine.generate_batch(prompts, [variant] * len(prompts), generation)
            seconds = time.perf_counter() - started
            ended = ended_by_itself(engine, answers, budget)
            readable, text = readability_metrics(answers, ended), text_metrics(answers, references)
            words = sum(len(a.split()) for a in answers) / len(answers)
            bare = 100 * sum(len(a.split()) <= 1 for a in answers) / len(answers)  # the decision word alone
            row = {"budget": budget, "penalty": penalty, "min_new_tokens": minimum, "variant": variant.value,
                   "looping": readable["looping"], "ended_by_itself": readable["ended_by_itself"], "bare_decision": bare,
                   "words": words, "token_f1": text["token_f1"], "rougeL": text["rougeL"], "seconds": seconds}
            rows.append(row)
            print(f"{budget:>6} {penalty:>7.2f} {minimum:>3} {variant.value:<10} {row['looping']:>6.0f}% "
                  f"{row['ended_by_itself']:>5.0f}% {bare:>4.0f}% {words:>5.0f} {row['token_f1']:>5.1f} "
                  f"{row['rougeL']:>7.1f}  {seconds:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
