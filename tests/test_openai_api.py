"""The app's OpenAI-compatible API (/v1), served with the page on one port exactly as ``python app.py`` serves it
(:func:`app.main.build_server`), driven with the official ``openai`` client: answers are the page's answers, and the
page's limits, queue and errors hold."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from app.chat import stream_answer
from app.main import AppServer, build_server
from app.openai_api import ADAPTER_MODEL_NAME, API_KEY_ENV, BASE_MODEL_NAME, AdmissionQueue, ApiError, serve_in_thread
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.prompts import FittedPrompt, PromptInput, encode_prompt
from pubmedqa.variants import Variant

LIMITS = ServerSettings(
    max_question_chars=500, max_context_chars=4000, max_new_tokens_limit=64, max_history_messages=6, queue_size=8
)
GREEDY = {"temperature": 0.0, "top_p": 0.95, "seed": 0}
QUESTION = "Does metformin lower mortality in elderly patients?"
CONTEXT = "We studied 120 patients with diabetes and hypertension in a randomized controlled trial."


def _engine(tiny_model_dir, adapter):
    """As conftest's ``tiny_engine`` (the tiny random model and its adapter), shared by this module's servers."""
    from pubmedqa.engines.transformers_engine import TransformersEngine

    return TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(adapter), quantization="none"))


@contextlib.contextmanager
def app_server(engine, limits: ServerSettings = LIMITS) -> Iterator[tuple[str, object]]:
    """The page and the API on one free localhost port, built as app.main builds them; yields (root URL, app)."""
    app = build_server(engine, limits)
    url, server = serve_in_thread(app, server_class=AppServer)
    try:
        yield url.removesuffix("/v1"), app
    finally:
        server.should_exit = True


def client_for(root: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir):
    engine = _engine(tiny_model_dir, tiny_adapter_dir)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def served(engine):
    with app_server(engine) as (root, app):
        yield root, app


@pytest.fixture(scope="module")
def root(served):
    return served[0]


@pytest.fixture(scope="module")
def client(root):
    return client_for(root)


def _page_answer(engine, question, context="", history=None, variant="base", max_new_tokens=12, **extra) -> str:
    settings = {"max_new_tokens": max_new_tokens, **GREEDY, **extra}
    return list(stream_answer(engine, LIMITS, question, context, history or [], variant, settings))[-1].answer


# ---------------------------------------------------------------------------------------------------- models
def test_models_lists_base_and_fine_tuned(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE_MODEL_NAME, ADAPTER_MODEL_NAME]
    assert client.models.retrieve(ADAPTER_MODEL_NAME).id == ADAPTER_MODEL_NAME


def test_without_an_adapter_only_the_base_model_is_served(tiny_model_dir):
    with app_server(_engine(tiny_model_dir, "none")) as (root, _):
        client = client_for(root)
        assert [m.id for m in client.models.list().data] == [BASE_MODEL_NAME]
        with pytest.raises(openai.NotFoundError, match="no adapter"):
            client.chat.completions.create(model=ADAPTER_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}])
        assert client.chat.completions.create(
            model=BASE_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=4
        ).choices[0].message.content


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize(
    ("model", "variant"), [(BASE_MODEL_NAME, "base"), (ADAPTER_MODEL_NAME, "fine-tuned"), ("tuned", "fine-tuned")]
)
def test_chat_completion_is_the_pages_answer_in_the_one_prompt_format(engine, client, model, variant):
    earlier = "Is aspirin useful after a heart attack?"
    reply = _page_answer(engine, earlier, CONTEXT, variant=variant)
    messages = [
        {"role": "system", "content": CONTEXT},  # the abstract
        {"role": "user", "content": earlier},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=12, **GREEDY)
    history = [{"role": "user", "content": earlier}, {"role": "assistant", "content": reply}]
    assert response.choices[0].message.content == _page_answer(engine, QUESTION, CONTEXT, history, variant)
    assert response.choices[0].message.role == "assistant" and response.model == model
    assert response.choices[0].finish_reason in ("stop", "length")
    prompt = engine.prepare(PromptInput(QUESTION, CONTEXT, ()), GenerationSettings(max_new_tokens=12))
    assert response.usage.prompt_tokens > prompt.n_tokens  # the earlier turn is in the prompt too
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_the_context_field_is_the_abstract_too(engine, client):
    response = client.chat.completions.create(
        model=BASE_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
        extra_body={"context": CONTEXT}, **GREEDY,
    )
    assert response.choices[0].message.content == _page_answer(engine, QUESTION, CONTEXT)


def test_repetition_penalty_is_passed_on_as_vllm_takes_it(engine, client):
    response = client.chat.completions.create(
        model=BASE_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        extra_body={"repetition_penalty": 1.5}, **GREEDY,
    )
    expected = _page_answer(engine, QUESTION, max_new_tokens=24, repetition_penalty=1.5)
    assert response.choices[0].message.content == expected


def test_completion_takes_a_raw_prompt(engine, client):
    prompt = engine.prepare(PromptInput(QUESTION, CONTEXT), GenerationSettings(max_new_tokens=10)).text
    response = client.completions.create(model=BASE_MODEL_NAME, prompt=prompt, max_tokens=10, **GREEDY)
    expected = engine.generate(FittedPrompt(prompt, 0), Variant.BASE, GenerationSettings(max_new_tokens=10, repetition_penalty=1.0, min_new_tokens=0))
    assert response.choices[0].text == expected and expected
    echoed = client.completions.create(model=BASE_MODEL_NAME, prompt=prompt, max_tokens=10, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompt + expected
    # The tokens the model reads: the prompt's, and the BOS in front of a raw text (as vLLM counts them).
    assert response.usage.prompt_tokens == len(encode_prompt(prompt, engine.load().tokenizer))


def test_streamed_chat_sends_the_answer_in_deltas_then_done(engine, client):
    stream = client.chat.completions.create(
        model=ADAPTER_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # it streamed
    assert "".join(deltas) == _page_answer(engine, QUESTION, variant="fine-tuned", max_new_tokens=24)
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_streamed_completion_and_the_raw_sse(engine, root, client):
    prompt = engine.prepare(PromptInput(QUESTION), GenerationSettings(max_new_tokens=16)).text
    texts = [c.choices[0].text for c in client.completions.create(
        model=BASE_MODEL_NAME, prompt=prompt, max_tokens=16, stream=True, **GREEDY)]
    expected = engine.generate(FittedPrompt(prompt, 0), Variant.BASE, GenerationSettings(max_new_tokens=16, repetition_penalty=1.0, min_new_tokens=0))
    assert "".join(texts) == expected
    with httpx.stream("POST", f"{root}/v1/chat/completions", timeout=60, json={
        "model": BASE_MODEL_NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True,
    }) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_logprobs_of_the_answer_and_of_the_first_tokens(engine, client):
    response = client.chat.completions.create(
        model=ADAPTER_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=20, logprobs=True,
        top_logprobs=3, extra_body={"repetition_penalty": 1.0},  # whole tokens here: no half of a UTF-8 character
        **GREEDY,
    )
    choice = response.choices[0]
    tokens = choice.logprobs.content
    assert tokens and "".join(t.token for t in tokens).strip() == choice.message.content
    assert all(t.logprob is not None and t.logprob <= 0 for t in tokens)  # all scored, past one pass's 16 tokens
    prompt = engine.prepare(PromptInput(QUESTION), GenerationSettings(max_new_tokens=20))
    _, following = engine.token_logprobs(prompt.text, Variant.TUNED, top=3)
    assert {t.token: t.logprob for t in tokens[0].top_logprobs} == pytest.approx(following)

    completion = client.completions.create(
        model=BASE_MODEL_NAME, prompt=prompt.text, max_tokens=1, logprobs=5, **GREEDY
    )
    assert len(completion.choices[0].logprobs.top_logprobs[0]) == 5
    echoed = client.completions.create(model=BASE_MODEL_NAME, prompt=prompt.text + " yes", max_tokens=1, echo=True,
                                       logprobs=1, **GREEDY)
    lp = echoed.choices[0].logprobs
    # The prompt's last token (" yes", right after the prompt), then the generated one.
    assert lp.tokens[-2] == " yes" and lp.text_offset[-2] == len(prompt.text)
    assert lp.token_logprobs[-2] <= 0 and lp.text_offset[-1] == len(prompt.text) + 4


# ------------------------------------------------------------------------------------ the key, the errors
def test_the_key_is_required_when_set_and_the_page_stays_open(engine, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-test-key-123")
    with app_server(engine) as (root, _):
        for wrong in ("sk-wrong", "sk-test-key-1234", "sk-test-key-12"):
            with pytest.raises(openai.AuthenticationError) as failure:
                client_for(root, wrong).models.list()
            assert failure.value.body["code"] == "invalid_api_key" and "sk-test-key-123" not in str(failure.value)
        no_header = httpx.post(f"{root}/v1/chat/completions", json={"model": BASE_MODEL_NAME, "messages": []})
        assert no_header.status_code == 401 and set(no_header.json()["error"]) == {"message", "type", "param", "code"}
        right = client_for(root, "sk-test-key-123")
        assert right.chat.completions.create(
            model=BASE_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=4
        ).choices[0].message.content
        assert httpx.get(f"{root}/").status_code == 200  # the page is as open as before


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_malformed_requests_get_openai_errors_and_the_app_keeps_serving(engine, root, client):
    user = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=user)
    with pytest.raises(openai.BadRequestError) as failure:
        client.chat.completions.create(model=BASE_MODEL_NAME, messages=user, max_tokens=LIMITS.max_new_tokens_limit + 1)
    assert failure.value.body["param"] == "max_tokens" and "64" in failure.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="must be a number"):
        client.chat.completions.create(model=BASE_MODEL_NAME, messages=user, extra_body={"temperature": "hot"})
    with pytest.raises(openai.BadRequestError, match="not supported; use 'repetition_penalty'"):
        client.chat.completions.create(model=BASE_MODEL_NAME, messages=user, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="the limit is 500"):  # the page's question limit
        client.chat.completions.create(model=BASE_MODEL_NAME, messages=[{"role": "user", "content": "why? " * 200}])
    with pytest.raises(openai.BadRequestError, match="history has 8 messages; the limit is 6"):
        client.chat.completions.create(model=BASE_MODEL_NAME, messages=[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 4 + user)
    with pytest.raises(openai.BadRequestError, match="last message must be the user's question"):
        client.chat.completions.create(model=BASE_MODEL_NAME, messages=[{"role": "assistant", "content": "yes"}])
    with pytest.raises(openai.BadRequestError, match="at most 4 prompts"):
        client.completions.create(model=BASE_MODEL_NAME, prompt=["Question: x?"] * 5, max_tokens=2)

    url = f"{root}/v1/chat/completions"
    assert _error(httpx.post(url, content=b'{"model": "pubmedqa-base", "messages": [', headers={
        "content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert _error(httpx.post(url, json=["not", "an", "object"]), 400)["code"] == "invalid_json"
    assert _error(httpx.post(url, json={"model": BASE_MODEL_NAME, "messages": user, "max_tokens": "12"}), 400)[
        "param"] == "max_tokens"
    huge = b'{"model": "pubmedqa-base", "messages": [{"role": "user", "content": "' + b"a" * 10_000_000 + b'"}]}'
    assert _error(httpx.post(url, content=huge, headers={"content-type": "application/json"}, timeout=60), 413)[
        "code"] == "request_too_large"
    assert _error(httpx.post(f"{root}/v1/embeddings", json={}), 404)["type"] == "invalid_request_error"

    assert client.chat.completions.create(model=BASE_MODEL_NAME, messages=user, max_tokens=4).choices[0].message.content


# ----------------------------------------------------------------------------------- the page, the queue
def test_the_page_is_served_on_the_same_port_and_its_queue_works(engine, root, client):
    from gradio_client import Client

    page = httpx.get(f"{root}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "gradio" in page.text.lower()
    answer = Client(f"{root}/", verbose=False).predict(question=QUESTION, max_new_tokens=8, api_name="/chat")
    api = client.chat.completions.create(model="base", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
                                         **GREEDY)
    assert answer == api.choices[0].message.content


@contextlib.contextmanager
def _held_model(engine, monkeypatch) -> Iterator[threading.Event]:
    """Generation waits until the yielded event is set (a long answer that holds the model)."""
    gate = threading.Event()
    original = engine.stream_batch

    def held(*args, **kwargs):
        gate.wait(60)
        yield from original(*args, **kwargs)

    monkeypatch.setattr(engine, "stream_batch", held)
    try:
        yield gate
    finally:
        gate.set()


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_beyond_the_queue_requests_get_429_and_the_app_recovers(engine, monkeypatch):
    limits = ServerSettings(max_new_tokens_limit=64, concurrency_limit=1, queue_size=1)
    with app_server(engine, limits) as (root, app), _held_model(engine, monkeypatch) as gate:
        queue = app.state.openai_api.queue
        client = client_for(root)

        def ask():
            return client.chat.completions.create(
                model=BASE_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=6, **GREEDY
            )

        results: list = []
        workers = [threading.Thread(target=lambda: results.append(ask())) for _ in range(2)]
        for worker in workers:  # one generates (held), one waits: the queue is full
            worker.start()
        _wait_for(lambda: queue._admitted == 2)
        with pytest.raises(openai.RateLimitError) as failure:
            ask()
        assert failure.value.status_code == 429 and failure.value.body["code"] == "queue_full"
        gate.set()
        for worker in workers:
            worker.join(60)
        assert len(results) == 2 and results[0].choices[0].message.content == results[1].choices[0].message.content
        assert ask().choices[0].message.content  # and it serves again
        assert queue._admitted == 0


def test_a_client_that_leaves_frees_its_place(engine, monkeypatch):
    limits = ServerSettings(max_new_tokens_limit=64, concurrency_limit=1, queue_size=0)
    with app_server(engine, limits) as (root, app), _held_model(engine, monkeypatch) as gate:
        queue = app.state.openai_api.queue
        body = {"model": BASE_MODEL_NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6,
                "stream": True}
        with httpx.stream("POST", f"{root}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # started, then held by the model
            assert queue._admitted == 1
        _wait_for(lambda: queue._admitted == 0)  # the client left: its place is free again
        gate.set()
        assert client_for(root).chat.completions.create(**{**body, "stream": False}).choices[0].message.content


def test_the_pages_waiting_events_count_towards_the_api_queue():
    page_waiting = [0]
    queue = AdmissionQueue(concurrency_limit=1, queue_size=2, page_waiting=lambda: page_waiting[0])
    running = queue.admit()  # generates at once, whatever waits on the page
    page_waiting[0] = 1
    waiting = queue.admit()  # one waits (with the page's one: 2)
    with pytest.raises(ApiError) as failure:
        queue.admit()
    assert failure.value.status == 429
    page_waiting[0] = 0
    queue.admit().release()
    running.release()
    waiting.release()
    assert queue.waiting == 0


# ---------------------------------------------------------------------------------------- python app.py
def test_python_app_py_serves_the_page_and_the_api_on_one_port(engine, monkeypatch):
    import app.main as main_module

    served = {}
    monkeypatch.setattr(main_module, "create_engine", lambda settings: engine)
    monkeypatch.setattr(main_module.AppServer, "run", lambda self: served.update(
        app=self.config.app, host=self.config.host, port=self.config.port))
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert main_module.main(["--no_preload"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 7999)
    mounts = [getattr(route, "path", None) for route in served["app"].routes]
    assert mounts.index("/v1") < mounts.index("")  # the API first, then the page at / (Starlette strips the "/")

    from starlette.testclient import TestClient

    with TestClient(served["app"]) as http:  # runs the lifespan: Gradio's queue starts
        assert http.get("/v1/models").json()["data"][0]["id"] == BASE_MODEL_NAME
        assert http.get("/").status_code == 200
