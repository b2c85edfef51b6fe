"""What training records in an adapter folder for the code that serves or refits it, so that nothing is recomputed
from the weights: the layer the decision probe reads, the prompt budget its features were read at, and the base
precision the adapter was trained on."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_METADATA_FILE = "pubmedqa_adapter.json"


class AdapterMetadataError(ValueError):
    """An adapter folder whose metadata is missing or unreadable, for a command that needs it."""


@dataclass(frozen=True)
class AdapterMetadata:
    #: Decoder layers below the LoRA: the decision probe reads the output of layer ``probe_layer - 1``, which the
    #: adapter leaves as the base model's. None when LoRA trains every layer (no probe).
    probe_layer: int | None
    #: Tokens each prompt was fitted to when the probe's features were read (the app's ``--max_input_tokens``).
    prompt_budget: int
    #: The base weights' precision during training ('none' = float32, '4bit', …): serve the adapter on the same.
    base_quantization: str

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ADAPTER_METADATA_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> AdapterMetadata:
        path = Path(directory).expanduser() / ADAPTER_METADATA_FILE
        if not path.is_file():
            raise AdapterMetadataError(
                f"{directory} has no {ADAPTER_METADATA_FILE}: it was not written by `python -m scripts.train`, "
                "which records the probe's layer and prompt budget there"
            )
        try:
            data = json.loads(path.read_text())
            layer = data["probe_layer"]
            return cls(
                None if layer is None else int(layer), int(data["prompt_budget"]), str(data["base_quantization"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterMetadataError(f"{path} is not readable adapter metadata ({type(exc).__name__}: {exc})") from exc
