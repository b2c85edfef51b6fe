"""``python app.py`` started with the environment a Hugging Face Space with ``hf_oauth: true`` sets: it serves the page
with the sign-in button, and a start-up error is printed (with its traceback), never swallowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.e2e


def space_environment(port: int, **extra: str) -> dict[str, str]:
    """What a Space's container gets (values faked; the OpenID provider is unreachable on purpose)."""
    return {
        **os.environ,
        "SYSTEM": "spaces",
        "SPACE_ID": "lab-org/pubmedqa",
        "SPACE_AUTHOR_NAME": "lab-org",
        "SPACE_REPO_NAME": "pubmedqa",
        "SPACE_HOST": "lab-org-pubmedqa.hf.space",
        "OAUTH_CLIENT_ID": "00000000-fake-client",
        "OAUTH_CLIENT_SECRET": "fake-oauth-secret-value",
        "OAUTH_SCOPES": "openid profile",
        "OPENID_PROVIDER_URL": "http://127.0.0.1:9",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        **extra,
    }


def _start(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "app.py"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_page(proc: subprocess.Popen, url: str, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with status {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"app.py did not serve {url} within {seconds} s")


def test_a_space_with_sign_in_starts_and_shows_the_sign_in_button(tmp_path):
    port = free_port()
    env = space_environment(port, PUBMEDQA_VOTES_PATH=str(tmp_path / "votes.jsonl"), PUBMEDQA_EVAL_DIR=str(tmp_path))
    proc = _start(env)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert "PubMedQA chatbot" in _wait_for_page(proc, url)
        config = json.loads(urllib.request.urlopen(url + "config", timeout=10).read())
        buttons = [c for c in config["components"] if c.get("type") == "loginbutton" or
                   "Sign in" in str(c.get("props", {}).get("value", ""))]
        assert buttons, "the Evaluation tab's Hugging Face sign-in button is missing"
        assert buttons[0]["props"]["icon"]["url"].startswith("data:image/svg+xml")  # the logo, but not its path
        served = json.dumps(config)
        for server_path in {sys.prefix, str(REPO_ROOT), os.path.expanduser("~")}:
            assert server_path not in served, f"the public /config shows the server path {server_path}"
        # The sign-in route exists (Gradio's OAuth routes need authlib/itsdangerous, the [oauth] extra).
        request = urllib.request.Request(url + "login/huggingface", method="GET")
        try:
            status = urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status != 404
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "fake-oauth-secret-value" not in output  # the OAuth secret never reaches the log


def test_an_import_error_at_start_is_printed_with_its_traceback(tmp_path):
    # A broken authlib: Gradio's sign-in imports it while the page is built, as the model starts loading.
    broken = Path(tmp_path, "authlib")
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('authlib is broken in this test')\n")
    env = space_environment(free_port(), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 1
    assert "The app could not start" in result.stderr and "Traceback" in result.stderr
    assert "authlib is broken in this test" in result.stderr


LOAD_WITHOUT_DUP2 = """
import logging, os
from pubmedqa.engines.llama_cpp_logging import route_llama_logs
from pubmedqa.config import ModelSettings
from pubmedqa.embedded_model import embedded_gguf
path = str(embedded_gguf(ModelSettings().cache_dir))
route_llama_logs()
import llama_cpp
records = []
logging.getLogger("llama.cpp").addHandler(logging.Handler())
logging.getLogger("llama.cpp").handlers[0].emit = records.append
logging.getLogger("llama.cpp").setLevel(logging.DEBUG)
def refuse(*args):
    raise AssertionError(f"os.dup2{args} while loading a model")
os.dup2 = refuse
llama_cpp.Llama(path, n_ctx=256, verbose=False).close()
print("loaded;", len(records), "llama.cpp log records;", sum(r.levelno >= logging.WARNING for r in records), "warnings")
"""


def test_loading_the_llama_cpp_model_leaves_the_process_stderr_alone_and_logs_instead():
    # Descriptors 1 and 2 belong to the whole process: redirecting them while a model loads in the background hides
    # whatever another thread prints (a start-up traceback included). In a process of its own: pytest's capture
    # uses dup2 itself.
    pytest.importorskip("llama_cpp")
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DUP2], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded, records, warnings = result.stdout.strip().split(";")
    assert loaded == "loaded" and int(records.split()[0]) > 10  # llama.cpp's own log, now in logging
    assert "llama_model_loader" not in result.stderr  # and not on stderr
