"""Evidence in the app: a question without an abstract is answered from the article found (local index on the
shipped PubMedQA data, or a fake NCBI E-utilities server), the answer cites its PMID, the APIs return the citations,
PubMed's texts are shown as text, a search that fails leaves an answer without evidence, and a public app limits
searches per visitor."""

from __future__ import annotations

import socket
import threading

import pytest
from markdown_it import MarkdownIt

from app.chat import stream_answer
from app.evidence import CITATION_MARK, FoundEvidence, evidence_markdown, without_citation
from app.literal_text import literal_markdown
from app.main import AppServer, build_server
from app.openai_api import serve_in_thread
from app.validation import history_to_turns
from pubmedqa.config import EvidenceSettings, ServerSettings
from pubmedqa.data import load_local
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.evidence import EvidenceSearch, parse_pubmed_xml, pubmed
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant
from tests.fake_eutils import ARTICLES, DOCTYPE, STRUCTURED, FakeEutils

SHORT = {"max_new_tokens": 4, "temperature": 0.0}
OWN = "21645374"  # a PQA-L question whose own abstract the local index finds first


@pytest.fixture(autouse=True)
def fast_rate_limits(monkeypatch):
    monkeypatch.setattr(pubmed, "RATE_WITHOUT_KEY", 1000.0)


@pytest.fixture(scope="module")
def local_search(pubmedqa_dir) -> EvidenceSearch:
    return EvidenceSearch(EvidenceSettings(evidence="local", evidence_local_data=str(pubmedqa_dir)))


@pytest.fixture
def served(tiny_engine, tmp_path):
    started = []

    def serve(search: EvidenceSearch | None, **settings) -> str:
        server = ServerSettings(votes_path=str(tmp_path / "votes.jsonl"), eval_dir=str(tmp_path / "eval"), **settings)
        v1_url, uvicorn_server = serve_in_thread(build_server(tiny_engine, server, search), server_class=AppServer)
        started.append(uvicorn_server)
        return v1_url.removesuffix("v1")

    yield serve
    for uvicorn_server in started:
        uvicorn_server.should_exit = True


def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_pubmed_texts_are_shown_as_text_and_the_citation_leaves_the_history():
    [article] = parse_pubmed_xml(DOCTYPE + "<PubmedArticleSet>" + ARTICLES[STRUCTURED] + "</PubmedArticleSet>")
    hostile = type(article)(article.pmid, "<img src=x onerror=alert(1)> [link](javascript:x) **bold**",
                            article.sections, article.journal, article.year)
    found = FoundEvidence(type("R", (), {"articles": (hostile,), "message": "Evidence: PubMed (1 article)",
                                         "source": "pubmed", "citations": lambda self: []})())
    shown = evidence_markdown(found)
    html = MarkdownIt("commonmark").render(shown)  # how a Markdown component renders it (raw HTML allowed)
    assert "<img" not in html and 'href="javascript' not in html and "<strong>bold</strong>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt; [link](javascript:x) **bold**" in html  # shown as typed
    assert f'<a href="https://pubmed.ncbi.nlm.nih.gov/{STRUCTURED}/">PMID {STRUCTURED}</a>' in html
    cited = found.cite("Yes. It does.")
    assert cited.endswith(f"{CITATION_MARK} {STRUCTURED} (https://pubmed.ncbi.nlm.nih.gov/{STRUCTURED}/), "
                          "Scandinavian Journal of Rheumatology, 2020")
    assert without_citation(cited) == "Yes. It does."
    history = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": cited}]
    assert history_to_turns(history, ServerSettings())[0].answer == "Yes. It does."


def test_a_chat_answer_shows_its_decision_and_source_link_and_the_history_gets_the_answer_alone(tiny_engine):
    from app.ui.answer_notes import with_footer
    from app.ui.chat_tab import as_written

    [article] = parse_pubmed_xml(DOCTYPE + "<PubmedArticleSet>" + ARTICLES[STRUCTURED] + "</PubmedArticleSet>")
    hostile = type(article)(article.pmid, "<img src=x onerror=alert(1)> [x](javascript:y) > quoted", article.sections,
                            article.journal, article.year)
    found = FoundEvidence(type("R", (), {"articles": (hostile,)})())
    prompt = tiny_engine.prepare(PromptInput("Does it work?", found.context), GenerationSettings(max_new_tokens=8))
    scores = tiny_engine.score_decisions([prompt], [Variant.BASE])[0]
    update = list(stream_answer(tiny_engine, ServerSettings(), "Does it work?", "", None, "base",
                                {"max_new_tokens": 8}, evidence=found))[-1]
    assert update.done and update.probabilities == pytest.approx(scores)  # the prompt's own option scores
    shown = with_footer(literal_markdown("Yes > no. **Really**"), update)
    html = MarkdownIt("commonmark").render(shown)
    assert f"<strong>{update.decision} " in html and html.count("%") == 3
    assert f'<a href="https://pubmed.ncbi.nlm.nih.gov/{STRUCTURED}/">PMID {STRUCTURED}</a>' in html
    assert "<img" not in html and 'href="javascript' not in html and "<strong>Really" not in html
    history = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": shown}]
    assert history_to_turns(as_written(history), ServerSettings())[0].answer == "Yes > no. **Really**"
    # A PMID that is not a number (a hostile or broken service) is shown as text, never as a link.
    odd = FoundEvidence(type("R", (), {"articles": (type(article)("1) [a](javascript:x", "T"),)})())
    assert "<a " not in MarkdownIt("commonmark").render(with_footer("", type(update)("", evidence=odd, done=True)))
    # A stopped answer has no scores and no footer.
    cancel = threading.Event()
    cancel.set()
    assert not any(u.done for u in stream_answer(tiny_engine, ServerSettings(), "Q?", "", None, "base",
                                                 {"max_new_tokens": 8}, cancel))


