"""Benchmark: the llama.cpp engine vs the transformers 4-bit engine vs bare llama-cpp-python, side by side in one run
on the same embedded model, prompt and settings (greedy). Prints the ratios the engine is held to:

- a Chat answer (up to 128 new tokens) to a ~430-token PubMedQA prompt through the backend interface: >= 4x the
  transformers 4-bit engine, and >= 0.9x bare llama-cpp-python (the app's own overhead under 10 %);
- the Compare pair (up to 256 tokens each): >= 3x today's mixed 4-bit batch;
- ready (model + adapter) on a fresh cache, with no conversion step: <= 10 s;
- resident memory with the adapter <= 1.1x the base alone (each in a fresh process).

Times are per generated token, prompt included, so that answers of different lengths compare fairly.

    python -m benchmarks.engines [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from pubmedqa.backends.base import GenerationSettings, ModelBackend, Variant
from pubmedqa.backends.llama_cpp_backend import LlamaCppBackend
from pubmedqa.backends.transformers_backend import TransformersBackend
from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings
from pubmedqa.data import load_examples
from pubmedqa.embedded_model import embedded_gguf
from pubmedqa.prompts import PromptInput, encode_prompt


def _example() -> PromptInput:
    """The shipped dev example whose prompt is closest to 430 tokens (training side: never a test question)."""
    examples = load_examples(key="dev_examples")
    return min((PromptInput(e["question"], e["context"]) for e in examples), key=lambda p: abs(len(p.context) / 4.3 - 400))


def _per_token(backend: ModelBackend, prompts: list, variants: list[Variant], settings: GenerationSettings, repeats: int) -> tuple[float, int]:
    """(best seconds per generated token, tokens) of one stream_batch call over ``prompts``."""
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        texts = backend.generate_batch(prompts, variants, settings)
        seconds = time.perf_counter() - started
        tokens = sum(backend.count_tokens(t) for t in texts)
        best = min(best, seconds / max(tokens, 1))
    return best, tokens


def _bare_llama(prompt_ids: list[int], max_new_tokens: int, repeats: int) -> float:
    """Seconds per token of llama-cpp-python alone: the same tokens, greedy, no app code around it."""
    import llama_cpp

    llm = llama_cpp.Llama(str(embedded_gguf(ModelSettings().cache_dir)), n_ctx=3072, n_threads=os.cpu_count(), verbose=False)
    best = float("inf")
    for _ in range(repeats):
        llm.reset()
        started, n = time.perf_counter(), 0
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1):
            n += 1
            if llm.token_eos() == token or n == max_new_tokens:
                break
        best = min(best, (time.perf_counter() - started) / n)
    return best


def ready_probe(engine: str) -> dict[str, Any]:
    """In this process: seconds to a loaded model + adapter on an empty cache folder (the GGUF is assembled from the
    installed package, as on a fresh machine), and resident memory with and without the adapter."""
    import psutil

    process = psutil.Process(os.getpid())
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        backend = LlamaCppBackend(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR), cache_dir=cache, engine=engine))
        loaded = backend.load()
        seconds = time.perf_counter() - started
    return {"ready_s": seconds, "adapter_loaded": loaded.adapter_loaded, "rss_mb": process.memory_info().rss / 2**20}


def base_memory_probe() -> dict[str, Any]:
    import psutil

    backend = LlamaCppBackend(ModelSettings(adapter="none", engine="llama.cpp"))
    backend.load()
    return {"rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20}


def _fresh_process(call: str) -> dict[str, Any]:
    code = f"import json; from benchmarks.engines import *; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    adapter = str(SHIPPED_ADAPTER_DIR)
    llama = LlamaCppBackend(ModelSettings(adapter=adapter, engine="llama.cpp"))
    hf = TransformersBackend(ModelSettings(adapter=adapter, quantization="4bit", engine="transformers"))
    chat, pair = GenerationSettings(max_new_tokens=128), GenerationSettings(max_new_tokens=256)
    inp = _example()
    rows = {}
    for name, backend in (("llama.cpp engine", llama), ("transformers 4-bit", hf)):
        prompt = backend.prepare(inp, chat)
        rows[name] = {
            "prompt_tokens": prompt.n_tokens,
            "chat": _per_token(backend, [prompt], [Variant.TUNED], chat, args.repeats),
            "pair": _per_token(backend, [prompt, prompt], [Variant.BASE, Variant.TUNED], pair, args.repeats),
        }
        print(name, json.dumps(rows[name]), flush=True)
    prompt = llama.prepare(inp, chat)
    bare = _bare_llama(encode_prompt(prompt.text, llama.load().tokenizer), 128, args.repeats)
    ready = _fresh_process("ready_probe('llama.cpp')")
    base = _fresh_process("base_memory_probe()")
    fast, slow = rows["llama.cpp engine"], rows["transformers 4-bit"]
    print(f"Chat answer ({fast['prompt_tokens']}-token prompt, up to 128 new tokens), seconds per token: llama.cpp "
          f"engine {fast['chat'][0]:.4f} ({fast['chat'][1]} tokens), transformers 4-bit {slow['chat'][0]:.4f} "
          f"({slow['chat'][1]} tokens), bare llama-cpp-python {bare:.4f}")
    print(f"  speed-up vs transformers 4-bit: {slow['chat'][0] / fast['chat'][0]:.1f}x (goal >= 4x)")
    print(f"  speed vs bare llama-cpp-python: {bare / fast['chat'][0]:.2f}x (goal >= 0.9x)")
    print(f"Compare pair (up to 256 tokens each), seconds per token: llama.cpp {fast['pair'][0]:.4f}, "
          f"transformers 4-bit mixed batch {slow['pair'][0]:.4f}: {slow['pair'][0] / fast['pair'][0]:.1f}x (goal >= 3x)")
    print(f"Ready on a fresh cache (model + adapter {ready['adapter_loaded']}): {ready['ready_s']:.1f} s (goal <= 10 s)")
    print(f"Memory: base {base['rss_mb']:.0f} MB, base + adapter {ready['rss_mb']:.0f} MB: "
          f"{ready['rss_mb'] / base['rss_mb']:.3f}x (goal <= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
