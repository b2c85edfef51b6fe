"""A LoRA adapter as the engines, the decision policy and the CLIs know it: resolved once (a local folder, or a
snapshot of a Hub repo in the Hugging Face cache) and then read as files of one folder.

This module owns the adapter's file names. What reads them lives with what it is about: the PEFT weights go to
PEFT, the GGUF LoRA to ``pubmedqa.gguf.lora``, the decision probe and calibration to
``pubmedqa.decisions.policy.DecisionPolicy.from_adapter``, the training record to :attr:`Adapter.metadata`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from pubmedqa.adapter_metadata import ADAPTER_METADATA_FILE, AdapterMetadata, AdapterMetadataError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GGUF_FILE = "adapter_model.gguf"  # the GGUF LoRA shipped inside the folder, used when its hash matches the weights
PROBE_FILE = "decision_probe.safetensors"
CALIBRATION_FILE = "decision_calibration.json"
METADATA_FILE = ADAPTER_METADATA_FILE
# What a Hub snapshot fetches: the weights and everything the app reads beside them, engine-specific decision files
# (``decision_probe.llama-cpp.safetensors``) included; never checkpoints or logs.
HUB_PATTERNS = (CONFIG_FILE, WEIGHTS_FILE, GGUF_FILE, METADATA_FILE, "decision_probe*.safetensors",
                "decision_calibration*.json")


class AdapterError(ValueError):
    """The adapter named is no LoRA adapter folder and no downloadable Hub repo of one; the message says which."""


@dataclass(frozen=True)
class Adapter:
    """``source``: what the user named (a folder or a Hub repo id); ``folder``: where its files are."""

    source: str
    folder: Path

    @classmethod
    def resolve(cls, source: str, weights: bool = True) -> Adapter:
        """The adapter ``source`` names: a local folder as it is, a Hub repo id as a snapshot of its adapter files.
        ``weights=False`` accepts a folder of decision files alone (what a remote server's adapter needs here)."""
        local = Path(source).expanduser()
        if local.is_dir():
            folder = local
        elif source.startswith((".", "/", "~")) or local.exists():
            raise AdapterError(f"Adapter {source} is not a folder")
        else:
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(source, allow_patterns=list(HUB_PATTERNS)))
            except Exception as exc:  # Hub/network errors; their text can hold URLs, the class name is enough to act on
                raise AdapterError(
                    f"Adapter {source!r} is neither a local folder nor a downloadable Hub repo ({type(exc).__name__})"
                ) from exc
        if weights and not (folder / CONFIG_FILE).is_file():
            raise AdapterError(f"{source} is not a LoRA adapter folder: it has no {CONFIG_FILE}")
        return cls(source, folder)

    def file(self, name: str) -> Path | None:
        """The adapter's file ``name``, or None when it has none."""
        path = self.folder / name
        return path if path.is_file() else None

    @property
    def name(self) -> str:
        """How the adapter is named to a user: its folder's name, or the Hub repo id."""
        return Path(self.source.rstrip("/")).name if Path(self.source).expanduser().is_dir() else self.source

    @functools.cached_property
    def metadata(self) -> AdapterMetadata | None:
        """What training recorded (probe layer, prompt budget, base precision); None for an adapter trained
        elsewhere, or with unreadable metadata (logged)."""
        if self.file(METADATA_FILE) is None:
            return None
        try:
            return AdapterMetadata.load(self.folder)
        except AdapterMetadataError as exc:
            logger.warning("Ignoring the adapter's metadata: %s", exc)
            return None
