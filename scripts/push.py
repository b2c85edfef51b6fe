"""Upload an adapter folder (weights, config, card) to the Hugging Face Hub.

    python -m scripts.push outputs/adapter USER/pubmedqa-lora [--private]

The token comes from HF_TOKEN or the cached `huggingface-cli login`; it is never printed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from pubmedqa.adapter import CONFIG_FILE
from training.hub import HubError, hub_errors

logger = logging.getLogger("scripts.push")

# Checkpoints and optimizer states stay local: the Hub repo gets what is needed to use the adapter.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "*.pt", "*.pth", "runs/**", "*.bin.tmp"]


def push_adapter(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) the model repo and upload the adapter folder. Returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise HubError(f"{folder} is not an adapter folder (no {CONFIG_FILE})")
    api = HfApi()
    with hub_errors(f"Uploading the adapter to {repo_id}"):
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=UPLOAD_IGNORE,
            commit_message="Upload PubMedQA LoRA adapter",
        )
    logger.info("Adapter uploaded to %s", url)
    return str(url)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="adapter folder written by python -m scripts.train")
    parser.add_argument("repo_id", help="Hub model repo, e.g. USER/pubmedqa-gemma3-lora")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    args = parser.parse_args(argv)
    try:
        push_adapter(args.folder, args.repo_id, args.private)
    except HubError as exc:
        logger.error("Push failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
