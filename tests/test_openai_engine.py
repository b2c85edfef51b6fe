"""The remote (OpenAI-compatible server) engine against the project's own server wrapping the tiny model: answers
are real model outputs, so the remote path must give exactly what the in-process engine gives."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from app import model_status
from app.chat import stream_answer
from app.compare import stream_comparison
from app.openai_api import ADAPTER_MODEL_NAME, BASE_MODEL_NAME, create_app, serve_in_thread
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.engines.base import EngineError, GenerationSettings, LoadState
from pubmedqa.engines.openai_engine import OpenAIEngine
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant
from tests.conftest import JsonHandler, free_port

QUESTIONS = [
    "Does metformin lower mortality in elderly patients?",
    "Is ultrasound equal to X-ray in pediatric fracture diagnosis?",
    "Do statins prevent dementia?",
]
SETTINGS = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 0.95, "seed": 0}
LIMITS = ServerSettings(max_new_tokens_limit=64)


@contextlib.contextmanager
def api_server(engine, **options) -> Iterator[str]:
    """The app's OpenAI-compatible API for ``engine`` on a free localhost port; yields its /v1 URL."""
    url, server = serve_in_thread(create_app(engine, **options))
    try:
        yield url
    finally:
        server.should_exit = True


def remote(tiny_model_dir, base_url, **overrides) -> OpenAIEngine:
    values = {"base_model": str(tiny_model_dir), "adapter": "none", "engine": "openai", "base_url": base_url,
              "remote_model": BASE_MODEL_NAME, "adapter_model": ADAPTER_MODEL_NAME, "request_timeout": 20.0,
              **overrides}
    return OpenAIEngine(ModelSettings(**values))


@pytest.fixture(scope="module")
def local(tiny_model_dir, tiny_adapter_dir):
    from pubmedqa.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none"))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def server_url(local):
    with api_server(local) as url:
        yield url


def _answer(engine, question: str, variant: Variant) -> list[str]:
    return [u.answer for u in stream_answer(engine, LIMITS, question, "", [], variant.value, SETTINGS)]


@pytest.mark.parametrize("variant", [Variant.BASE, Variant.TUNED])
def test_streamed_chat_through_the_server_equals_the_in_process_answer(local, server_url, tiny_model_dir, variant):
    engine = remote(tiny_model_dir, server_url)
    for question in QUESTIONS:
        streamed = _answer(engine, question, variant)
        assert streamed[-1] == _answer(local, question, variant)[-1]
        growing = [a for a in streamed if a]
        assert len(growing) >= 2 and all(b.startswith(a) for a, b in zip(growing, growing[1:]))  # it streamed
    assert engine.state is LoadState.READY and "served remotely" in model_status.details(engine)


def test_two_model_names_give_base_and_fine_tuned_answers(local, server_url, tiny_model_dir):
    updates = list(stream_comparison(remote(tiny_model_dir, server_url), LIMITS, QUESTIONS[0], "", SETTINGS))
    final = updates[-1]
    assert final.done and "two concurrent requests" in final.mode
    base, tuned = (side.answer for side in final.sides)
    expected = list(stream_comparison(local, LIMITS, QUESTIONS[0], "", SETTINGS))[-1]
    assert [base, tuned] == [side.answer for side in expected.sides] and base != tuned
    for side, reference in zip(final.sides, expected.sides):
        assert side.decision == reference.decision
        assert side.probabilities == pytest.approx(reference.probabilities, abs=1e-4)


def test_decisions_from_echoed_logprobs_match_the_local_option_likelihoods(local, server_url, tiny_model_dir):
    engine = remote(tiny_model_dir, server_url)
    settings = GenerationSettings(max_new_tokens=8)
    prompts = [engine.prepare(PromptInput(q), settings) for q in QUESTIONS]
    variants = [Variant.BASE, Variant.TUNED, Variant.TUNED]
    got = engine.score_decisions(prompts, variants)
    want = local.score_decisions([local.prepare(PromptInput(q), settings) for q in QUESTIONS], variants)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


def test_without_echo_the_decision_comes_from_top_logprobs(local, tiny_model_dir):
    with api_server(local, allow_echo=False) as url:
        engine = remote(tiny_model_dir, url)
        prompt = engine.prepare(PromptInput(QUESTIONS[1]), GenerationSettings(max_new_tokens=8))
        got = engine.score_decisions([prompt], [Variant.TUNED])[0]
    assert not engine._echo_supported  # it noticed the refusal and switched method
    _, top = local.token_logprobs(prompt.text, Variant.TUNED, top=20)
    listed = {t.strip() for t in top} & set(got)
    assert sum(got.values()) == pytest.approx(1.0)
    want = local.score_decisions([prompt], [Variant.TUNED])[0]
    if listed == set(got):  # every option among the top 20: exactly the option likelihoods
        assert got == pytest.approx(want, abs=1e-4)
    else:  # the listed options keep their order and outrank the unlisted ones
        ranked = sorted(got, key=got.get, reverse=True)
        assert set(ranked[: len(listed)]) == listed


