"""The model's state as the page shows it: one plain line for everyone (:func:`summary`) and the technical details
(:func:`details`), without a server path."""

from __future__ import annotations

import re
from pathlib import Path

from pubmedqa.engines.base import Engine, LoadState
from pubmedqa.engines.precision import plain_precision
from pubmedqa.model_loading import looks_like_path


def summary(engine: Engine) -> str:
    """The model's state in plain words, for the page's status line (the details are in :func:`details`)."""
    loaded = engine.loaded
    if engine.state is not LoadState.READY or loaded is None:
        return details(engine)
    if loaded.adapter_loaded:
        adapter = "fine-tuned adapter loaded"
    else:
        adapter = "base model only" if not engine.settings.adapter_source else "fine-tuned adapter not loaded"
    more = " · see details" if engine.notice or engine.precision_note or not loaded.adapter_loaded else ""
    return f"Ready · {short_name(loaded.description)}, {precision_in_words(loaded.quantization)} · {adapter}{more}"


def details(engine: Engine) -> str:
    """The model's state with its technical details."""
    loaded = engine.loaded
    if engine.state is LoadState.READY and loaded is not None:
        reason = engine.adapter_unavailable_reason()
        adapter = "LoRA adapter loaded" if loaded.adapter_loaded else f"no adapter ({reason})"
        if loaded.policy.status():
            adapter += f", {loaded.policy.status()}"
        notes = "".join(f" Note: {note}." for note in (engine.notice, engine.precision_note) if note)
        return f"Ready: {shown_source(loaded.description)}, {loaded.quantization}; {adapter}.{notes}"
    if engine.state is LoadState.FAILED:
        return f"Model failed to load: {engine.error}"
    if engine.state is LoadState.LOADING:
        return "Loading the model… (the first start converts the embedded model, about a minute)"
    return "The model loads on first use."


def precision_in_words(quantization: str) -> str:
    """The precision for a newcomer: '4-bit GGUF' -> 'weights compressed to 4 bits'."""
    plain = plain_precision(quantization)
    bits = re.match(r"(\d+)-bit", plain)
    if bits:
        return f"weights compressed to {bits.group(1)} bits"
    return {"bf16": "16-bit weights", "full precision": "full-precision weights"}.get(plain, plain)


def shown_source(source: str | None) -> str:
    """A model or adapter source as a public page may show it: a folder by its name only, never its server path."""
    if not source:
        return "none"
    return Path(source).name if looks_like_path(source) else source


def short_name(description: str) -> str:
    """A model's name without the parenthesised details (a folder by its name only)."""
    return shown_source(description.split(" (")[0])
