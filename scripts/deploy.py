"""Deploy the app as a Hugging Face Space (Gradio SDK) in one command.

    python -m scripts.deploy --space_id USER/pubmedqa-chat                       # embedded model + shipped adapter
    python -m scripts.deploy --space_id USER/NAME --adapter USER/pubmedqa-lora --hardware t4-small \\
        --base_model meta-llama/Llama-2-13b-chat-hf
    python -m scripts.deploy --space_id USER/NAME --dry_run                       # what would be uploaded and set

Uploads the app's files only (never tests, caches, outputs or secrets), sets the model choice as Space
variables and prints the Space URL.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pubmedqa.adapter import CONFIG_FILE
from pubmedqa.config import PROJECT_ROOT, SHIPPED_ADAPTER_DIR
from training.hub import HubError, hub_errors

logger = logging.getLogger("scripts.deploy")

# What a Space needs to run: the entry point, the packages, the shipped assets and the pinned requirements.
ALLOW = ["app.py", "README.md", "requirements.txt", "LICENSE", "docs/**", "app/**", "pubmedqa/**", "training/**", "scripts/**",
         "assets/**"]
# Never uploaded, even inside the allowed folders.
IGNORE = [
    "**/__pycache__/**", "*.pyc", "**/.*", ".*", "*.env", "*.pem", "*.key", "**/*secret*", "**/*token*",
    "**/checkpoint-*/**", "outputs/**", "tests/**", "benchmarks/**",
]


@dataclass
class DeployPlan:
    space_id: str
    files: list[str]
    variables: dict[str, str]
    adapter_folder: Path | None  # a local adapter uploaded into the Space as assets/adapter
    private: bool
    hardware: str | None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/spaces/{self.space_id}"

    def describe(self) -> str:
        lines = [f"Space: {self.url} (sdk gradio, {'private' if self.private else 'public'}, hardware {self.hardware or 'default'})",
                 f"Files ({len(self.files)}):", *(f"  {name}" for name in self.files)]
        if self.adapter_folder:
            lines.append(f"Adapter folder {self.adapter_folder} -> assets/adapter")
        lines += ["Space variables:", *(f"  {key}={value}" for key, value in self.variables.items())]
        return "\n".join(lines)


def app_files(root: Path = PROJECT_ROOT) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    candidates = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(candidates, allow_patterns=ALLOW, ignore_patterns=IGNORE))


def plan_deployment(space_id: str, adapter: str, base_model: str, private: bool, hardware: str | None) -> DeployPlan:
    if space_id.count("/") != 1 or not all(space_id.split("/")):
        raise HubError(f"--space_id must look like USER/NAME, got {space_id!r}")
    variables = {"PUBMEDQA_BASE_MODEL": base_model, "GRADIO_SERVER_NAME": "0.0.0.0"}
    adapter_folder = None
    if adapter in ("", "shipped"):
        if not (SHIPPED_ADAPTER_DIR / CONFIG_FILE).is_file():
            logger.warning("No adapter in assets/adapter: the Space will serve the base model only")
    elif adapter == "none":
        variables["PUBMEDQA_ADAPTER"] = "none"
    elif Path(adapter).is_dir():
        if not (Path(adapter) / CONFIG_FILE).is_file():
            raise HubError(f"{adapter} is not an adapter folder (no {CONFIG_FILE})")
        adapter_folder = Path(adapter)
    else:
        variables["PUBMEDQA_ADAPTER"] = adapter  # a Hub repo id, loaded by the Space at start-up
    return DeployPlan(space_id, app_files(), variables, adapter_folder, private, hardware)


def deploy(plan: DeployPlan) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(f"Deploying {plan.space_id}"):
        api.create_repo(plan.space_id, repo_type="space", space_sdk="gradio", private=plan.private, exist_ok=True,
                        space_hardware=plan.hardware)
        for key, value in plan.variables.items():
            api.add_space_variable(plan.space_id, key, value)
        api.upload_folder(folder_path=str(PROJECT_ROOT), repo_id=plan.space_id, repo_type="space",
                          allow_patterns=ALLOW, ignore_patterns=IGNORE, commit_message="Deploy PubMedQA chatbot")
        if plan.adapter_folder:
            api.upload_folder(folder_path=str(plan.adapter_folder), path_in_repo="assets/adapter", repo_id=plan.space_id,
                              repo_type="space", ignore_patterns=IGNORE, commit_message="Add the LoRA adapter")
    logger.info("Deployed: %s", plan.url)
    return plan.url


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space_id", "--space-id", required=True, help="USER/NAME of the Space to create or update")
    parser.add_argument("--adapter", default="shipped",
                        help="'shipped' (assets/adapter), 'none', a local adapter folder or a Hub repo id")
    parser.add_argument("--base_model", "--base-model", default="embedded", help="PUBMEDQA_BASE_MODEL for the Space")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    parser.add_argument("--hardware", default=None,
                        help="Space hardware, e.g. cpu-basic (enough for the embedded model), t4-small, a10g-small")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list what would be uploaded and set")
    args = parser.parse_args(argv)
    try:
        plan = plan_deployment(args.space_id, args.adapter, args.base_model, args.private, args.hardware)
        if args.dry_run:
            print(plan.describe())  # noqa: T201 - the dry run's output is the listing itself
            return 0
        print(deploy(plan))  # noqa: T201 - the CLI's result: the Space URL
    except HubError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
