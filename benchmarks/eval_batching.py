"""Benchmark: batched evaluation vs a one-example-at-a-time loop like the original notebook's.

Same model, same questions, one run. Prints both wall times and the speed-up (goal >= 3x).

    python -m benchmarks.eval_batching [--n 32] [--batch_size 8] [--max_new_tokens 64] [--quantization 4bit]
"""

from __future__ import annotations

import argparse
import time

import torch

from pubmedqa.config import QUANTIZATION_CHOICES, ModelSettings
from pubmedqa.data import load_records, load_test_ids, stratified_sample
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.evaluation.runner import EvalArguments, in_batches
from pubmedqa.prompts import fit_prompt
from pubmedqa.variants import Variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--quantization", default=ModelSettings.quantization, choices=QUANTIZATION_CHOICES)
    args = parser.parse_args()

    data = EvalArguments().data
    records = load_records(data)
    questions = stratified_sample([records[i] for i in load_test_ids(data)], args.n, seed=0)
    engine = TransformersEngine(ModelSettings(adapter="none", quantization=args.quantization))
    loaded = engine.load()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    budget = engine.prompt_budget(args.max_new_tokens)
    prompts = [fit_prompt(r.prompt_input(), loaded.tokenizer, budget) for r in questions]

    # (a) batched, as scripts.evaluate runs it: length-sorted batches, one generate call per batch whose first
    # step also gives the option scores (one pass over each prompt)
    t0 = time.perf_counter()
    in_batches(
        prompts, args.batch_size,
        lambda b: list(zip(*engine.generate_with_decisions(b, [Variant.BASE] * len(b), settings))), "batched",
    )
    batched = time.perf_counter() - t0

    # (b) the notebook's loop: one question at a time, full logits for the decision, then generate
    t0 = time.perf_counter()
    tokenizer = loaded.tokenizer
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt.text)["input_ids"]])
        with torch.inference_mode():
            loaded.model(input_ids=ids)  # every position's logits, as a plain forward call returns them
        engine.generate(prompt, Variant.BASE, settings)
    sequential = time.perf_counter() - t0

    print(f"questions: {len(prompts)}, batch size {args.batch_size}, max new tokens {args.max_new_tokens}, "
          f"base in {loaded.quantization}")
    print(f"batched:    {batched:8.1f} s")
    print(f"one by one: {sequential:8.1f} s")
    print(f"speed-up:   {sequential / batched:8.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
