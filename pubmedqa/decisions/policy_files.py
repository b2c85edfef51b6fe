"""Where an adapter keeps its decision policy's files, and which of them an engine reads.

A probe reads hidden states, and each engine computes them from its own weights: the transformers engine from the
checkpoint (NF4 in 4-bit), llama.cpp from the GGUF's own quantised tensors. A probe and the offsets fitted with it
on one engine's features are therefore kept under a name for that engine (``decision_probe.llama-cpp.safetensors``)
beside the shared ones (``decision_probe.safetensors``, fitted by training on the transformers engine), which an
engine without its own pair falls back to.
"""

from __future__ import annotations

#: The engine the shared files are fitted on (training's).
SHARED_ENGINE = "transformers"


def engine_file(name: str, engine: str | None) -> str:
    """``name`` for the files fitted on ``engine``: 'decision_probe.safetensors' becomes
    'decision_probe.llama-cpp.safetensors' for 'llama.cpp'; the shared name for None or the training engine."""
    if not engine or engine == SHARED_ENGINE:
        return name
    stem, _, extension = name.partition(".")
    return f"{stem}.{engine.replace('.', '-')}.{extension}"
