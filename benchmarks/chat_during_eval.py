"""Benchmark: a short Chat answer while an evaluation runs in the app, on the default engine (llama.cpp, embedded model,
shipped adapter). Prints, measured in one run:

- a short answer alone (10 requests: median and p95);
- the evaluation's batches (decisions + 64-token answers, ``--batch_size`` questions each): mean and longest;
- the same answer during the evaluation (10 requests, ``--gap_s`` apart): median and p95, and its bound: one
  evaluation batch (the longest) plus the answer's own p95 alone.

The evaluation runs as the app runs it: in its own thread, giving the model way between batches.

    python -m benchmarks.chat_during_eval [--requests 10] [--batch_size N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

from pubmedqa.config import ModelSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.factory import create_engine
from pubmedqa.evaluation.runner import EvalArguments, evaluate
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant

QUESTION = "Does regular aspirin use reduce the risk of colorectal cancer?"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=0, help="Evaluation batch (default: the app's choice).")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Length of the chat answer.")
    parser.add_argument("--gap_s", type=float, default=0.5, help="Pause between chat requests during the evaluation.")
    args = parser.parse_args()

    engine = create_engine(ModelSettings())
    engine.load()
    batch_size = args.batch_size or (8 if engine.batches_rows else 1)  # as app/ui/evaluation_tab.py chooses
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    prompt = engine.prepare(PromptInput(QUESTION), settings)

    def ask() -> float:
        started = time.perf_counter()
        engine.generate(prompt, Variant.TUNED, settings)
        return time.perf_counter() - started

    ask()  # warm-up
    alone = [ask() for _ in range(args.requests)]

    # Each batch runs from the moment give_way lets it start to the next call of give_way (its end).
    batch_starts: list[float] = []
    batches: list[float] = []
    give_way = engine.give_way

    def timed_give_way(*a, **k):
        if batch_starts:
            batches.append(time.perf_counter() - batch_starts[-1])
        give_way(*a, **k)
        batch_starts.append(time.perf_counter())

    engine.give_way = timed_give_way
    eval_args = EvalArguments(limit=200, batch_size=batch_size, max_new_tokens=64, bertscore_model="none",
                              output_dir="outputs/benchmarks/chat-during-eval")
    threading.Thread(target=evaluate, args=(engine.settings, eval_args), kwargs={"engine": engine}, daemon=True).start()
    while len(batch_starts) < 2:
        time.sleep(0.1)
    during = []
    first = len(batches)
    for _ in range(args.requests):
        during.append(ask())
        time.sleep(args.gap_s)
    started = len(batch_starts)
    while len(batches) < started:  # the batch in progress when the last request ended
        time.sleep(0.1)
    batch_alone = batches[first:started]  # every batch that ran while the chat requests came in
    longest = max(batch_alone)
    bound = longest + p95(alone)
    print(f"engine: {engine.load().quantization}; chat answer: {args.max_new_tokens} tokens, fine-tuned")
    print(f"alone:   median {statistics.median(alone):.2f} s, p95 {p95(alone):.2f} s ({args.requests} requests)")
    print(f"evaluation batches ({batch_size} question(s), 64-token answers): mean {statistics.mean(batch_alone):.2f} s, "
          f"longest {longest:.2f} s")
    print(f"during the evaluation: median {statistics.median(during):.2f} s, p95 {p95(during):.2f} s "
          f"({args.requests} requests, {args.gap_s:g} s apart)")
    print(f"bound (longest batch + p95 alone): {bound:.2f} s -> p95 during / bound = {p95(during) / bound:.2f} "
          f"({'within' if p95(during) <= bound else 'OVER'})")
    # The evaluation thread is still using the model: leave without tearing it down under it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
