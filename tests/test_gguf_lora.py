"""The PEFT -> GGUF LoRA conversion (pubmedqa/gguf/lora.py) and its CLI, on the real embedded Gemma 3 270M GGUF
and the shipped adapter; the llama.cpp load/generate check runs only where llama-cpp-python is installed."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from pubmedqa.adapter import CONFIG_FILE, GGUF_FILE, WEIGHTS_FILE, Adapter, AdapterError
from pubmedqa.embedded_model import embedded_gguf
from pubmedqa.gguf import lora as gguf_lora
from pubmedqa.gguf.lora import (
    SOURCE_HASH_KEY,
    LoraConversionError,
    adapter_source_hash,
    cached_gguf_lora,
    convert_adapter,
    read_base_gguf,
)
from scripts import convert_lora

SHIPPED_ADAPTER = Path(__file__).resolve().parent.parent / "assets" / "adapter"
LAYERS = range(10, 18)
MODULES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = "Question: Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?\nAnswer:"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def base_gguf(model_cache: Path) -> Path:
    return embedded_gguf(model_cache)


@pytest.fixture
def adapter_copy(tmp_path: Path) -> Path:
    """The shipped adapter's PEFT files only (no shipped GGUF), in a folder the test may change."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(SHIPPED_ADAPTER / name, folder / name)
    return folder


def _fields(path: Path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def _write_adapter(folder: Path, tensors: dict[str, np.ndarray], **config_changes) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((SHIPPED_ADAPTER / CONFIG_FILE).read_text()) | config_changes
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def test_embedded_gguf_is_assembled_once(model_cache: Path, base_gguf: Path) -> None:
    assert base_gguf == model_cache / "gguf" / base_gguf.name and base_gguf.stat().st_size > 200_000_000
    stamp = base_gguf.stat().st_mtime_ns
    assert embedded_gguf(model_cache) == base_gguf and base_gguf.stat().st_mtime_ns == stamp
    assert [p.name for p in base_gguf.parent.iterdir()] == [base_gguf.name]  # no staging file left behind


def test_header_reader_agrees_with_gguf_reader(base_gguf: Path) -> None:
    base = read_base_gguf(base_gguf)
    reader = gguf.GGUFReader(base_gguf)
    assert base.architecture == reader.get_field("general.architecture").contents() == "gemma3"
    assert base.block_count == reader.get_field("gemma3.block_count").contents() == 18
    assert base.tensor_shapes == {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}


def test_converts_the_shipped_adapter(tmp_path: Path, base_gguf: Path) -> None:
    output = convert_adapter(Adapter.resolve(str(SHIPPED_ADAPTER)), base_gguf, tmp_path / "lora.gguf")
    fields = _fields(output)
    assert fields["general.architecture"] == "gemma3"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(32.0)
    assert fields[SOURCE_HASH_KEY] == adapter_source_hash(SHIPPED_ADAPTER)

    tensors = {t.name: t for t in gguf.GGUFReader(output).tensors}
    assert set(tensors) == {f"blk.{layer}.{module}.weight.lora_{ab}" for layer in LAYERS for module in MODULES for ab in "ab"}
    assert len(tensors) == 8 * 7 * 2
    base_shapes = read_base_gguf(base_gguf).tensor_shapes
    for name, tensor in tensors.items():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
        in_features, out_features = base_shapes[name.rsplit(".", 1)[0]]
        expected = (in_features, 16) if name.endswith("lora_a") else (16, out_features)  # ggml order, r = 16
        assert tuple(int(n) for n in tensor.shape) == expected, name

    from safetensors.numpy import load_file

    peft = load_file(str(SHIPPED_ADAPTER / WEIGHTS_FILE))
    lora_b = peft["base_model.model.model.layers.12.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.12.attn_q.weight.lora_b"].data, lora_b.astype(np.float16))


def test_cache_key_and_reuse(tmp_path: Path, base_gguf: Path, adapter_copy: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    first = cached_gguf_lora(Adapter.resolve(str(adapter_copy)), base_gguf, cache)
    assert first == cache / "gguf-lora" / f"{adapter_source_hash(adapter_copy)[:16]}.gguf"
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_lora, "_convert", no_conversion)
    assert cached_gguf_lora(Adapter.resolve(str(adapter_copy)), base_gguf, cache) == first
    monkeypatch.undo()

    # Any change to the source files is a new key: a retrained adapter never meets a stale GGUF.
    config = json.loads((adapter_copy / CONFIG_FILE).read_text())
    (adapter_copy / CONFIG_FILE).write_text(json.dumps(config | {"lora_dropout": 0.1}))
    second = cached_gguf_lora(Adapter.resolve(str(adapter_copy)), base_gguf, cache)
    assert second != first and second.is_file() and first.is_file()


def test_shipped_gguf_is_used_without_conversion(tmp_path: Path, base_gguf: Path, monkeypatch) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted although the shipped GGUF matches")

    monkeypatch.setattr(gguf_lora, "_convert", no_conversion)
    assert cached_gguf_lora(Adapter.resolve(str(SHIPPED_ADAPTER)), base_gguf, tmp_path / "cache") == SHIPPED_ADAPTER / GGUF_FILE
    assert not (tmp_path / "cache").exists()


