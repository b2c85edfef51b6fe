"""A PEFT LoRA adapter as a GGUF LoRA file, the form llama.cpp's ``llama_adapter_lora_init`` loads, derived from the
PEFT folder (the one source of truth) and cached under a hash of its two files, so a retrained adapter is never
served with stale weights.

It writes what llama.cpp's ``convert_lora_to_gguf.py --outtype f16`` writes (the same tensor names, shapes, dtypes and
values: for the shipped adapter all 112 tensors are byte for byte the upstream script's, docs/export.md). The
upstream script is not called because the conversion runs where the adapter is served: offline (a Space, CI) and next to a GGUF base alone, while the script
needs the base's transformers config (a ``--base`` folder, or a Hub download) and ships only in llama.cpp's source,
which pip does not install. So the architecture and shapes come from the base GGUF's header, every tensor is checked
against them (a wrong adapter fails with one :class:`LoraConversionError`, not a C++ error at load time), and only the
architectures whose linear weights llama.cpp stores as transformers does, or permutes in a known way, are converted:
``gemma``, ``gemma2``, ``gemma3``, ``qwen2`` and ``llama`` (derivation: docs/export.md, "How the GGUF LoRA is
derived"); any other is refused in one line and the engine serves the base model alone, saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pubmedqa.adapter import CONFIG_FILE, GGUF_FILE, WEIGHTS_FILE, Adapter
from pubmedqa.gguf.header import GgufHeader, read_gguf_header

logger = logging.getLogger(__name__)

CACHE_SUBDIR = "gguf-lora"
SOURCE_HASH_KEY = "pubmedqa.adapter_sha256"

# llama.cpp's converter writes the linear weights of these unchanged (see the module docstring).
UNCHANGED_WEIGHT_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "qwen2"})
# ... and permutes the rows of the Q and K projections of these (LlamaModel.permute, see the module docstring).
PERMUTED_QK_ARCHITECTURES = frozenset({"llama"})
SUPPORTED_ARCHITECTURES = UNCHANGED_WEIGHT_ARCHITECTURES | PERMUTED_QK_ARCHITECTURES

# PEFT options that change the forward pass in a way a plain llama.cpp LoRA (W + alpha/r * B A) cannot express.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}

# The reference converter drops the tensors of a multimodal model's non-text towers; the text GGUF has none of them.
_NON_TEXT_MARKERS = ("vision_tower", "vision_model", "multi_modal_projector", "audio_tower", "embed_vision", "embed_audio")

_LORA_NAME = re.compile(r"^(?P<base>.+)\.lora_(?P<which>[AB])\.weight$")


class LoraConversionError(ValueError):
    """The adapter cannot be turned into a GGUF LoRA for this base model; the message says why, in one line."""


@dataclass(frozen=True)
class BaseGGUF:
    """What the conversion needs to know about the base model, read from its GGUF file."""

    path: Path
    architecture: str
    block_count: int
    tensor_shapes: dict[str, tuple[int, ...]]  # ggml order (ne): a linear weight is (in_features, out_features)
    # Attention heads (None where the header has no single number: absent, or one per layer); what the Q/K permutation
    # of the llama architecture needs. llama.cpp takes n_head_kv = n_head when the key is absent.
    head_count: int | None = None
    head_count_kv: int | None = None


def read_base_gguf(base_gguf: Path) -> BaseGGUF:
    import gguf

    try:
        header = read_gguf_header(Path(base_gguf))
    except FileNotFoundError as exc:
        raise LoraConversionError(f"Base GGUF file {base_gguf} does not exist") from exc
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise LoraConversionError(f"{base_gguf} is not a readable GGUF model file ({type(exc).__name__}: {exc})") from exc
    general_type = header.values.get(gguf.Keys.General.TYPE, "model")
    if general_type != "model":
        raise LoraConversionError(f"{base_gguf} is a GGUF {general_type!r} file, not a base model")
    architecture = header.values.get(gguf.Keys.General.ARCHITECTURE)
    block_count = header.values.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture))
    if not isinstance(architecture, str) or not isinstance(block_count, int):
        raise LoraConversionError(f"{base_gguf} names no architecture and block count; is it a GGUF model file?")
    head_count = _scalar_int(header, gguf.Keys.Attention.HEAD_COUNT.format(arch=architecture))
    head_count_kv_key = gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=architecture)
    head_count_kv = _scalar_int(header, head_count_kv_key) if head_count_kv_key in header.values else head_count
    return BaseGGUF(Path(base_gguf), architecture, block_count, header.shapes, head_count, head_count_kv)


def _scalar_int(header: GgufHeader, key: str) -> int | None:
    """The integer under ``key``, or None when it is absent or an array (one value per layer)."""
    value = header.values.get(key)
    if key in header.arrays or isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def adapter_source_hash(adapter_dir: Path) -> str:
    """sha256 over the adapter's config and weights: the identity of what a GGUF LoRA was converted from."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = adapter_dir / name
        try:
            size = path.stat().st_size
            # The name and length go in first, so no split of the same bytes across the two files hashes alike.
            digest.update(f"{name}\0{size}\0".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise LoraConversionError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def convert_adapter(adapter: Adapter, base_gguf: Path, output: Path) -> Path:
    """Convert the PEFT LoRA ``adapter`` into a GGUF LoRA file at ``output`` for ``base_gguf``."""
    return _convert(adapter, read_base_gguf(base_gguf), Path(output), adapter_source_hash(adapter.folder))


def adapter_target_tensors(adapter: Adapter, base_gguf: Path) -> list[str]:
    """The GGUF names of the base model's tensors that the adapter changes (``blk.10.attn_q.weight``, ...), checked
    against the base's shapes as a conversion checks them; raises :class:`LoraConversionError` where a conversion
    would."""
    config = _read_config(adapter.folder)
    return sorted(_lora_pairs(_read_weights(adapter.folder), read_base_gguf(base_gguf), config))


def cached_gguf_lora(adapter: Adapter, base_gguf: Path, cache_dir: str | Path) -> Path:
    """The GGUF LoRA of ``adapter`` for ``base_gguf``: the one shipped in the adapter folder when it was converted from
    these very files, else ``<cache_dir>/gguf-lora/<hash>.gguf``, converted on first use."""
    source_hash = adapter_source_hash(adapter.folder)
    base = read_base_gguf(base_gguf)
    shipped = adapter.file(GGUF_FILE)
    if shipped is not None:
        if _usable(shipped, source_hash, base):
            logger.info("Using the GGUF LoRA shipped with the adapter: %s", shipped)
            return shipped
        logger.info("%s was not converted from this adapter's weights (or not for this base); converting anew", shipped)
    target = Path(cache_dir) / CACHE_SUBDIR / f"{source_hash[:16]}.gguf"
    if target.is_file() and _usable(target, source_hash, base):
        return target
    logger.info("Converting adapter %s into a GGUF LoRA (once): %s", adapter.source, target)
    return _convert(adapter, base, target, source_hash)


def _usable(path: Path, source_hash: str, base: BaseGGUF) -> bool:
    """Whether an existing GGUF LoRA was converted from these adapter files and fits this base model."""
    import gguf

    try:
        header = read_gguf_header(path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:  # a damaged file is simply converted again
        logger.warning("Ignoring unreadable GGUF LoRA %s (%s)", path, type(exc).__name__)
        return False
    if header.values.get(SOURCE_HASH_KEY) != source_hash:
        return False
    if header.values.get(gguf.Keys.General.ARCHITECTURE) != base.architecture:
        return False
    for name, a_shape in header.shapes.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        b_shape = header.shapes.get(target + ".lora_b")
        base_shape = base.tensor_shapes.get(target)
        if b_shape is None or base_shape is None or (a_shape[0], b_shape[1]) != base_shape[:2]:
            return False
    return True


def _convert(adapter: Adapter, base: BaseGGUF, output: Path, source_hash: str) -> Path:
    import gguf

    if base.architecture not in SUPPORTED_ARCHITECTURES:
        raise LoraConversionError(
            f"Base model architecture {base.architecture!r} is not supported for LoRA conversion "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    config = _read_config(adapter.folder)
    alpha = _lora_alpha(config)
    tensors = _read_weights(adapter.folder)
    pairs = _to_gguf_layout(_lora_pairs(tensors, base, config), base)
    alpha = _effective_alpha(config, alpha, pairs)

    output.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path=None, arch=base.architecture)
    # Same keys as the reference converter's LoraModel (set_type / set_gguf_parameters), plus the source hash.
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # The source's own name: a Hub snapshot folder is named after a commit hash.
    writer.add_name(adapter.name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    invocation_tokens = config.get("alora_invocation_tokens")
    if invocation_tokens:
        writer.add_key_value(
            gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in invocation_tokens],
            gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32,
        )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(SOURCE_HASH_KEY, source_hash)
    for name, (lora_a, lora_b) in pairs.items():
        # --outtype f16: the reference casts every 2-D LoRA tensor to F16 (gguf.quants.quantize(data, F16)).
        writer.add_tensor(name + ".lora_a", lora_a.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        writer.add_tensor(name + ".lora_b", lora_b.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)

    # A half-written file under the final name would pass for a finished conversion on the next start.
    fd, staging_name = tempfile.mkstemp(prefix=f".{output.name}-", suffix=".partial", dir=output.parent)
    os.close(fd)
    staging = Path(staging_name)
    try:
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(staging, 0o644)  # mkstemp creates it private; the cache and shipped file are ordinary files
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    logger.info("Wrote GGUF LoRA %s (%d tensors, alpha %g)", output, 2 * len(pairs), alpha)
    return output


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise LoraConversionError(f"{adapter_dir} is not a LoRA adapter folder: it has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraConversionError(f"Cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise LoraConversionError(f"{path} does not hold a PEFT adapter config (a JSON object)")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LoraConversionError(f"{adapter_dir} is a {peft_type or 'non-PEFT'} adapter; only LoRA converts to GGUF")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise LoraConversionError(f"{adapter_dir} uses {what}, which llama.cpp LoRA adapters do not support")
    if config.get("bias", "none") != "none":
        raise LoraConversionError(f"{adapter_dir} trains biases (bias={config['bias']!r}); llama.cpp LoRA has no biases")
    if config.get("alora_invocation_tokens") is None and config.get("invocation_string"):
        raise LoraConversionError(
            f"{adapter_dir} is an aLoRA with only an invocation_string; set alora_invocation_tokens in {CONFIG_FILE}"
        )
    return config


def _lora_alpha(config: dict[str, Any]) -> float:
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraConversionError(f"{CONFIG_FILE} has no valid lora_alpha (got {alpha!r})")
    # llama.cpp has one alpha per adapter (and uses alpha / rank of each tensor, as PEFT does with rank_pattern).
    if any(float(v) != float(alpha) for v in (config.get("alpha_pattern") or {}).values()):
        raise LoraConversionError("The adapter sets per-module alphas (alpha_pattern); llama.cpp has one alpha per adapter")
    return float(alpha)


def _effective_alpha(config: dict[str, Any], alpha: float, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
    if not config.get("use_rslora"):
        return alpha
    # rsLoRA scales by alpha / sqrt(r) where llama.cpp scales by alpha / r; with one rank the alpha can absorb it.
    ranks = {b.shape[1] for _, b in pairs.values()}
    if len(ranks) != 1:
        raise LoraConversionError("The adapter uses rsLoRA with several ranks; llama.cpp cannot express that scaling")
    return alpha * math.sqrt(ranks.pop())


def _read_weights(adapter_dir: Path) -> dict[str, np.ndarray]:
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        other = " (adapter_model.bin is not read: save the adapter with safetensors)" if (
            adapter_dir / "adapter_model.bin").is_file() else ""
        raise LoraConversionError(f"{adapter_dir} has no {WEIGHTS_FILE}{other}")
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = list(handle.keys())
            bf16 = [n for n in names if handle.get_slice(n).get_dtype() == "BF16"]
            for name in names:
                if name not in bf16:
                    tensors[name] = np.asarray(handle.get_tensor(name), dtype=np.float32)
        if bf16:  # numpy has no bfloat16; torch reads it (and is installed wherever PEFT trained the adapter)
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
            for name in bf16:
                tensors[name] = loaded[name].float().numpy()
    except Exception as exc:  # SafetensorError, OSError, a header that lies about sizes
        raise LoraConversionError(f"Cannot read {path} ({type(exc).__name__}: {exc})") from exc
    # The reference iterates the file's tensors in this order; keeping it keeps the two outputs tensor-for-tensor equal.
    return {name: tensors[name] for name in names}


def _hf_name(peft_name: str) -> str:
    """The base model's transformers tensor name for a PEFT tensor name (as the reference's get_base_tensor_name and
    TextModel.filter_tensors derive it)."""
    name = peft_name.replace("base_model.model.", "", 1)
    return name.replace("language_model.", "")


def _lora_pairs(
    tensors: dict[str, np.ndarray], base: BaseGGUF, config: dict[str, Any]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF base tensor name -> (lora_a (r, in), lora_b (out, r)), checked against the base's shapes."""
    import gguf

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == base.architecture), None)
    if arch is None:  # a GGUF written by a newer llama.cpp than the installed gguf-py knows
        raise LoraConversionError(
            f"Base model architecture {base.architecture!r} is unknown to the installed gguf package {_gguf_version()}"
        )
    name_map = gguf.get_tensor_name_map(arch, base.block_count)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for peft_name, data in tensors.items():
        match = _LORA_NAME.match(peft_name)
        if match is None:
            if "lora_embedding_" in peft_name or "embed_tokens" in peft_name or "lm_head" in peft_name:
                raise LoraConversionError(
                    f"The adapter trains the embeddings ({peft_name}); only LoRA on linear layers is supported"
                )
            raise LoraConversionError(f"Unexpected tensor {peft_name!r} in {WEIGHTS_FILE}: not a lora_A or lora_B weight")
        hf_name = _hf_name(match["base"])
        if any(marker in hf_name for marker in _NON_TEXT_MARKERS):
            logger.warning("Skipping %s: the GGUF base model is text only", peft_name)
            continue
        gguf_name = name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            modules = ", ".join(config.get("target_modules") or []) if isinstance(config.get("target_modules"), list) else config.get("target_modules")
            raise LoraConversionError(
                f"Unknown target module {match['base']!r} for a {base.architecture} base model "
                f"(target_modules: {modules}); is the adapter for another architecture?"
            )
        if gguf_name in ("token_embd.weight", "output.weight"):
            raise LoraConversionError(f"The adapter trains {hf_name} (embeddings/LM head); only LoRA on linear layers is supported")
        if data.ndim != 2:
            raise LoraConversionError(f"{peft_name} has shape {list(data.shape)}; LoRA factors are matrices")
        halves.setdefault(gguf_name, {})[match["which"]] = data

    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for gguf_name, half in halves.items():
        if set(half) != {"A", "B"}:
            raise LoraConversionError(f"{WEIGHTS_FILE} has only lora_{''.join(half)} for {gguf_name}")
        lora_a, lora_b = half["A"], half["B"]
        base_shape = base.tensor_shapes.get(gguf_name)
        if base_shape is None:
            raise LoraConversionError(
                f"The base model has no tensor {gguf_name} that the adapter trains; is the adapter for another "
                f"base model (this one: {base.architecture}, {base.block_count} layers)?"
            )
        # ggml's ne is (in_features, out_features); the same checks llama_adapter_lora_init makes, said earlier.
        in_features, out_features = base_shape[0], base_shape[1]
        if lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
            raise LoraConversionError(
                f"Adapter shapes do not match the base model at {gguf_name}: lora_A {list(lora_a.shape)}, lora_B "
                f"{list(lora_b.shape)}, expected [r, {in_features}] and [{out_features}, r]; is the adapter for "
                "another base model?"
            )
        pairs[gguf_name] = (lora_a, lora_b)
    if not pairs:
        raise LoraConversionError(f"{WEIGHTS_FILE} holds no LoRA weights for the text model")
    return pairs


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (``convert_hf_to_gguf.py``), in numpy: the rows of each head reordered from
    transformers' RoPE layout (two halves) to llama.cpp's NORM rope layout (adjacent pairs). Applied to a LoRA B it
    is what the reference's ``LoraTorchTensor`` makes of the same call (see the module docstring)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _to_gguf_layout(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]], base: BaseGGUF
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The LoRA factors laid out as llama.cpp's converter lays out the base weights they change: unchanged, or (llama)
    with B's rows permuted where the converter permutes the rows of the Q/K weight."""
    if base.architecture not in PERMUTED_QK_ARCHITECTURES:
        return pairs
    converted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (lora_a, lora_b) in pairs.items():
        heads = _qk_heads(name, base)
        converted[name] = (lora_a, lora_b if heads is None else _permuted_b(name, lora_b, base, *heads))
    return converted


def _qk_heads(gguf_name: str, base: BaseGGUF) -> tuple[int | None, int | None] | None:
    """The (n_head, n_head_kv) arguments the converter's ``LlamaModel.modify_tensors`` permutes this tensor with:
    (n_head, n_head) for a Q projection, (n_head, n_head_kv) for a K projection, None for any other tensor."""
    import gguf

    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    block = int(parts[1])
    if gguf_name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_Q].format(bid=block) + ".weight":
        return base.head_count, base.head_count
    if gguf_name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_K].format(bid=block) + ".weight":
        return base.head_count, base.head_count_kv
    return None


def _permuted_b(name: str, lora_b: np.ndarray, base: BaseGGUF, n_head: int | None, n_head_kv: int | None) -> np.ndarray:
    if not n_head or not n_head_kv:
        raise LoraConversionError(
            f"{base.path.name} gives no single attention head count ({base.architecture}.attention.head_count / "
            "head_count_kv missing or per layer), which the Q/K permutation of a llama LoRA needs"
        )
    groups = n_head_kv if n_head != n_head_kv else n_head  # the head count llama_permute splits the rows into
    if lora_b.shape[0] % (2 * groups):
        raise LoraConversionError(
            f"{name} has {lora_b.shape[0]} rows, not {groups} heads of an even size; llama.cpp's Q/K permutation "
            "cannot apply (is the base GGUF's head count right?)"
        )
    return np.ascontiguousarray(llama_permute(lora_b, n_head, n_head_kv))


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"
