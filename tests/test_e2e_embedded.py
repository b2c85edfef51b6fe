"""End to end with the real embedded Gemma 3 270M: the app as the README starts it, answering through /chat."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from app import model_status
from app.chat import stream_answer
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.engines.factory import create_engine
from pubmedqa.engines.llama_cpp_engine import llama_cpp_available
from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.e2e
QUESTION = "Does aspirin reduce the risk of myocardial infarction?"
# Both in-process engines on the real model; llama.cpp where llama-cpp-python is installed (requirements.txt).
ENGINES = ["transformers", pytest.param("llama.cpp", marks=pytest.mark.skipif(not llama_cpp_available(), reason="no llama_cpp"))]
GREEDY = {"max_new_tokens": 48, "temperature": 0.0, "top_p": 0.95, "seed": 0}


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}  # default settings: embedded base + shipped adapter
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited early:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("app.py did not serve its page within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_app_serves_the_page_at_once_and_answers_through_the_chat_api(app_url):
    from gradio_client import Client

    page = urllib.request.urlopen(app_url, timeout=10).read().decode()
    assert "PubMedQA chatbot" in page
    client = Client(app_url, verbose=False)
    answer = client.predict(question=QUESTION, max_new_tokens=48, api_name="/chat")
    assert isinstance(answer, str) and len(answer.split()) >= 2
    assert "Question:" not in answer  # stopped before inventing a follow-up question


def test_compare_api_answers_with_both_models(app_url):
    from gradio_client import Client

    from pubmedqa.config import SHIPPED_ADAPTER_DIR

    result = Client(app_url, verbose=False).predict(question=QUESTION, max_new_tokens=32, api_name="/compare")
    sides = ["base", "fine-tuned"] if (SHIPPED_ADAPTER_DIR / "adapter_config.json").is_file() else ["base"]
    for side in sides:
        assert result[side]["answer"] and result[side]["decision"] in ("yes", "no", "maybe")
        assert result[side]["n_tokens"] > 0 and result[side]["tokens_per_s"] > 0


def test_app_refuses_to_start_with_a_missing_model_folder_and_names_the_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, "app.py", "--base_model", str(tmp_path / "missing")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "PUBMEDQA_BASE_MODEL" in result.stderr and "does not exist" in result.stderr


@pytest.fixture(scope="module", params=ENGINES)
def embedded_engine(request):
    return create_engine(ModelSettings(adapter="none", engine=request.param))


def test_real_model_answers_a_long_abstract_by_truncating_the_context(embedded_engine):
    limits = ServerSettings()
    context = "Patients were randomised to aspirin or placebo and followed for five years. " * 200
    updates = list(stream_answer(embedded_engine, limits, QUESTION, context, [], "base", GREEDY))
    assert any("truncated" in notice for notice in updates[-1].notices)
    assert updates[-1].answer


def test_real_model_keeps_a_multi_turn_conversation(embedded_engine):
    limits = ServerSettings()
    first = list(stream_answer(embedded_engine, limits, QUESTION, "", [], "base", GREEDY))[-1].answer
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
    second = list(stream_answer(embedded_engine, limits, "Is it safe for children?", "", history, "base", GREEDY))
    assert second[-1].answer and "Question:" not in second[-1].answer


@pytest.mark.parametrize("engine_name", ENGINES)
def test_shipped_adapter_makes_the_model_state_a_decision(engine_name):
    from pubmedqa.config import SHIPPED_ADAPTER_DIR
    from pubmedqa.engines.base import GenerationSettings
    from pubmedqa.prompts import PromptInput, parse_decision
    from pubmedqa.variants import Variant

    if not (SHIPPED_ADAPTER_DIR / "adapter_config.json").is_file():
        pytest.skip("no adapter shipped in assets/adapter yet")
    engine = create_engine(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR), engine=engine_name))
    settings = GenerationSettings(max_new_tokens=40)
    prompt = engine.prepare(PromptInput(QUESTION), settings)
    assert engine.load().adapter_loaded
    tuned = engine.generate(prompt, Variant.TUNED, settings)
    assert parse_decision(tuned) in ("yes", "no", "maybe"), tuned
    assert tuned != engine.generate(prompt, Variant.BASE, settings)
    # The shipped decision probe decides, and the answer opens with that decision.
    assert engine.load().policy.probe is not None and "decision probe on layer 10" in model_status.details(engine)
    (answer,), (decision,) = engine.generate_with_decisions([prompt], [Variant.TUNED], settings)
    assert answer == tuned and parse_decision(answer) == max(decision, key=decision.get)
