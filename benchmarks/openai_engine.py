"""Benchmark: the remote (OpenAI-compatible server) engine vs the in-process one, on the same model, in one run.

The server is :mod:`app.openai_api` wrapping the very engine the in-process side uses (on localhost), so the
ratios show what the protocol and the request pattern cost; against vLLM or TGI on a GPU, continuous batching
changes the picture (see docs/export.md, "Scaling out").

    python -m benchmarks.openai_engine [--n 32] [--max_new_tokens 32] [--batch_size 16]
"""

from __future__ import annotations

import argparse
import time

from app.compare import stream_comparison
from app.openai_api import ADAPTER_MODEL_NAME, BASE_MODEL_NAME, create_app, serve_in_thread
from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings, ServerSettings
from pubmedqa.data import load_examples, load_records, load_test_ids, stratified_sample
from pubmedqa.engines.base import Engine, GenerationSettings
from pubmedqa.engines.openai_engine import OpenAIEngine
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.evaluation.runner import EvalArguments, in_batches
from pubmedqa.prompts import fit_prompt
from pubmedqa.variants import Variant


def _evaluation(engine: Engine, prompts, batch_size: int, settings: GenerationSettings) -> float:
    """Decisions and long answers for base and fine-tuned, as scripts.evaluate runs them."""
    start = time.perf_counter()
    for variant in (Variant.BASE, Variant.TUNED):
        in_batches(prompts, batch_size, lambda b, v=variant: engine.score_decisions(b, [v] * len(b), len(b)), "decisions")
        in_batches(prompts, batch_size, lambda b, v=variant: engine.generate_batch(b, [v] * len(b), settings), "answers")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    local = TransformersEngine(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR)))
    local.load()
    url, server = serve_in_thread(create_app(local))
    remote = OpenAIEngine(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR), engine="openai", base_url=url,
                                         remote_model=BASE_MODEL_NAME, adapter_model=ADAPTER_MODEL_NAME))
    remote.load()
    limits = ServerSettings()
    example = load_examples(key="dev_examples")[0]
    compare_settings = {"max_new_tokens": args.max_new_tokens}

    def compare_latency(engine: Engine) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _update in stream_comparison(engine, limits, example["question"], example["context"], compare_settings):
                pass
            times.append(time.perf_counter() - start)
        return min(times)

    compare_latency(local)  # warm-up
    compare_local, compare_remote = compare_latency(local), compare_latency(remote)

    data = EvalArguments().data
    records = load_records(data)
    questions = stratified_sample([records[i] for i in load_test_ids(data)], args.n, seed=0)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    tokenizer = local.load().tokenizer
    prompts = [fit_prompt(r.prompt_input(), tokenizer, local.prompt_budget(args.max_new_tokens)) for r in questions]
    eval_local = _evaluation(local, prompts, args.batch_size, settings)
    eval_remote = _evaluation(remote, prompts, args.batch_size, settings)
    server.should_exit = True

    print(f"same model (embedded Gemma 3 270M + shipped adapter), max new tokens {args.max_new_tokens}")
    print(f"Compare pair, best of {args.repeats}: in-process {compare_local:.2f} s ({local.pair_mode}); "
          f"remote {compare_remote:.2f} s ({remote.pair_mode}); ratio remote / in-process {compare_remote / compare_local:.2f}")
    print(f"evaluation of {len(prompts)} questions x 2 models (decisions + long answers, batch {args.batch_size}): "
          f"in-process {eval_local:.1f} s ({2 * len(prompts) / eval_local:.2f} q/s); remote {eval_remote:.1f} s "
          f"({2 * len(prompts) / eval_remote:.2f} q/s); throughput ratio remote / in-process {eval_local / eval_remote:.2f}")


if __name__ == "__main__":
    main()