def test_an_answer_from_evidence_uses_the_article_as_context_and_cites_it(tiny_engine, local_search, pubmedqa_dir):
    record = load_local(pubmedqa_dir)[OWN]
    found = FoundEvidence(local_search.search(record.question))
    assert found.article.pmid == OWN and record.context in found.context
    updates = list(stream_answer(tiny_engine, ServerSettings(), record.question, "", None, "base", SHORT,
                                 evidence=found))
    assert updates[-1].done and updates[-1].cited.endswith(
        f"{CITATION_MARK} {OWN} (https://pubmed.ncbi.nlm.nih.gov/{OWN}/), 2011")
    assert without_citation(updates[-1].cited) == updates[-1].answer == updates[-2].answer  # the model's own text
    assert not updates[-2].done and updates[-2].cited == updates[-2].answer  # cited once finished


def test_the_apis_find_evidence_return_citations_and_both_compare_answers_use_it(served, local_search, pubmedqa_dir):
    question = load_local(pubmedqa_dir)[OWN].question
    client = _client(served(local_search))
    answer = client.predict(question=question, evidence="auto", api_name="/chat", **SHORT)
    assert answer.endswith(f"https://pubmed.ncbi.nlm.nih.gov/{OWN}/), 2011")
    # "auto" leaves a question that brings its own context alone; "off" never searches.
    assert CITATION_MARK not in client.predict(question=question, context="Our own abstract.", evidence="auto",
                                               api_name="/chat", **SHORT)
    assert CITATION_MARK not in client.predict(question=question, api_name="/chat", **SHORT)
    result = client.predict(question=question, evidence="on", api_name="/compare", **SHORT)
    assert result["evidence"]["used_pmid"] == OWN and result["evidence"]["citations"][0]["pmid"] == OWN
    assert all(f"{CITATION_MARK} {OWN}" in result[side]["answer"] for side in ("base", "fine-tuned"))
    citations = client.predict(question=question, api_name="/evidence")
    assert citations["citations"][0] == {
        "pmid": OWN, "title": question, "journal": "", "year": 2011, "url": f"https://pubmed.ncbi.nlm.nih.gov/{OWN}/"
    }
    with pytest.raises(Exception, match="Unknown evidence option"):
        client.predict(question=question, evidence="maybe", api_name="/chat", **SHORT)


def test_with_pubmed_down_the_answer_comes_without_evidence_and_says_why(served, tmp_path):
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}/entrez/eutils/"
    search = EvidenceSearch(EvidenceSettings(evidence="pubmed", evidence_base_url=down, evidence_timeout=1.0,
                                             evidence_local_data=str(tmp_path / "none")))
    client = _client(served(search))
    answer = client.predict(question="Does aspirin prevent infarction?", evidence="on", api_name="/chat", **SHORT)
    assert answer and CITATION_MARK not in answer
    found = client.predict(question="Does aspirin prevent infarction?", api_name="/evidence")
    assert found["citations"] == [] and "PubMed could not be reached" in found["message"]


def test_a_public_app_limits_evidence_searches_per_visitor(served):
    with FakeEutils() as fake:
        search = EvidenceSearch(EvidenceSettings(evidence="pubmed", evidence_base_url=fake.url))
        client = _client(served(search, server_name="0.0.0.0", evidence_per_minute=1))
        assert client.predict(question="Do beta-blockers reduce relapse?", api_name="/evidence")["citations"]
        with pytest.raises(Exception, match="At most 1 evidence searches a minute"):
            client.predict(question="Does aspirin prevent infarction?", api_name="/evidence")
        assert len(fake.requests_to("esearch")) >= 1


def test_evidence_off_hides_the_panel_and_refuses_the_option(served):
    url = served(None)
    client = _client(url)
    with pytest.raises(Exception, match="Evidence search is off"):
        client.predict(question="Is it?", evidence="on", api_name="/chat", **SHORT)
    assert client.predict(question="Is it?", evidence="auto", api_name="/chat", **SHORT)  # auto: nothing to find
