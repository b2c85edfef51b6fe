"""What one visitor of a public app can and cannot do to the others: heavy requests are limited per visitor, the
API key guards the /chat and /compare APIs as it guards /v1, no file can be uploaded, and text that is not text (a
lone surrogate) is refused with a message everywhere."""

from __future__ import annotations

import time

import httpx
import pytest

from app.main import AppServer, build_server
from app.openai_api import serve_in_thread
from pubmedqa.config import ServerSettings

SHORT = {"max_new_tokens": 4, "temperature": 0.0}


@pytest.fixture
def served(tiny_engine, tmp_path, monkeypatch):
    """``build_server`` (page + /v1 on one port, as ``python app.py`` serves them) for given settings."""
    started = []

    def serve(api_key: str | None = None, **settings) -> str:
        if api_key:
            monkeypatch.setenv("PUBMEDQA_API_KEY", api_key)
        server = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"), **settings)
        v1_url, uvicorn_server = serve_in_thread(build_server(tiny_engine, server), server_class=AppServer)
        started.append(uvicorn_server)
        return v1_url.removesuffix("v1")

    yield serve
    for uvicorn_server in started:
        uvicorn_server.should_exit = True


def _client(url: str, **kwargs):
    from gradio_client import Client

    return Client(url, verbose=False, **kwargs)


def test_on_a_public_app_one_visitor_gets_a_few_comparisons_a_minute_then_a_quick_refusal(served):
    url = served(server_name="0.0.0.0", heavy_per_minute=2)  # public: listens beyond loopback
    client = _client(url)
    for _ in range(2):
        assert client.predict(question="Is it?", api_name="/compare", **SHORT)["base"]["answer"]
    started = time.monotonic()
    with pytest.raises(Exception, match="at most 2 such requests a minute per visitor"):
        client.predict(question="Is it?", api_name="/compare", **SHORT)
    assert time.monotonic() - started < 10  # refused at once, not after holding the model
    # A light request of the same visitor still answers; a long context counts as heavy.
    assert client.predict(question="Is it?", api_name="/chat", **SHORT)
    with pytest.raises(Exception, match="long context"):
        client.predict(question="Is it?", context="word " * 1000, api_name="/chat", **SHORT)


def test_a_local_app_has_no_per_visitor_limit(served):
    client = _client(served(heavy_per_minute=1))
    for _ in range(3):
        assert client.predict(question="Is it?", api_name="/compare", **SHORT)["base"]["answer"]


def test_the_api_key_guards_the_chat_and_compare_apis_too(served):
    url = served(api_key="k-123-secret")
    with pytest.raises(Exception, match="This API needs a key"):
        _client(url).predict(question="Is it?", api_name="/chat", **SHORT)
    with pytest.raises(Exception, match="This API needs a key"):
        _client(url, headers={"Authorization": "Bearer wrong"}).predict(question="Is it?", api_name="/compare", **SHORT)
    keyed = _client(url, headers={"Authorization": "Bearer k-123-secret"})
    assert keyed.predict(question="Is it?", api_name="/chat", **SHORT)
    assert keyed.predict(question="Is it?", api_name="/compare", **SHORT)["base"]["answer"]
    assert httpx.get(url).status_code == 200  # the page itself stays open to every visitor


def test_uploads_are_refused_and_nothing_is_written(served, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    url = served()
    response = httpx.post(url + "gradio_api/upload", files={"files": ("big.bin", b"x" * (5 << 20))})
    assert response.status_code == 403 and "no file uploads" in response.text
    assert not (tmp_path / "gradio-tmp").exists() or not any((tmp_path / "gradio-tmp").rglob("big.bin"))
    assert httpx.get(url).status_code == 200


# JSON's escape for a lone surrogate: valid JSON, and no text contains it (gradio_client cannot even send it).
LONE_SURROGATE = "Is aspirin \\ud800 safe?"
SETTINGS = "4, 0.0, 0.95, 0, 1.0, 0"  # max new tokens, temperature, top-p, seed, repetition penalty, minimum tokens


def _call_raw(url: str, api: str, data: str) -> str:
    """Call a Gradio API with a raw JSON ``data`` list; the event stream of its answer."""
    response = httpx.post(f"{url}gradio_api/call/{api}", content=f'{{"data": {data}}}',
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    return httpx.get(f"{url}gradio_api/call/{api}/{response.json()['event_id']}", timeout=60).text


def test_a_lone_surrogate_is_bad_input_with_a_clear_message_everywhere(served):
    url = served()
    chat = _call_raw(url, "chat", f'["{LONE_SURROGATE}", "", null, "base", {SETTINGS}, "off"]')
    assert "event: error" in chat and "invalid character" in chat
    compare = _call_raw(url, "compare", f'["Is it?", "{LONE_SURROGATE}", {SETTINGS}, "off"]')
    assert "event: error" in compare and "invalid character" in compare
    body = f'{{"messages": [{{"role": "user", "content": "{LONE_SURROGATE}"}}], "max_tokens": 4}}'
    response = httpx.post(url + "v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "lone UTF-16 surrogate" in response.json()["error"]["message"]
    assert _client(url).predict(question="Is it?", api_name="/chat", **SHORT)  # and the app keeps serving
