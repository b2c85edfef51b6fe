"""Benchmark: the llama.cpp engine vs the transformers 4-bit engine vs bare llama-cpp-python, side by side in one run
on the same embedded model, prompt and settings (greedy). Prints the ratios the engine is held to:

- a Chat answer (128 new tokens) to a PubMedQA prompt with its abstract through the engine interface: >= 4x the
  transformers 4-bit engine (fine-tuned), and >= 0.9x bare llama-cpp-python on the same (base) weights (the app's
  own overhead under 10 %);
- the Compare pair (up to 256 tokens each): >= 3x today's mixed 4-bit batch;
- ready (model + adapter) on a fresh cache, with no conversion step: <= 10 s;
- resident memory with the adapter <= 1.1x the base alone (each in a fresh process).

Answers end where each model ends them, so times are projected from what was measured on the stream: the first
token's time plus 127 (or 255) times the time per later token.

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

from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings
from pubmedqa.data import load_examples
from pubmedqa.embedded_model import embedded_gguf
from pubmedqa.engines.base import Engine, GenerationSettings
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.prompts import PromptInput, encode_prompt
from pubmedqa.variants import Variant


def _example() -> PromptInput:
    """The shipped dev example whose prompt is closest to 430 tokens (training side: never a test question)."""
    examples = load_examples(key="dev_examples")
    return min((PromptInput(e["question"], e["context"]) for e in examples), key=lambda p: abs(len(p.context) / 4.3 - 400))


def _stream_timing(engine: Engine, prompts: list, variants: list[Variant], settings: GenerationSettings, repeats: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of one stream_batch call, best of ``repeats``: what a
    user waits, whatever length the answer happens to have."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        started = time.perf_counter()
        stamps = [time.perf_counter() - started for _ in engine.stream_batch(prompts, variants, settings)][:-1]
        if len(stamps) > 1:
            best = min(best, (stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1)), key=lambda t: t[0] + 127 * t[1])
    return best


def _bare_llama(prompt_ids: list[int], max_new_tokens: int, repeats: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of llama-cpp-python alone: the same tokens, greedy."""
    import llama_cpp

    llm = llama_cpp.Llama(str(embedded_gguf(ModelSettings().cache_dir)), n_ctx=3072, n_threads=os.cpu_count(), verbose=False)
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        llm.reset()
        started, stamps = time.perf_counter(), []
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1):
            stamps.append(time.perf_counter() - started)
            if llm.token_eos() == token or len(stamps) == max_new_tokens:
                break
        best = min(best, (stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1)), key=lambda t: t[0] + 127 * t[1])
    return best


def _answer_s(timing: tuple[float, float], tokens: int) -> float:
    """An answer of ``tokens`` tokens from the measured first-token time and per-token time."""
    return timing[0] + (tokens - 1) * timing[1]


def ready_probe(engine_name: str) -> dict[str, Any]:
    """In this process: seconds to a loaded model + adapter on an empty cache folder (the GGUF is assembled from the
    installed package, as on a fresh machine), and resident memory with and without the adapter."""
    import psutil

    process = psutil.Process(os.getpid())
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        engine = LlamaCppEngine(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR), cache_dir=cache, engine=engine_name))
        loaded = engine.load()
        seconds = time.perf_counter() - started
    return {"ready_s": seconds, "adapter_loaded": loaded.adapter_loaded, "rss_mb": process.memory_info().rss / 2**20}


def base_memory_probe() -> dict[str, Any]:
    import psutil

    engine = LlamaCppEngine(ModelSettings(adapter="none", engine="llama.cpp"))
    engine.load()
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
    llama = LlamaCppEngine(ModelSettings(adapter=adapter, engine="llama.cpp"))
    hf = TransformersEngine(ModelSettings(adapter=adapter, quantization="4bit", engine="transformers"))
    chat, pair = GenerationSettings(max_new_tokens=128), GenerationSettings(max_new_tokens=256)
    inp = _example()
    rows = {}
    for name, engine in (("llama.cpp engine", llama), ("transformers 4-bit", hf)):
        prompt = engine.prepare(inp, chat)
        rows[name] = {
            "prompt_tokens": prompt.n_tokens,
            "chat": _stream_timing(engine, [prompt], [Variant.TUNED], chat, args.repeats),
            "chat_base": _stream_timing(engine, [prompt], [Variant.BASE], chat, args.repeats),
            "pair": _stream_timing(engine, [prompt, prompt], [Variant.BASE, Variant.TUNED], pair, args.repeats),
        }
        print(name, json.dumps(rows[name]), flush=True)
    prompt = llama.prepare(inp, chat)
    bare = _bare_llama(encode_prompt(prompt.text, llama.load().tokenizer), 128, args.repeats)
    ready = _fresh_process("ready_probe('llama.cpp')")
    base = _fresh_process("base_memory_probe()")
    fast, slow = rows["llama.cpp engine"], rows["transformers 4-bit"]
    chat_fast, chat_slow, chat_bare = (_answer_s(t, 128) for t in (fast["chat"], slow["chat"], bare))
    print(f"A 128-token Chat answer to a {fast['prompt_tokens']}-token prompt (first token + 127 x per-token time): "
          f"llama.cpp engine {chat_fast:.2f} s (first token {fast['chat'][0]:.2f} s, {1 / fast['chat'][1]:.0f} tok/s), "
          f"transformers 4-bit {chat_slow:.2f} s ({1 / slow['chat'][1]:.1f} tok/s), bare llama-cpp-python "
          f"{chat_bare:.2f} s ({1 / bare[1]:.0f} tok/s)")
    print(f"  speed-up vs transformers 4-bit: {chat_slow / chat_fast:.1f}x (goal >= 4x)")
    # Bare llama-cpp-python runs the base weights, so the app's own overhead is measured on the base row; the
    # fine-tuned row also pays llama.cpp's LoRA matmuls.
    chat_base = _answer_s(fast["chat_base"], 128)
    print(f"  speed vs bare llama-cpp-python, base weights both: {chat_bare / chat_base:.2f}x (goal >= 0.9x); the "
          f"fine-tuned row (LoRA applied) {chat_bare / chat_fast:.2f}x")
    # llama.cpp answers the pair's rows in turn, so its pair is two answers; the transformers pair is one batch.
    pair_fast, pair_slow = 2 * _answer_s(fast["pair"], 256), _answer_s(slow["pair"], 256)
    print(f"Compare pair (256 tokens each): llama.cpp {pair_fast:.1f} s, transformers 4-bit mixed batch "
          f"{pair_slow:.1f} s: {pair_slow / pair_fast:.1f}x (goal >= 3x)")
    print(f"Ready on a fresh cache (model + adapter {ready['adapter_loaded']}): {ready['ready_s']:.1f} s (goal <= 10 s)")
    print(f"Memory: base {base['rss_mb']:.0f} MB, base + adapter {ready['rss_mb']:.0f} MB: "
          f"{ready['rss_mb'] / base['rss_mb']:.3f}x (goal <= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
