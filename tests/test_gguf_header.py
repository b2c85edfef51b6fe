"""The one GGUF header reader (``pubmedqa.gguf.header``) on small files written by gguf-py, and the header splice it
serves (``training.llama_cpp_tools.adopt_tokenizer``): a converted model takes the base GGUF's tokenizer, its tensors
unchanged."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from pubmedqa.gguf.header import read_gguf_header
from training.llama_cpp_tools import ExportError, adopt_tokenizer


def _write(path: Path, tokens: list[str], model: str, weights: np.ndarray) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_tensor("token_embd.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_reader_agrees_with_gguf_py_and_refuses_what_is_not_a_gguf(tmp_path: Path) -> None:
    weights = np.arange(4 * 3, dtype=np.float32).reshape(3, 4)  # 3 tokens x 4 dims
    path = _write(tmp_path / "m.gguf", ["a", "b", "c"], "llama", weights)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert header.values["general.architecture"] == "llama" and header.values["llama.block_count"] == 1
    assert header.values["tokenizer.ggml.tokens"] == 3  # an array: its length, not 3 Python objects
    assert header.shapes == {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors} == {
        "token_embd.weight": (4, 3)
    }
    assert header.data_start == reader.data_offset
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_header(tmp_path / "not.gguf")
    with pytest.raises(ExportError, match="not a GGUF file"):
        adopt_tokenizer(tmp_path / "not.gguf", path, tmp_path / "out.gguf")


def test_a_converted_model_takes_the_base_tokenizer_with_its_tensors_unchanged(tmp_path: Path) -> None:
    weights = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    converted = _write(tmp_path / "converted.gguf", ["x", "y", "z"], "gpt2", weights)
    base = _write(tmp_path / "base.gguf", ["<s>", "hello", "world"], "llama", np.zeros((3, 4), np.float32))
    out = adopt_tokenizer(converted, base, tmp_path / "out.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.tokens").contents() == ["<s>", "hello", "world"]
    [tensor] = reader.tensors
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(3, 4), weights)
    # A base whose vocabulary does not fit the model's embeddings is refused with a reason.
    other = _write(tmp_path / "other.gguf", ["a", "b"], "llama", np.zeros((2, 4), np.float32))
    with pytest.raises(ExportError, match="does not fit"):
        adopt_tokenizer(converted, other, tmp_path / "out2.gguf")
