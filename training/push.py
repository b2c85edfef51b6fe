"""Upload an adapter folder (weights, config, card) to the Hugging Face Hub.

    python -m training.push outputs/adapter USER/pubmedqa-lora [--private]

The token comes from HF_TOKEN or the cached `huggingface-cli login`; it is never printed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("training.push")

# Checkpoints and optimizer states stay local: the Hub repo gets what is needed to use the adapter.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "*.pt", "*.pth", "runs/**", "*.bin.tmp"]


class PushError(RuntimeError):
    """The upload failed; the message says why in one line, without secrets."""


def push_adapter(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) the model repo and upload the adapter folder. Returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise PushError(f"{folder} is not an adapter folder (no adapter_config.json)")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=UPLOAD_IGNORE,
            commit_message="Upload PubMedQA LoRA adapter",
        )
    except LocalTokenNotFoundError:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`") from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise PushError(f"the Hub refused the upload to {repo_id} (HTTP {status}); check the repo id and the token's write access") from None
    except Exception as exc:  # network errors come from httpx and friends; their text is not shown (could hold URLs)
        raise PushError(
            f"could not reach the Hugging Face Hub ({type(exc).__name__}); check the network and the repo id"
        ) from None
    logger.info("Adapter uploaded to %s", url)
    return str(url)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="adapter folder written by python -m training.train")
    parser.add_argument("repo_id", help="Hub model repo, e.g. USER/pubmedqa-gemma3-lora")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    args = parser.parse_args(argv)
    try:
        push_adapter(args.folder, args.repo_id, args.private)
    except PushError as exc:
        logger.error("Push failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
