"""Convert a PEFT LoRA adapter into the GGUF LoRA file that the llama.cpp engine loads.

    python -m scripts.convert_lora --adapter assets/adapter                  # writes assets/adapter/adapter_model.gguf
    python -m scripts.convert_lora --adapter user/repo --output tuned.gguf   # a Hub adapter
    python -m scripts.convert_lora --adapter DIR --base_model base.gguf      # another GGUF base model

The PEFT folder stays the source of truth: the GGUF file records the sha256 of the adapter's config and weights, and the
app uses a shipped ``adapter_model.gguf`` only while that hash matches (else it converts into its cache once). Run this
after retraining to ship the GGUF LoRA with the adapter, so the app needs no conversion at start.

The base GGUF may be a Gemma (1, 2, 3), Llama-family (``llama``: Llama, Mistral, ...) or Qwen2 model; for Llama the
B factors of the Q/K projections get llama.cpp's row permutation (``pubmedqa/gguf/lora.py``). Another
architecture is refused (exit code 2, the reason on stderr).

Exit codes: 0 written, 2 bad input (one line on stderr saying why).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pubmedqa.adapter import GGUF_FILE, Adapter, AdapterError
from pubmedqa.config import EMBEDDED_MODEL
from pubmedqa.gguf.lora import LoraConversionError, convert_adapter
from pubmedqa.gguf.source import SYNTAX, gguf_file
from pubmedqa.model_loading import ModelLoadError

logger = logging.getLogger("scripts.convert_lora")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.convert_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter: a local folder or a Hugging Face Hub repo id")
    parser.add_argument(
        "--base_model", "--base-model", default=EMBEDDED_MODEL,
        help=f"'{EMBEDDED_MODEL}' (the packaged Gemma 3 270M GGUF), the path of the base model's .gguf file, or a Hub "
        f"GGUF: {SYNTAX}",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help=f"GGUF file to write (default: <adapter folder>/{GGUF_FILE}; required for a Hub adapter)",
    )
    return parser.parse_args(argv)


def output_path(adapter: str, output: Path | None) -> Path:
    if output is not None:
        return output
    local = Path(adapter).expanduser()
    if not local.is_dir():
        # The default lies inside the adapter folder; a Hub snapshot in the HF cache is no place to write to.
        raise LoraConversionError(f"--adapter {adapter} is not a local folder: name the file to write with --output")
    return local / GGUF_FILE


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        adapter = Adapter.resolve(args.adapter)  # a wrong adapter is reported before the base model is assembled
        output = output_path(args.adapter, args.output)
        path = convert_adapter(adapter, gguf_file(args.base_model), output)
    except (LoraConversionError, AdapterError, ModelLoadError) as exc:
        logger.error("%s", exc)
        return 2
    except (RuntimeError, OSError) as exc:  # the embedded model's package is missing, the output is not writable
        logger.error("%s", exc)
        return 2
    logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
