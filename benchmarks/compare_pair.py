"""Benchmark: the Compare pair on the llama.cpp engine, both answers streamed side by side (a row on each of the two
contexts over the one model, stepped in turn by the scheduler) vs the same two answers one after the other, same
question and settings, in one process. (Memory with both contexts, which exist from the load on:
benchmarks.concurrency.)

Prints the ratios (goals: the pair's total <= 1.15x the two answers in turn; both first tokens <= 1.5 s apart).

    python -m benchmarks.compare_pair [--adapter assets/adapter] [--max_new_tokens 128] [--repeats 3] [--examples 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings
from pubmedqa.data import load_examples
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant

PAIR = [Variant.BASE, Variant.TUNED]


def _pair(engine: LlamaCppEngine, prompt, settings: GenerationSettings) -> tuple[float, list[float | None], list[str]]:
    """(total seconds, each side's first-token seconds from the start, the answers) of one side-by-side pair."""
    start = time.perf_counter()
    first: list[float | None] = [None, None]
    texts: list[str] = ["", ""]
    for texts in engine.stream_batch([prompt, prompt], PAIR, settings):
        for side, text in enumerate(texts):
            if text and first[side] is None:
                first[side] = time.perf_counter() - start
    return time.perf_counter() - start, first, texts


def _in_turn(engine: LlamaCppEngine, prompt, settings: GenerationSettings) -> tuple[float, list[str]]:
    start = time.perf_counter()
    texts = [engine.generate(prompt, variant, settings) for variant in PAIR]
    return time.perf_counter() - start, texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(SHIPPED_ADAPTER_DIR))
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each way per question; the best counts.")
    parser.add_argument("--examples", type=int, default=3, help="Dev questions measured (never the test set).")
    args = parser.parse_args(argv)

    engine = LlamaCppEngine(ModelSettings(adapter=args.adapter, engine="llama.cpp"))
    if not engine.load().adapter_loaded:
        raise SystemExit(f"no adapter loaded from {args.adapter}: {engine.adapter_unavailable_reason()}")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    examples = load_examples(key="dev_examples")[: args.examples]
    prompts = [engine.prepare(PromptInput(e["question"], e["context"]), settings) for e in examples]
    _pair(engine, prompts[0], settings)  # warm-up

    ratios, gaps = [], []
    for prompt in prompts:
        pair_runs = [_pair(engine, prompt, settings) for _ in range(args.repeats)]
        turn_runs = [_in_turn(engine, prompt, settings) for _ in range(args.repeats)]
        pair_s, first, pair_texts = min(pair_runs, key=lambda run: run[0])
        turn_s, turn_texts = min(turn_runs, key=lambda run: run[0])
        same = "same answers" if pair_texts == turn_texts else "ANSWERS DIFFER"
        gap = abs(first[1] - first[0]) if None not in first else float("nan")
        ratios.append(pair_s / turn_s)
        gaps.append(gap)
        print(
            f"{prompt.n_tokens}-token prompt: side by side {pair_s:.2f} s (first tokens at {first[0]:.2f} s and "
            f"{first[1]:.2f} s), in turn {turn_s:.2f} s; ratio {pair_s / turn_s:.2f} ({same})"
        )
    print(f"Pair time / in turn: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x (goal <= 1.15x)")
    print(f"First tokens apart: worst {max(gaps):.2f} s (goal <= 1.5 s)")


if __name__ == "__main__":
    main()