def test_stale_shipped_gguf_is_ignored(tmp_path: Path, base_gguf: Path, adapter_copy: Path) -> None:
    shutil.copy(SHIPPED_ADAPTER / GGUF_FILE, adapter_copy / GGUF_FILE)
    config = json.loads((adapter_copy / CONFIG_FILE).read_text())
    (adapter_copy / CONFIG_FILE).write_text(json.dumps(config | {"lora_dropout": 0.2}))  # "retrained"
    path = cached_gguf_lora(Adapter.resolve(str(adapter_copy)), base_gguf, tmp_path / "cache")
    assert path.parent == tmp_path / "cache" / "gguf-lora"
    assert _fields(path)[SOURCE_HASH_KEY] == adapter_source_hash(adapter_copy)


def test_interrupted_conversion_leaves_no_file(tmp_path: Path, base_gguf: Path, monkeypatch) -> None:
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError):
        convert_adapter(Adapter.resolve(str(SHIPPED_ADAPTER)), base_gguf, tmp_path / "lora.gguf")
    assert list(tmp_path.iterdir()) == []


def test_folder_without_config_is_refused(tmp_path: Path, base_gguf: Path) -> None:
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(AdapterError, match="not a LoRA adapter folder.*adapter_config.json"):
        convert_adapter(Adapter.resolve(str(tmp_path)), base_gguf, tmp_path / "lora.gguf")


def test_mismatched_shapes_are_refused(tmp_path: Path, base_gguf: Path) -> None:
    # An adapter trained on a model with hidden size 64 (like the tests' tiny Gemma), offered to Gemma 3 270M.
    folder = _write_adapter(tmp_path / "tiny", {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": np.zeros((16, 64), np.float32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": np.zeros((128, 16), np.float32),
    })
    with pytest.raises(LoraConversionError, match=r"do not match the base model at blk\.1\.attn_q\.weight"):
        convert_adapter(Adapter.resolve(str(folder)), base_gguf, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()


@pytest.mark.parametrize(
    ("tensor_name", "config_changes", "message"),
    [
        ("model.layers.10.self_attn.q_proj", {"use_dora": True}, "DoRA"),
        ("model.layers.10.self_attn.q_proj", {"peft_type": "IA3"}, "IA3 adapter; only LoRA"),
        ("model.layers.10.mlp.router_proj", {}, "Unknown target module"),
        ("model.layers.30.self_attn.q_proj", {}, "Unknown target module"),
    ],
)
def test_unsupported_adapters_are_refused(tmp_path: Path, base_gguf: Path, tensor_name: str, config_changes: dict,
                                          message: str) -> None:
    folder = _write_adapter(tmp_path / "adapter", {
        f"base_model.model.{tensor_name}.lora_A.weight": np.zeros((16, 640), np.float32),
        f"base_model.model.{tensor_name}.lora_B.weight": np.zeros((1024, 16), np.float32),
    }, **config_changes)
    with pytest.raises(LoraConversionError, match=message):
        convert_adapter(Adapter.resolve(str(folder)), base_gguf, tmp_path / "lora.gguf")


def test_unreadable_weights_are_refused(tmp_path: Path, base_gguf: Path, adapter_copy: Path) -> None:
    (adapter_copy / WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(LoraConversionError, match="Cannot read .*adapter_model.safetensors"):
        convert_adapter(Adapter.resolve(str(adapter_copy)), base_gguf, tmp_path / "lora.gguf")


def test_cli(tmp_path: Path, model_cache: Path, base_gguf: Path, adapter_copy: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("PUBMEDQA_CACHE_DIR", str(model_cache))  # the CLI's embedded model is the fixture's file
    assert convert_lora.main(["--adapter", str(adapter_copy)]) == 0
    assert _fields(adapter_copy / GGUF_FILE)[SOURCE_HASH_KEY] == adapter_source_hash(adapter_copy)
    assert convert_lora.main(["--adapter", str(adapter_copy), "--base_model", str(base_gguf),
                              "--output", str(tmp_path / "out.gguf")]) == 0
    assert (tmp_path / "out.gguf").is_file()

    caplog.clear()
    assert convert_lora.main(["--adapter", str(tmp_path / "missing")]) == 2
    assert convert_lora.main(["--adapter", str(tmp_path)]) == 2  # a folder, but no adapter_config.json
    assert convert_lora.main(["--adapter", str(adapter_copy), "--base_model", str(tmp_path / "none.gguf")]) == 2
    assert convert_lora.main(["--adapter", str(adapter_copy), "--base_model", str(adapter_copy / GGUF_FILE)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 4 and all("\n" not in e for e in errors)
    assert "not a LoRA adapter folder" in errors[1] and "'adapter' file, not a base model" in errors[3]


def test_llama_cpp_switches_the_lora(base_gguf: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(base_gguf), n_ctx=1024, verbose=False)

    def greedy() -> str:
        llm.reset()  # the prompt's KV entries were computed with the other adapter setting
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        return llm.create_completion(PROMPT, max_tokens=8, temperature=0.0, top_k=1)["choices"][0]["text"]

    base = greedy()
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(SHIPPED_ADAPTER / GGUF_FILE).encode())
    assert adapter, "llama.cpp refused the GGUF LoRA"
    try:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) == 0
        tuned = greedy()
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None) == 0
        restored = greedy()
    finally:
        llama_cpp.llama_adapter_lora_free(adapter)
    # The fine-tuned adapter answers with the bare decision first, as the transformers PEFT model does (" yes. ...").
    assert tuned != base and tuned.startswith(" yes")
    assert restored == base
