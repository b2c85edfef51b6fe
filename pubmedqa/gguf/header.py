"""A GGUF file's header: its metadata, its tensors' shapes and where each part lies in the file.

``gguf.GGUFReader`` gives the same metadata but builds a Python object for each of the 262 144 tokenizer entries,
about 10 s of CPU for Gemma 3 on every start; this walks past arrays instead (a test checks that the two agree).
The byte spans let a caller splice headers (``training.llama_cpp_tools.adopt_tokenizer``). Layout and type codes are
gguf-py's (``GGUF_MAGIC``, ``GGUFValueType``); only little-endian files are read, as llama.cpp writes them.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class GgufHeader:
    """What a GGUF file's header holds, with byte spans (offsets from the start of the file)."""

    version: int
    kv: list[tuple[str, int, int]] = field(default_factory=list)  # key, start, end of the whole entry
    values: dict[str, Any] = field(default_factory=dict)  # scalars and strings; an array's element count
    arrays: set[str] = field(default_factory=set)  # the keys whose value is an array (``values`` holds its count)
    tensor_count: int = 0
    tensors_start: int = 0
    tensors_end: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # ggml order (ne)

    @property
    def alignment(self) -> int:
        import gguf

        return int(self.values.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))

    @property
    def data_start(self) -> int:
        return -(-self.tensors_end // self.alignment) * self.alignment


def read_gguf_header(path: Path) -> GgufHeader:
    """The header of the GGUF file at ``path``. Raises OSError when it cannot be read and ValueError (or
    ``struct.error``/``UnicodeDecodeError`` on garbage) when it is not a GGUF file this reader knows."""
    import gguf
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    scalar_formats = {
        gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
        gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
        gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
        gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
    }
    with Path(path).open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        offset = 0

        def read(fmt: str) -> Any:
            nonlocal offset
            value = struct.unpack_from(fmt, data, offset)[0]
            offset += struct.calcsize(fmt)
            return value

        def read_string() -> str:
            nonlocal offset
            length = read("<Q")
            if offset + length > len(data):
                raise ValueError("string runs past the end of the file")
            offset += length
            return bytes(data[offset - length : offset]).decode("utf-8")

        def skip(value_type: int, count: int) -> None:
            nonlocal offset
            if value_type == gguf.GGUFValueType.STRING:
                for _ in range(count):
                    offset += 8 + struct.unpack_from("<Q", data, offset)[0]
            elif value_type == gguf.GGUFValueType.ARRAY:
                for _ in range(count):
                    skip(read("<I"), read("<Q"))
            else:
                offset += count * struct.calcsize(scalar_formats[gguf.GGUFValueType(value_type)])

        if read("<I") != gguf.GGUF_MAGIC:
            raise ValueError("no GGUF magic number: not a GGUF file")
        header = GgufHeader(version=read("<I"))
        if header.version not in READER_SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {header.version} (little-endian {READER_SUPPORTED_VERSIONS} expected)")
        header.tensor_count, kv_count = read("<Q"), read("<Q")
        for _ in range(kv_count):
            start = offset
            key, value_type = read_string(), read("<I")
            if value_type == gguf.GGUFValueType.STRING:
                header.values[key] = read_string()
            elif value_type == gguf.GGUFValueType.ARRAY:
                item_type, count = read("<I"), read("<Q")
                header.values[key] = count
                header.arrays.add(key)
                skip(item_type, count)
            else:
                header.values[key] = read(scalar_formats[gguf.GGUFValueType(value_type)])
            header.kv.append((key, start, offset))
        header.tensors_start = offset
        for _ in range(header.tensor_count):
            name, n_dims = read_string(), read("<I")
            header.shapes[name] = tuple(read("<Q") for _ in range(n_dims))
            offset += 4 + 8  # ggml type, offset into the data section (relative, so it survives a splice)
        header.tensors_end = offset
        if offset > len(data):
            raise ValueError("header runs past the end of the file")
    return header
