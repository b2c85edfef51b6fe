"""llama.cpp's own tools for ``python -m scripts.export --format gguf``: its ``convert_hf_to_gguf.py`` (a transformers
checkpoint into an f16 GGUF) and its quantiser (``llama_model_quantize``, through llama-cpp-python).

pip installs llama-cpp-python without llama.cpp's Python scripts, but its source distribution carries them (with the
matching ``gguf-py``) under ``vendor/llama.cpp/``: the converter of the very llama.cpp version the engine runs. It is
taken, in this order, from ``--llama_cpp_dir`` (a llama.cpp checkout, an unpacked sdist or the sdist ``.tar.gz``), from
the cache folder, or from that sdist fetched once with ``pip download`` (offline from pip's cache when it is there) and
unpacked into the cache.

The embedded base model comes from a GGUF file, so its transformers checkpoint carries a ``tokenizer.json`` but no
SentencePiece ``tokenizer.model``; from that the converter writes a BPE ("gpt2") vocabulary. :func:`adopt_tokenizer`
puts the base GGUF's own tokenizer back (the same SentencePiece vocabulary, scores and special tokens the app's
llama.cpp engine uses), by copying header bytes, never re-encoding the tensors.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

from pubmedqa.gguf.header import GgufHeader, read_gguf_header

logger = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
VENDOR_DIR = "vendor/llama.cpp"
# What the converter needs from the llama.cpp tree: the script, its model classes and the gguf-py of the same commit.
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py", "LICENSE")
TOKENIZER_PREFIX = "tokenizer."

# --quant -> llama.cpp's file type (llama-cpp-python's constant names). f16 is the converter's own output.
QUANT_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16"}


class ExportError(RuntimeError):
    """An export step cannot go on; the message says why (and what to do) in one line."""


def llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError("--format gguf needs llama-cpp-python: pip install -r requirements.txt") from exc
    return str(llama_cpp.__version__)


def how_to_get_converter(version: str) -> str:
    return (
        f"llama.cpp's {CONVERTER} was not found: pass --llama_cpp_dir with the llama-cpp-python=={version} source "
        f"(`pip download llama-cpp-python=={version} --no-deps --no-binary :all:` gives the .tar.gz) or a llama.cpp "
        "checkout (git clone https://github.com/ggml-org/llama.cpp)"
    )


def find_converter(llama_cpp_dir: str, cache_dir: str | Path) -> Path:
    """Path of ``convert_hf_to_gguf.py`` (see the module docstring for where it is looked for)."""
    version = llama_cpp_version()
    if llama_cpp_dir:
        source = Path(llama_cpp_dir).expanduser()
        if source.is_file() and source.name.endswith((".tar.gz", ".tgz")):
            return _unpack_sdist(source, Path(cache_dir) / f"llama.cpp-{_sdist_version(source) or 'local'}")
        for candidate in (source / CONVERTER, source / VENDOR_DIR / CONVERTER):
            if candidate.is_file():
                return candidate
        raise ExportError(f"--llama_cpp_dir {source} holds no {CONVERTER} (nor {VENDOR_DIR}/{CONVERTER}); "
                          + how_to_get_converter(version))
    cached = Path(cache_dir) / f"llama.cpp-{version}" / CONVERTER
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as download_dir:
        sdist = _pip_download_sdist(version, Path(download_dir))
        if sdist is None:
            raise ExportError(how_to_get_converter(version))
        return _unpack_sdist(sdist, cached.parent)


def _sdist_version(path: Path) -> str | None:
    name = path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    return name.rsplit("-", 1)[1] if "-" in name else None


def _pip_download_sdist(version: str, target: Path) -> Path | None:
    """The llama-cpp-python sdist of ``version``, fetched by pip (from its cache when there), or None."""
    logger.info("Fetching llama.cpp's converter: pip download llama-cpp-python==%s (source, once; ~75 MB)", version)
    command = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
               "--no-binary", ":all:", "--disable-pip-version-check", "--quiet", "-d", str(target)]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("pip download failed (%s)", type(exc).__name__)
        return None
    found = sorted(target.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        last = (done.stderr or done.stdout).strip().splitlines()
        logger.warning("pip download failed: %s", last[-1] if last else f"exit {done.returncode}")
        return None
    return found[0]


def _unpack_sdist(sdist: Path, target: Path) -> Path:
    """Unpack the converter's parts of the sdist's ``vendor/llama.cpp`` into ``target`` (all or nothing)."""
    if (target / CONVERTER).is_file():
        return target / CONVERTER
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".partial", dir=target.parent))
    try:
        with tarfile.open(sdist) as archive:
            members = []
            for member in archive.getmembers():
                _, _, inside = member.name.partition(f"/{VENDOR_DIR}/")
                if inside and inside.split("/", 1)[0] in CONVERTER_PARTS:
                    member.name = inside
                    members.append(member)
            if not any(m.name == CONVERTER for m in members):
                raise ExportError(f"{sdist} has no {VENDOR_DIR}/{CONVERTER}; is it the llama-cpp-python source?")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            archive.extractall(staging, members=members, **safe)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; it is an ordinary cache folder
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except (tarfile.TarError, EOFError) as exc:
        raise ExportError(f"Cannot unpack {sdist} ({type(exc).__name__}: {exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("llama.cpp's converter unpacked into %s", target)
    return target / CONVERTER


def run_converter(converter: Path, checkpoint: Path, output: Path, outtype: str = "f16") -> Path:
    """Run ``convert_hf_to_gguf.py`` on a transformers checkpoint; its log and progress bar go to stderr as they
    come, and a failure is reported with the converter's last error line."""
    command = [sys.executable, str(converter), str(checkpoint), "--outfile", str(output), "--outtype", outtype]
    logger.info("Converting %s into a %s GGUF with llama.cpp's %s", checkpoint.name, outtype, CONVERTER)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py next to it, of its own commit
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    except OSError as exc:
        raise ExportError(f"Cannot run {converter}: {exc.strerror or exc}") from exc
    assert process.stdout is not None
    pending = ""
    with process:
        for chunk in iter(lambda: os.read(process.stdout.fileno(), 65536), b""):
            text = chunk.decode("utf-8", errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            pending += text
            *lines, pending = pending.replace("\r", "\n").split("\n")
            tail.extend(line for line in lines if line.strip())
    if pending.strip():
        tail.append(pending)
    if process.returncode != 0 or not output.is_file():
        errors = [line for line in tail if "error" in line.lower() or "exception" in line.lower()]
        reason = (errors or list(tail) or [f"exit code {process.returncode}"])[-1].strip()
        raise ExportError(f"llama.cpp's {CONVERTER} failed on {checkpoint.name}: {reason}")
    return output


# ------------------------------------------------------------------------------------------- GGUF header splice
def _read_header(path: Path) -> GgufHeader:
    try:
        return read_gguf_header(path)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not a GGUF file this can read ({exc})") from exc


def adopt_tokenizer(converted: Path, base_gguf: Path, output: Path) -> Path:
    """``converted`` with its ``tokenizer.*`` metadata replaced by ``base_gguf``'s, written to ``output``: the
    converter's header and tensor data byte for byte, only the tokenizer keys swapped."""
    import gguf
    from tqdm.auto import tqdm

    ours, base = _read_header(converted), _read_header(base_gguf)
    tokens = base.values.get(gguf.Keys.Tokenizer.LIST)
    embedding = ours.shapes.get("token_embd.weight")
    if not isinstance(tokens, int) or embedding is None or embedding[1] != tokens:
        raise ExportError(
            f"The base GGUF's tokenizer ({tokens} tokens) does not fit the converted model's embeddings "
            f"({embedding[1] if embedding else 'none'} rows); is --base_model the model the adapter was trained on?"
        )
    kept = [(key, start, end) for key, start, end in ours.kv if not key.startswith(TOKENIZER_PREFIX)]
    adopted = [(key, start, end) for key, start, end in base.kv if key.startswith(TOKENIZER_PREFIX)]
    data_size = converted.stat().st_size - ours.data_start
    with converted.open("rb") as src, base_gguf.open("rb") as tok, output.open("wb") as dst:
        dst.write(struct.pack("<IIQQ", gguf.GGUF_MAGIC, ours.version, ours.tensor_count, len(kept) + len(adopted)))
        for handle, spans in ((src, kept), (tok, adopted)):
            for _, start, end in spans:
                handle.seek(start)
                dst.write(handle.read(end - start))
        src.seek(ours.tensors_start)
        dst.write(src.read(ours.tensors_end - ours.tensors_start))
        dst.write(b"\0" * (-dst.tell() % ours.alignment))  # the data section starts aligned, as in the source
        src.seek(ours.data_start)
        with tqdm(total=data_size, unit="B", unit_scale=True, desc="Writing GGUF (base tokenizer)") as bar:
            for block in iter(lambda: src.read(1 << 24), b""):
                dst.write(block)
                bar.update(len(block))
    written = _read_header(output)
    if written.shapes != ours.shapes or written.values.get(gguf.Keys.Tokenizer.LIST) != tokens:
        raise ExportError(f"{output} did not come out as written; not using it")
    return output


# ------------------------------------------------------------------------------------------------- quantisation
def quantize(source: Path, output: Path, quant: str, threads: int | None = None,
             tensor_types: dict[str, str] | None = None) -> Path:
    """``source`` (an f16/f32 GGUF) quantised to ``quant`` by llama.cpp's ``llama_model_quantize``, with a progress
    bar on the bytes written. ``tensor_types`` (GGUF tensor name -> type, e.g. ``q8_0``) overrides the type of those
    tensors, as ``llama-quantize --tensor-type`` does."""
    import gguf
    import llama_cpp
    from tqdm.auto import tqdm

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = threads or os.cpu_count() or 1
    overrides = sorted((tensor_types or {}).items())
    # A NULL-terminated array of (regex, ggml type); the pattern bytes must outlive the call.
    patterns = [f"^{re.escape(name)}$".encode() for name, _ in overrides]
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for row, pattern, (_, type_name) in zip(table, patterns, overrides):
        row.pattern, row.type = pattern, int(gguf.GGMLQuantizationType[type_name.upper()])
    if overrides:
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    result: list[int] = []
    failure: list[BaseException] = []
    log: list[str] = []

    # llama.cpp logs a line per tensor (and one per fallback or override); they are kept, summed up below, and the
    # last error line is the failure's message. The bar says how far it is.
    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        log.append(text.decode("utf-8", errors="replace"))

    def run() -> None:
        try:
            paths = str(source).encode(), str(output).encode()
            result.append(llama_cpp.llama_model_quantize(*paths, ctypes.byref(params)))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            failure.append(exc)

    logger.info("Quantising %s to %s with llama.cpp (%d threads%s)", source.name, quant.upper(), params.nthread,
                f"; {len(overrides)} tensors as {', '.join(sorted({t for _, t in overrides}))}" if overrides else "")
    worker = threading.Thread(target=run, name="llama-quantize", daemon=True)
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        worker.start()
        with tqdm(unit="B", unit_scale=True, desc=f"Quantising to {quant.upper()}") as bar:
            while worker.is_alive():
                worker.join(0.5)
                bar.update(max(0, (output.stat().st_size if output.exists() else 0) - bar.n))
    finally:
        worker.join()
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if failure:
        raise failure[0]
    lines = [line.strip() for line in "".join(log).splitlines() if line.strip()]
    if result != [0] or not output.is_file():
        errors = [line for line in lines if re.search(r"error|failed|exception", line, re.IGNORECASE)]
        reason = (errors or lines or [f"llama_model_quantize returned {result[0] if result else '?'}"])[-1]
        raise ExportError(f"llama.cpp could not quantise {source.name} to {quant}: {reason}")
    fallbacks = sum("falling back" in line for line in lines)
    if fallbacks:
        logger.info("llama.cpp quantised %d tensors to a fallback type (rows not a multiple of the block size)",
                    fallbacks)
    return output
