"""The llama-cpp-python internals the llama.cpp engine relies on are all there in the pinned release, and an upgrade
that drops one fails loudly at load, naming it, instead of crashing at the first decode."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
import llama_cpp._internals as llama_internals  # noqa: E402

from pubmedqa.engines.llama_cpp_native import TensorHeader, check_bindings  # noqa: E402


def test_the_pinned_llama_cpp_python_has_every_internal_the_engine_uses():
    check_bindings()
    # ggml.h: type (int, padded to 8), buffer pointer, then ne[4] at offset 16 and nb[4] at offset 48.
    assert TensorHeader.ne.offset == 16 and TensorHeader.nb.offset == 48


def test_a_missing_internal_is_named_and_the_engine_says_so_at_load(monkeypatch):
    from pubmedqa.config import ModelSettings
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
    from pubmedqa.model_loading import ModelLoadError

    monkeypatch.delattr(llama_internals.LlamaSampler, "add_dist")
    monkeypatch.delattr(llama_internals, "LlamaBatch")
    with pytest.raises(RuntimeError, match=r"LlamaSampler\.add_dist.*LlamaBatch.*requirements\.txt pins"):
        check_bindings()
    engine = LlamaCppEngine(ModelSettings(adapter="none", engine="llama.cpp"))
    with pytest.raises(ModelLoadError, match="LlamaSampler.add_dist"):
        engine.load()