def test_an_adapter_name_the_server_does_not_serve_turns_fine_tuned_off_with_the_reason(server_url, tiny_model_dir):
    engine = remote(tiny_model_dir, server_url, adapter_model="other")
    assert not engine.load().adapter_loaded
    assert "does not serve 'other'" in engine.adapter_unavailable_reason()
    assert ADAPTER_MODEL_NAME in engine.adapter_unavailable_reason()
    assert _answer(engine, QUESTIONS[0], Variant.BASE)[-1]  # the base model still answers


def test_unknown_base_model_name_is_a_clear_4xx_message(server_url, tiny_model_dir):
    engine = remote(tiny_model_dir, server_url, remote_model="llama")
    with pytest.raises(EngineError, match=r"refused the request \(404: The model 'llama' does not exist"):
        _answer(engine, QUESTIONS[0], Variant.BASE)


def test_server_down_is_a_clear_message_and_the_engine_stays_ready(tiny_model_dir):
    engine = remote(tiny_model_dir, f"http://127.0.0.1:{free_port()}/v1")
    assert engine.load().adapter_loaded  # the server may come up later; each request says what is wrong meanwhile
    with pytest.raises(EngineError, match="is unreachable; check --base_url"):
        _answer(engine, QUESTIONS[0], Variant.TUNED)
    with pytest.raises(EngineError, match="unreachable"):
        engine.score_decisions([engine.prepare(PromptInput("Q?"), GenerationSettings())], [Variant.BASE])


def test_offsets_fitted_for_a_decision_probe_are_not_applied_to_a_servers_logits(tiny_model_dir, tmp_path, caplog):
    import torch

    from pubmedqa.decisions.calibration import DecisionCalibration
    from pubmedqa.decisions.probe import DecisionProbe

    DecisionCalibration({"yes": 0.0, "no": 1.0, "maybe": 2.0}, "dev").save(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert remote(tiny_model_dir, url, adapter=str(tmp_path)).load().policy.calibration is not None
    DecisionProbe(1, torch.zeros(3, 64), torch.zeros(3)).save(tmp_path)  # the offsets now go with the probe
    assert remote(tiny_model_dir, url, adapter=str(tmp_path)).load().policy.calibration is None
    assert "Ignoring the adapter's decision probe and its calibration: this engine cannot read hidden states" in caplog.text


class _Slow(JsonHandler):
    def do_GET(self):
        self.reply({"object": "list", "data": [{"id": "base", "object": "model"}]})

    def do_POST(self):
        time.sleep(3)
        self.reply({})


def test_a_server_that_does_not_answer_in_time_is_a_timeout_message(tiny_model_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = remote(tiny_model_dir, f"http://127.0.0.1:{server.server_address[1]}/v1", request_timeout=0.5)
        with pytest.raises(EngineError, match=r"did not answer within 0.5 s"):
            _answer(engine, QUESTIONS[0], Variant.BASE)
    finally:
        server.shutdown()


def test_a_wrong_api_key_is_refused_without_showing_the_key(local, tiny_model_dir, monkeypatch):
    with api_server(local, api_key="sk-right-key") as url:
        monkeypatch.setenv("TEST_REMOTE_KEY", "sk-wrong-key-123")
        engine = remote(tiny_model_dir, url, api_key_env="TEST_REMOTE_KEY")
        with pytest.raises(EngineError) as failure:
            _answer(engine, QUESTIONS[0], Variant.BASE)
        assert "401" in str(failure.value) and "sk-wrong-key-123" not in str(failure.value)
        monkeypatch.setenv("TEST_REMOTE_KEY", "sk-right-key")
        assert _answer(remote(tiny_model_dir, url, api_key_env="TEST_REMOTE_KEY"), QUESTIONS[0], Variant.BASE)[-1]


def test_the_app_on_the_openai_engine_shows_server_errors_in_the_ui(tiny_model_dir):
    from gradio_client import Client

    from app.ui.interface import build_app
    from tests.conftest import serving

    engine = remote(tiny_model_dir, f"http://127.0.0.1:{free_port()}/v1")
    with serving(build_app(engine, LIMITS)) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="unreachable"):
            client.predict(question=QUESTIONS[0], max_new_tokens=8, api_name="/chat")


def test_evaluation_runs_through_the_openai_engine(local, server_url, tiny_model_dir, tiny_adapter_dir, pubmedqa_dir, tmp_path):
    from pubmedqa.evaluation.results import load_results
    from pubmedqa.evaluation.runner import EvalArguments, evaluate

    engine = remote(tiny_model_dir, server_url, adapter=str(tiny_adapter_dir))
    args = EvalArguments(data=str(pubmedqa_dir), limit=6, batch_size=3, max_new_tokens=6, output_dir=str(tmp_path / "remote"),
                         bertscore_model="none")
    results = load_results(evaluate(engine.settings, args, engine=engine)).results
    local_args = EvalArguments(**{**args.__dict__, "output_dir": str(tmp_path / "local")})
    expected = load_results(evaluate(local.settings, local_args, engine=local)).results
    for key in ("base", "tuned"):
        assert results["models"][key]["accuracy"] == expected["models"][key]["accuracy"]
        assert results["models"][key]["token_f1"] == pytest.approx(expected["models"][key]["token_f1"])
    assert results["run"]["quantization"] == "served remotely"
