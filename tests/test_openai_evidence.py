"""The OpenAI-compatible API's ``evidence`` extension field (``/v1/chat/completions``), driven with the official
``openai`` client against the app as ``python app.py`` serves it (:func:`app.main.build_server`) with a local
evidence index over the shipped PubMedQA data: "on" answers from the article found and cites it, whole or streamed;
"auto" searches only for a question without context; bad values are refused; a search that fails (PubMed down)
leaves the answer alone and says why; a public app limits each client's searches."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest

from app.evidence import CITATION_MARK, FoundEvidence, without_citation
from app.main import AppServer, build_server
from app.openai_api import ADAPTER_MODEL_NAME, serve_in_thread
from pubmedqa.config import EvidenceSettings, ModelSettings, ServerSettings
from pubmedqa.data import load_local
from pubmedqa.evidence import EvidenceResult, EvidenceSearch, pubmed

OWN = "21645374"  # a PQA-L question whose own abstract the local index finds first
CITATION = f"{CITATION_MARK} {OWN} (https://pubmed.ncbi.nlm.nih.gov/{OWN}/), 2011"
SETTINGS = {"max_tokens": 8, "temperature": 0.0, "seed": 0}
OTHER_CONTEXT = "We studied 120 patients with diabetes and hypertension in a randomized controlled trial."


class RecordingSearch(EvidenceSearch):
    """An EvidenceSearch that records each question it is asked and whether it ran on an event loop (it must not:
    a search may take seconds)."""

    def __init__(self, settings: EvidenceSettings):
        super().__init__(settings)
        self.calls: list[tuple[str, bool]] = []

    def search(self, question: str, k: int | None = None, source: str | None = None) -> EvidenceResult:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((question, on_loop))
        return super().search(question, k, source)


@pytest.fixture(autouse=True)
def fast_rate_limits(monkeypatch):
    monkeypatch.setattr(pubmed, "RATE_WITHOUT_KEY", 1000.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir):
    from pubmedqa.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(
        ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none")
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def serve(engine, tmp_path_factory):
    """Serve the app (page and /v1) with ``search`` and server settings; yields an ``openai`` client factory."""
    started = []

    def start(search: EvidenceSearch | None, **settings) -> openai.OpenAI:
        folder = tmp_path_factory.mktemp("app")
        server = ServerSettings(votes_path=str(folder / "votes.jsonl"), eval_dir=str(folder / "eval"), **settings)
        url, uvicorn_server = serve_in_thread(build_server(engine, server, search), server_class=AppServer)
        started.append(uvicorn_server)
        return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)

    yield start
    for uvicorn_server in started:
        uvicorn_server.should_exit = True


@pytest.fixture(scope="module")
def question(pubmedqa_dir) -> str:
    return load_local(pubmedqa_dir)[OWN].question


@pytest.fixture(scope="module")
def local_search(pubmedqa_dir) -> RecordingSearch:
    return RecordingSearch(EvidenceSettings(evidence="local", evidence_local_data=str(pubmedqa_dir)))


@pytest.fixture(scope="module")
def client(serve, local_search) -> openai.OpenAI:
    # On loopback the app is not public: no per-client search limit, however low the setting.
    return serve(local_search, evidence_per_minute=1)


@pytest.fixture
def searches(local_search) -> list[tuple[str, bool]]:
    local_search.calls.clear()
    return local_search.calls


def _ask(client: openai.OpenAI, question: str, system: str | None = None, **extra):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return client.chat.completions.create(model=ADAPTER_MODEL_NAME, messages=messages, **SETTINGS, extra_body=extra)


def _raw(client: openai.OpenAI, **body) -> httpx.Response:
    """A chat request as plain JSON (to compare whole bodies)."""
    payload = {"model": ADAPTER_MODEL_NAME, **SETTINGS, **body}
    return httpx.post(f"{client.base_url}chat/completions", json=payload, timeout=60)


def _without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


@contextlib.contextmanager
def _pubmed_down() -> Iterator[str]:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}/entrez/eutils/"


# ------------------------------------------------------------------------------------------------ "on"
@pytest.mark.parametrize("evidence", ["on", True, " ON "])
def test_on_answers_from_the_article_found_and_cites_it(engine, client, local_search, searches, question, evidence):
    reply = _ask(client, question, evidence=evidence)
    content = reply.choices[0].message.content
    assert content.endswith(f"\n\n{CITATION}")
    citations = reply.model_extra["citations"]
    assert citations["used_pmid"] == OWN and citations["source"] == "local" and citations["message"]
    assert citations["citations"][0] == {"pmid": OWN, "title": question, "journal": "", "year": 2011,
                                         "url": f"https://pubmed.ncbi.nlm.nih.gov/{OWN}/"}
    # One search, for the question, off the event loop.
    assert searches == [(question, False)]
    # The model's own answer is the one it gives with the article as the context (given by hand, evidence off)...
    found = FoundEvidence(EvidenceSearch(local_search.settings).search(question))
    by_hand = _ask(client, question, context=found.context)
    assert without_citation(content) == by_hand.choices[0].message.content
    assert "citations" not in by_hand.model_extra
    # ...and the usage is that answer's: the citation line is not counted.
    assert reply.usage.model_dump() == by_hand.usage.model_dump()
    assert reply.usage.completion_tokens == engine.count_tokens(without_citation(content))


def test_on_replaces_a_context_given_with_the_articles(client, searches, question):
    reply = _ask(client, question, system=OTHER_CONTEXT, evidence="on")
    assert reply.choices[0].message.content.endswith(CITATION) and len(searches) == 1
    assert reply.choices[0].message.content == _ask(client, question, evidence="on").choices[0].message.content


def test_streamed_the_citation_line_is_the_last_delta_and_the_finish_chunk_has_the_citations(client, question):
    whole = _ask(client, question, evidence="on")
    chunks = list(client.chat.completions.create(
        model=ADAPTER_MODEL_NAME, messages=[{"role": "user", "content": question}], **SETTINGS, stream=True,
        stream_options={"include_usage": True}, extra_body={"evidence": "on"},
    ))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas[-1] == f"\n\n{CITATION}"
    assert "".join(deltas) == whole.choices[0].message.content
    [finish] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish.choices[0].delta.content is None and finish.model_extra["citations"] == whole.model_extra["citations"]
    assert [c for c in chunks if "citations" in (c.model_extra or {})] == [finish]  # once, with the finish
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # the model's own tokens


# ---------------------------------------------------------------------------------------------- "auto", off
@pytest.mark.parametrize("how", ["system", "context field"])
def test_auto_with_a_context_does_not_search(client, searches, question, how):
    given = {"system": OTHER_CONTEXT} if how == "system" else {"context": OTHER_CONTEXT}
    reply = _ask(client, question, evidence="auto", **given)
    assert searches == [] and "citations" not in reply.model_extra
    assert CITATION_MARK not in reply.choices[0].message.content
    assert reply.choices[0].message.content == _ask(client, question, **given).choices[0].message.content


def test_auto_without_a_context_searches_and_cites(client, searches, question):
    reply = _ask(client, question, evidence="auto")
    assert reply.choices[0].message.content.endswith(CITATION) and reply.model_extra["citations"]["used_pmid"] == OWN
    assert searches == [(question, False)]


@pytest.mark.parametrize("off", [{}, {"evidence": "off"}, {"evidence": False}, {"evidence": None}])
def test_without_evidence_the_response_is_as_before(client, searches, question, off):
    plain = _raw(client, messages=[{"role": "user", "content": question}])
    reply = _raw(client, messages=[{"role": "user", "content": question}], **off)
    assert reply.status_code == plain.status_code == 200 and searches == []
    assert "citations" not in reply.json() and _without_ids(reply.json()) == _without_ids(plain.json())
    assert list(reply.json()) == list(plain.json())  # the same fields, in the same order


@pytest.mark.parametrize("bad", ["always", "", 3, ["on"], {"mode": "on"}])
def test_a_bad_evidence_value_is_a_400_on_evidence(client, searches, question, bad):
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, question, evidence=bad)
    assert refused.value.param == "evidence" and "Unknown evidence option" in refused.value.message
    assert searches == []


def test_where_evidence_is_off_on_is_refused_and_auto_answers_without(serve, question):
    client = serve(None)
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, question, evidence="on")
    assert refused.value.param == "evidence"
    assert refused.value.body["message"] == "Evidence search is off on this app (PUBMEDQA_EVIDENCE=off)."
    reply = _ask(client, question, evidence="auto")
    assert "citations" not in reply.model_extra and CITATION_MARK not in reply.choices[0].message.content
    assert reply.choices[0].message.content == _ask(client, question).choices[0].message.content


# ----------------------------------------------------------------------------------------------- PubMed down
def test_with_pubmed_down_the_answer_has_no_citation_and_the_citations_say_why(serve, tmp_path, question):
    with _pubmed_down() as down:
        search = EvidenceSearch(EvidenceSettings(
            evidence="pubmed", evidence_base_url=down, evidence_timeout=1.0, evidence_retries=0,
            evidence_local_data=str(tmp_path / "none"),
        ))
        client = serve(search)
        reply = _ask(client, question, evidence="on")
        content = reply.choices[0].message.content
        assert CITATION_MARK not in content
        assert content == _ask(client, question).choices[0].message.content  # answered without evidence
        citations = reply.model_extra["citations"]
        assert "PubMed could not be reached" in citations["message"]
        assert citations["citations"] == [] and citations["used_pmid"] is None
        # Streamed alike: no citation line, the reason with the finish.
        chunks = list(client.chat.completions.create(
            model=ADAPTER_MODEL_NAME, messages=[{"role": "user", "content": question}], **SETTINGS, stream=True,
            extra_body={"evidence": "auto"},
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == content
        assert "PubMed could not be reached" in chunks[-1].model_extra["citations"]["message"]


# ------------------------------------------------------------------------------------------------- public app
def test_a_public_app_limits_each_clients_searches(serve, pubmedqa_dir, question):
    search = RecordingSearch(EvidenceSettings(evidence="local", evidence_local_data=str(pubmedqa_dir)))
    # Behind a Space's proxy (one hop): the visitor is the address it appends to X-Forwarded-For.
    proxied = serve(search, server_name="0.0.0.0", evidence_per_minute=1, trusted_proxy_hops=1)
    client = proxied.with_options(default_headers={"X-Forwarded-For": "198.51.100.1"})
    assert _ask(client, question, evidence="on").model_extra["citations"]["used_pmid"] == OWN
    with pytest.raises(openai.RateLimitError) as refused:
        _ask(client, question, evidence="on")
    error = refused.value
    assert error.status_code == 429 and error.param == "evidence" and error.code == "rate_limit_exceeded"
    assert "At most 1 evidence searches a minute per visitor" in error.message
    assert 1 <= int(error.response.headers["Retry-After"]) <= 60
    assert len(search.calls) == 1  # the refused request searched nothing
    forged = proxied.with_options(default_headers={"X-Forwarded-For": "203.0.113.99, 198.51.100.1"})
    with pytest.raises(openai.RateLimitError):  # what the client wrote before the proxy's hop names nobody
        _ask(forged, question, evidence="on")
    # Requests that do not search are not limited...
    assert "citations" not in _ask(client, question).model_extra
    assert "citations" not in _ask(client, question, evidence="auto", system=OTHER_CONTEXT).model_extra
    # ...and another visitor (another address appended by the proxy) has searches of its own.
    other = proxied.with_options(default_headers={"X-Forwarded-For": "203.0.113.7"})
    assert _ask(other, question, evidence="on").model_extra["citations"]["used_pmid"] == OWN
    assert len(search.calls) == 2
