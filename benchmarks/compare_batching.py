"""Benchmark: the Compare tab's pair of answers as ONE mixed-adapter batch (PEFT adapter_names) vs two sequential
generations, same question, settings and seed; and memory with base + adapter loaded vs base alone, measured in
one process (resident memory and the model's tensor bytes).
Prints the ratios (goals: time <= 0.8 of sequential on a 2-core CPU, memory <= 1.1x).

    python -m benchmarks.compare_batching [--adapter assets/adapter] [--max_new_tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings
from pubmedqa.data import load_examples
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant


def _model_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (4-bit weights count at their packed size)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def memory_probe(adapter: str) -> dict[str, float]:
    """In this process: load the base (as the engine does), measure, put the adapter on it with PEFT, measure
    again. Resident memory (RSS) and the model's tensor bytes, both before and after."""
    import gc
    import os

    import psutil
    from peft import PeftModel  # imported before the first measurement: code is not model memory

    from pubmedqa.model_loading import load_base_model

    process = psutil.Process(os.getpid())
    base = load_base_model(ModelSettings(adapter="none"))
    gc.collect()
    before = {"rss_mb": process.memory_info().rss / 2**20, "tensor_mb": _model_bytes(base.model) / 2**20}
    model = PeftModel.from_pretrained(base.model, adapter, adapter_name="tuned", is_trainable=False)
    gc.collect()
    after = {"rss_mb": process.memory_info().rss / 2**20, "tensor_mb": _model_bytes(model) / 2**20}
    return {f"{k}_base": v for k, v in before.items()} | {f"{k}_with_adapter": v for k, v in after.items()}


def _memory_in_fresh_process(adapter: str) -> dict[str, float]:
    # A fresh process, so the speed runs below do not blur the measurement.
    code = f"import json; from benchmarks.compare_batching import memory_probe; print(json.dumps(memory_probe({adapter!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _time_pair(adapter: str, quantization: str, max_new_tokens: int, repeats: int) -> tuple[float, float, int]:
    """(mixed-batch seconds, sequential seconds, prompt tokens) with the base loaded in ``quantization``."""
    engine = TransformersEngine(ModelSettings(adapter=adapter, quantization=quantization))
    assert engine.load().adapter_loaded, f"no adapter loaded from {adapter}"
    example = load_examples(key="dev_examples")[0]
    # Sampling-free and no stop sequence, so both ways generate exactly the same number of tokens.
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    prompt = engine.prepare(PromptInput(example["question"], example["context"]), settings)
    engine.stop_sequences = lambda: ()  # measure full-length generations on both sides
    engine.generate(prompt, Variant.BASE, settings)  # warm-up

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    mixed = timed(lambda: engine.generate_batch([prompt, prompt], [Variant.BASE, Variant.TUNED], settings))
    sequential = timed(lambda: [engine.generate(prompt, v, settings) for v in (Variant.BASE, Variant.TUNED)])
    return mixed, sequential, prompt.n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(SHIPPED_ADAPTER_DIR))
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantizations", default="4bit,bf16,none", help="Comma-separated: each is timed in turn.")
    args = parser.parse_args()

    memory = _memory_in_fresh_process(args.adapter)
    print(f"{args.max_new_tokens} new tokens per answer, best of {args.repeats}")
    for quantization in args.quantizations.split(","):
        mixed, sequential, n_prompt = _time_pair(args.adapter, quantization, args.max_new_tokens, args.repeats)
        print(f"[{quantization}] prompt {n_prompt} tokens: mixed batch (base + fine-tuned rows in one generate) "
              f"{mixed:.2f} s, two sequential generations {sequential:.2f} s, "
              f"ratio {mixed / sequential:.2f}  (goal <= 0.8 on CPU, ~0.5 on GPU)")
    for kind, label in (("rss_mb", "process memory (RSS)"), ("tensor_mb", "model tensors")):
        base_mb, with_adapter_mb = memory[f"{kind}_base"], memory[f"{kind}_with_adapter"]
        print(f"{label} (4bit): base alone {base_mb:.0f} MB, base + adapter {with_adapter_mb:.0f} MB, "
              f"ratio {with_adapter_mb / base_mb:.3f}x  (goal <= 1.1x)")


if __name__ == "__main__":
    main()
