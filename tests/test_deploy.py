"""Space deployment: what is uploaded (app files only, never tests, caches, outputs or secrets), the Space front
matter, and a clear error without network."""

from __future__ import annotations

import re

import gradio
import yaml

from scripts import deploy
from tests.conftest import REPO_ROOT


def test_upload_list_holds_the_app_and_never_tests_caches_outputs_or_secrets(tmp_path):
    for name in [
        "app.py", "README.md", "requirements.txt", "pubmedqa/engines/base.py", "app/ui/chat_tab.py",
        "docs/security.md", "assets/examples.json", "assets/adapter/adapter_config.json", "scripts/train.py",
        "tests/test_x.py", "benchmarks/b.py", "outputs/eval/run/results.json", "app/__pycache__/x.pyc", ".env",
        ".git/config", "app/.secrets", "assets/hf_token.txt", "assets/adapter/checkpoint-30/adapter_model.safetensors",
        "notes.txt",
    ]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert deploy.app_files(tmp_path) == [
        "README.md", "app.py", "app/ui/chat_tab.py", "assets/adapter/adapter_config.json",
        "assets/examples.json", "docs/security.md", "pubmedqa/engines/base.py", "requirements.txt", "scripts/train.py",
    ]


def test_dry_run_lists_files_and_variables_without_network(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKE_SECRET_deploy")
    assert deploy.main(["--space_id", "someone/pubmedqa", "--adapter", "someone/lora", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "https://huggingface.co/spaces/someone/pubmedqa" in out and "PUBMEDQA_ADAPTER=someone/lora" in out
    assert "  app.py" in out and "tests/" not in out and "hf_FAKE_SECRET" not in out


def test_deploy_without_network_fails_clearly(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert deploy.main(["--space_id", "someone/pubmedqa"]) == 1
    assert "could not reach the Hugging Face Hub" in caplog.text
    assert deploy.main(["--space_id", "not-a-space-id", "--dry_run"]) == 1


def test_readme_front_matter_is_a_valid_gradio_space_config():
    text = (REPO_ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "README.md must start with YAML front matter"
    meta = yaml.safe_load(match.group(1))
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio.__version__
    # The [oauth] extra: sign-in (hf_oauth above) needs its libraries at start-up.
    assert f"gradio[oauth]=={meta['sdk_version']}" in (REPO_ROOT / "requirements.txt").read_text() or not meta.get("hf_oauth")
    assert len(meta["short_description"]) <= 60 and meta["license"] and meta["title"]
