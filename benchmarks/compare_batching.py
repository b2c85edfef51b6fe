"""Benchmark: the Compare tab's pair of answers as ONE mixed-adapter batch (PEFT adapter_names) vs two sequential
generations, same question, settings and seed; and process memory with base + adapter loaded vs base alone.
Prints the ratios (goals: time <= 0.8 of sequential on a 2-core CPU, memory <= 1.1x).

    python -m benchmarks.compare_batching [--adapter assets/adapter] [--max_new_tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from app.config import SHIPPED_ADAPTER_DIR, ModelSettings
from app.prompts import PromptInput
from app.pubmedqa import load_examples
from app.registry import GenerationSettings, ModelRegistry, Variant


def _loaded_rss_mb(adapter: str) -> float:
    """Resident memory of a fresh process that has loaded the registry's model (freed memory is not always given
    back to the OS, so each configuration is measured in its own process)."""
    code = (
        "import os, psutil; from app.config import ModelSettings; from app.registry import ModelRegistry; "
        f"ModelRegistry(ModelSettings(adapter={adapter!r})).load(); "
        "print(psutil.Process(os.getpid()).memory_info().rss / 2**20)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(SHIPPED_ADAPTER_DIR))
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base_mb, with_adapter_mb = _loaded_rss_mb("none"), _loaded_rss_mb(args.adapter)
    registry = ModelRegistry(ModelSettings(adapter=args.adapter))
    assert registry.load().adapter_loaded, f"no adapter loaded from {args.adapter}"

    example = load_examples(key="dev_examples")[0]
    # Sampling-free and no stop sequence, so both ways generate exactly the same number of tokens.
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    prompt = registry.prepare(PromptInput(example["question"], example["context"]), settings)
    registry._stops = lambda loaded: ()  # noqa: SLF001 - measure full-length generations on both sides
    registry.generate(prompt, Variant.BASE, settings)  # warm-up

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    mixed = timed(lambda: registry.generate_batch([prompt, prompt], [Variant.BASE, Variant.TUNED], settings))
    sequential = timed(lambda: [registry.generate(prompt, v, settings) for v in (Variant.BASE, Variant.TUNED)])
    print(f"prompt {prompt.n_tokens} tokens, {args.max_new_tokens} new tokens per answer, best of {args.repeats}")
    print(f"mixed batch (base + fine-tuned rows in one generate): {mixed:6.2f} s")
    print(f"two sequential generations:                           {sequential:6.2f} s")
    print(f"time ratio mixed / sequential: {mixed / sequential:.2f}  (goal <= 0.8 on CPU, ~0.5 on GPU)")
    print(f"process memory: base alone {base_mb:.0f} MB, base + adapter {with_adapter_mb:.0f} MB, "
          f"ratio {with_adapter_mb / base_mb:.2f}x  (goal <= 1.1x)")


if __name__ == "__main__":
    main()
