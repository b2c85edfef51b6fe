"""Benchmark: scoring a prompt as lm-evaluation-harness asks for it (``/v1/completions`` with ``echo``,
``logprobs: 1``, ``max_tokens: 1``: every position's log-probability over the 262k vocabulary) vs reading the same
prompt for one token (no ``echo``), side by side over HTTP on the embedded model (llama.cpp engine, base); and the
process's peak memory before and after scoring. Run on a quiet machine (two llama.cpp jobs on two cores slow each
other about tenfold).

    python -m benchmarks.echo_logprobs [--tokens 600] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import httpx

from app.openai_api import BASE_MODEL_NAME, create_app, serve_in_thread
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.data import load_examples
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=600, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    engine = LlamaCppEngine(ModelSettings(engine="llama.cpp"))
    tokenizer = engine.load().tokenizer
    text = " ".join(ex["context"] for ex in load_examples(key="dev_examples"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    limits = ServerSettings(max_context_chars=100_000)
    url, server = serve_in_thread(create_app(engine, limits))
    body = {"model": BASE_MODEL_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0}
    timings: dict[str, list[float]] = {"read the prompt, one token": [], "echo + logprobs: 1 (every position)": []}
    before = _peak_mb()
    with httpx.Client(timeout=600) as client:
        client.post(f"{url}/completions", json=body).raise_for_status()  # warm-up
        for _ in range(args.repeats):  # interleaved, so that both see the same machine state
            for name, extra in zip(timings, ({}, {"echo": True, "logprobs": 1})):
                start = time.perf_counter()
                response = client.post(f"{url}/completions", json={**body, **extra})
                response.raise_for_status()
                timings[name].append(time.perf_counter() - start)
        scored = response.json()["choices"][0]["logprobs"]
    server.should_exit = True
    assert len(scored["token_logprobs"]) == len(ids) + 1

    print(f"{len(ids)}-token prompt, {args.repeats} requests each, median (min-max):")
    medians = {}
    for name, values in timings.items():
        medians[name] = statistics.median(values)
        print(f"  {name:38s} {medians[name]:.2f} s ({min(values):.2f}-{max(values):.2f})")
    base, echo = medians.values()
    print(f"  ratio echo / read: {echo / base:.2f}x (goal <= 3.5x)")
    print(f"  peak resident memory: {before:.0f} MB before scoring, {_peak_mb():.0f} MB after")


if __name__ == "__main__":
    main()
