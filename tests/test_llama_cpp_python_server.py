"""The openai engine against a server this project did not write: llama-cpp-python's own OpenAI server
(``python -m llama_cpp.server``, its ``[server]`` extra in requirements-dev.txt) serving the embedded GGUF as
``pubmedqa-base`` and the same GGUF with the shipped GGUF LoRA as ``pubmedqa-tuned``. That server takes one prompt
per request and computes prompt log-probabilities slowly (a whole-vocabulary sort per position): Chat, Compare and
an evaluation must work through it all the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from app.chat import stream_answer
from app.compare import stream_comparison
from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings, ServerSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.gguf.source import gguf_file
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant
from tests.conftest import REPO_ROOT, free_port

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's [server] extra (requirements-dev.txt)")
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine  # noqa: E402
from pubmedqa.engines.openai_engine import OpenAIEngine  # noqa: E402

pytestmark = pytest.mark.e2e
QUESTION = "Does aspirin reduce the risk of myocardial infarction?"
SHORT = {"max_new_tokens": 16}


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    model = str(gguf_file(ModelSettings().base_model))
    port = free_port()
    config = tmp_path_factory.mktemp("llama-server") / "config.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "models": [
        {"model": model, "model_alias": "pubmedqa-base", "n_ctx": 2048, "verbose": False},
        {"model": model, "model_alias": "pubmedqa-tuned", "n_ctx": 2048, "verbose": False,
         "lora_path": str(SHIPPED_ADAPTER_DIR / "adapter_model.gguf")},
    ]}))
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
            if server.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {server.stderr.read()[-2000:]}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _remote(url: str, decisions: str) -> OpenAIEngine:
    return OpenAIEngine(ModelSettings(engine="openai", base_url=url, remote_model="pubmedqa-base",
                                      adapter_model="pubmedqa-tuned", adapter="none", remote_decisions=decisions))


def test_chat_and_compare_work_through_llama_cpp_pythons_server(server_url):
    engine = _remote(server_url, "auto")
    chat = list(stream_answer(engine, ServerSettings(), QUESTION, "", [], "fine-tuned", SHORT))
    assert chat[-1].done and chat[-1].answer and sum(chat[-1].probabilities.values()) == pytest.approx(1.0)
    assert len([u for u in chat if u.answer]) >= 2  # it streamed
    # The options' echo scores took seconds each (a whole-vocabulary sort per position there): auto switched.
    assert not engine._echo_supported
    final = list(stream_comparison(engine, ServerSettings(), QUESTION, "We studied 120 patients.", SHORT))[-1]
    assert final.done and [s.variant for s in final.sides] == ["base", "fine-tuned"]
    assert all(side.decision in ("yes", "no", "maybe") for side in final.sides)


def test_decisions_from_its_prompt_log_probabilities_equal_the_llama_cpp_engines(server_url):
    engine = _remote(server_url, "echo")
    local = LlamaCppEngine(ModelSettings(engine="llama.cpp", adapter="none"))
    settings = GenerationSettings(max_new_tokens=16)
    prompt = engine.prepare(PromptInput(QUESTION), settings)
    got = engine.score_decisions([prompt], [Variant.BASE])[0]
    assert engine._one_prompt_per_request  # it refused the three options as one list; remembered
    want = local.score_decisions([local.prepare(PromptInput(QUESTION), settings)], [Variant.BASE])[0]
    assert got == pytest.approx(want, abs=2e-3) and max(got, key=got.get) == max(want, key=want.get)


def test_a_five_question_evaluation_runs_through_it(server_url, tmp_path, pubmedqa_dir):
    out = tmp_path / "eval"
    env = {**os.environ, "PUBMEDQA_DATA": str(pubmedqa_dir)}
    run = subprocess.run(
        [sys.executable, "-m", "scripts.evaluate", "--engine", "openai", "--base_url", server_url, "--model",
         "pubmedqa-base", "--adapter_model", "pubmedqa-tuned", "--adapter", "none", "--limit", "5",
         "--no_long_answers", "--output_dir", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"base", "tuned"}, results["models"].keys()
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 5 and all(e[key]["decision"] in ("yes", "no", "maybe") for e in examples
                                      for key in ("base", "tuned"))
