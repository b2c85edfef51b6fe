"""Benchmark: the llama.cpp engine's evaluation path, a batch's rows decoded together, against the same rows one at
a time (what the engine did before, and what Chat does), on dev questions, base and fine-tuned, in one run.

Prints both wall times, the speed-up, and how many answers and decisions are identical (the decisions should all
be; an answer can part after a near-tie, since several-row kernels round differently).

    python -m benchmarks.llama_cpp_rows [--n 32] [--batch_size 8] [--max_new_tokens 64]
"""

from __future__ import annotations

import argparse
import time

from app import model_status
from pubmedqa.config import ModelSettings
from pubmedqa.data import SplitSettings
from pubmedqa.decisions.options import predicted_decision
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
from pubmedqa.variants import Variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()

    engine = LlamaCppEngine(ModelSettings(engine="llama.cpp"))
    engine.load()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    dev = SplitSettings().load_split().dev[: args.n]
    prompts = [engine.prepare(r.prompt_input(), settings) for r in dev]
    print(f"{len(prompts)} dev questions, batches of {args.batch_size}, {args.max_new_tokens} new tokens; "
          f"{model_status.summary(engine)}")
    for variant in (Variant.BASE, Variant.TUNED):
        t0 = time.perf_counter()
        together: tuple[list[str], list[dict[str, float]]] = ([], [])
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            answers, decisions = engine.generate_with_decisions(batch, [variant] * len(batch), settings)
            together[0].extend(answers)
            together[1].extend(decisions)
        seconds_together = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = [engine.generate_with_decisions([p], [variant], settings) for p in prompts]
        seconds_alone = time.perf_counter() - t0
        same_answers = sum(a == b[0][0] for a, b in zip(together[0], alone))
        same_decisions = sum(predicted_decision(a) == predicted_decision(b[1][0]) for a, b in zip(together[1], alone))
        print(f"{variant.value:<10} together {seconds_together:6.1f} s   one at a time {seconds_alone:6.1f} s   "
              f"speed-up {seconds_alone / seconds_together:.2f}x   identical answers {same_answers}/{len(prompts)}, "
              f"decisions {same_decisions}/{len(prompts)}", flush=True)


if __name__ == "__main__":
    main()
