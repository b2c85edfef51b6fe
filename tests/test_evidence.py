"""Evidence retrieval (pubmedqa.evidence): PubMed XML parsing, the E-utilities client against a local fake server
(retries, Retry-After, timeouts, bad XML, vanished PMIDs, rate limiting, the cache, the API key never shown), the
local BM25 index on the shipped PubMedQA data, and the source choice with its status line. Offline and fast."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from pubmedqa.config import EvidenceSettings, parse_settings
from pubmedqa.data import load_local, load_test_ids
from pubmedqa.evidence import Article, ArticleParseError, EvidenceSearch, build_queries, parse_pubmed_xml, pubmed
from pubmedqa.evidence.articles import AbstractSection
from pubmedqa.evidence.pubmed import RateLimiter, TTLCache, shared_limiter
from tests.fake_eutils import (
    ARTICLES,
    DOCTYPE,
    NO_ABSTRACT,
    STRUCTURED,
    UNSTRUCTURED,
    VANISHED,
    FakeEutils,
    pubmed_article,
)

API_KEY = "FAKEncbiKeyDoNotLeak0123456789abcdef"


@pytest.fixture(autouse=True)
def fast_rate_limits(monkeypatch):
    """NCBI's rates would make every test wait a third of a second per request; the test of the limiter itself puts
    them back. (Each fake server has its own port, hence its own limiter, so no test sees another's.)"""
    monkeypatch.setattr(pubmed, "RATE_WITHOUT_KEY", 1000.0)
    monkeypatch.setattr(pubmed, "RATE_WITH_KEY", 1000.0)


@pytest.fixture
def server():
    with FakeEutils() as fake:
        yield fake


def _settings(base_url: str = "http://127.0.0.1:9/", **overrides) -> EvidenceSettings:
    values = dict(evidence_base_url=base_url, evidence_email="tests@example.org", evidence_timeout=2.0,
                  evidence_backoff=0.01, evidence_local_data="/nonexistent")
    values.update(overrides)
    return EvidenceSettings(**values)


def _closed_port_url() -> str:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/entrez/eutils/"


# -- articles ------------------------------------------------------------------------------------------------------


def _xml(*pmids: str) -> str:
    return DOCTYPE + "<PubmedArticleSet>" + "".join(ARTICLES[p] for p in pmids) + "</PubmedArticleSet>"


def test_structured_abstract_keeps_its_sections_and_markup_becomes_plain_text():
    (article,) = parse_pubmed_xml(_xml(STRUCTURED))
    assert article.pmid == STRUCTURED
    assert article.title == "Do β-blockers reduce Helicobacter pylori relapse in Sjögren's syndrome?"
    assert article.journal == "Scandinavian Journal of Rheumatology" and article.year == 2020
    assert [s.label for s in article.sections] == ["BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS"]
    assert article.sections[0].text == "Relapse of H. pylori infection is common in Sjögren's syndrome."
    assert "(12% vs 30%, p<0.01)" in article.sections[2].text  # entity decoded, whitespace collapsed
    assert article.conclusion == "β-blockers reduce relapse."
    assert "©" not in article.abstract  # copyright lines are not abstract text
    assert article.url == f"https://pubmed.ncbi.nlm.nih.gov/{STRUCTURED}/"
    assert article.citation() == {"pmid": STRUCTURED, "title": article.title, "journal": article.journal,
                                  "year": 2020, "url": article.url}
    lines = article.context_text().splitlines()
    assert lines[0].startswith("BACKGROUND: Relapse") and lines[-1] == "CONCLUSIONS: β-blockers reduce relapse."
    assert "CONCLUSIONS" not in article.context_text(include_conclusion=False)


def test_unstructured_abstract_medline_date_and_conclusion_from_the_last_sentence():
    articles = parse_pubmed_xml(_xml(UNSTRUCTURED, NO_ABSTRACT))
    unstructured, no_abstract = articles
    assert unstructured.year == 1998  # "1998 Dec-1999 Jan"
    assert unstructured.sections == (AbstractSection(text=unstructured.abstract),)
    assert "10 2 events" in unstructured.abstract or "102 events" in unstructured.abstract
    assert unstructured.conclusion.startswith("Aspirin use is associated with fewer myocardial infarctions")
    assert unstructured.context_text() == unstructured.abstract  # no labels: the paragraph as it is
    assert not no_abstract.has_abstract and no_abstract.title == "A letter without an abstract."


def test_a_short_last_sentence_takes_the_one_before_it():
    text = "We studied many adults for a long time. Results varied. It helped."
    article = Article("1", "t", (AbstractSection(text),))
    assert article.conclusion == "Results varied. It helped."


@pytest.mark.parametrize("document", ["", "   ", "<PubmedArticleSet><PubmedArticle>", "<html>busy</html>",
                                      '<!DOCTYPE x [<!ENTITY a "aaaa">]><PubmedArticleSet/>'])
def test_malformed_empty_or_foreign_documents_are_refused(document):
    with pytest.raises(ArticleParseError):
        parse_pubmed_xml(document)


def test_an_empty_article_set_is_no_articles():
    assert parse_pubmed_xml(DOCTYPE + "<PubmedArticleSet>\n</PubmedArticleSet>") == []


# -- the query -----------------------------------------------------------------------------------------------------


def test_query_keeps_content_words_and_drops_query_syntax():
    strict, loose = build_queries('Does "aspirin" [MeSH] reduce* the risk of myocardial infarction (MI) in COVID-19?')
    assert strict == "aspirin mesh reduce risk myocardial infarction mi covid-19"
    assert loose == " OR ".join(strict.split())
    assert build_queries("Is it, or is it not?") is None


def test_long_questions_are_cut_at_a_word_boundary():
    question = "aspirin " * 200
    strict, _ = build_queries(question + "zebrafish", max_chars=300)
    assert "zebrafish" not in strict and strict == "aspirin"
    terms = build_queries(" ".join(f"term{i}" for i in range(100)), max_chars=300)[0].split()
    assert 0 < len(terms) <= 16 and all(len(t) > 1 for t in terms)


# -- the PubMed source ---------------------------------------------------------------------------------------------


def test_pubmed_search_skips_articles_without_abstract_and_vanished_pmids(server):
    evidence = EvidenceSearch(_settings(server.url))
    result = evidence.search("Do beta-blockers reduce H. pylori relapse?", k=3, source="pubmed")
    assert result.source == "pubmed" and result.message == "Evidence: PubMed (2 articles)"
    assert [a.pmid for a in result.articles] == [STRUCTURED, UNSTRUCTURED]
    (search,) = server.requests_to("esearch")
    assert search.method == "POST"
    assert search.params == {"db": "pubmed", "term": "beta-blockers reduce pylori relapse", "retmax": "6",
                             "sort": "relevance", "retmode": "json", "tool": "pubmedqa-chat",
                             "email": "tests@example.org"}
    (fetch,) = server.requests_to("efetch")
    assert fetch.params["id"] == ",".join([STRUCTURED, NO_ABSTRACT, VANISHED, UNSTRUCTURED])
    assert (fetch.params["db"], fetch.params["retmode"]) == ("pubmed", "xml")
    assert "api_key" not in search.params  # no key in the environment


def test_a_strict_query_with_too_few_hits_is_loosened():
    with FakeEutils(hits=[], loose_hits=[UNSTRUCTURED]) as fake:
        result = EvidenceSearch(_settings(fake.url)).search("aspirin infarction adults", k=3, source="pubmed")
        assert [r.params["term"] for r in fake.requests_to("esearch")] == [
            "aspirin infarction adults", "aspirin OR infarction OR adults"]
    assert [a.pmid for a in result.articles] == [UNSTRUCTURED]


def test_429_with_retry_after_is_waited_for_then_succeeds(server):
    server.fail("esearch", "429")
    start = time.monotonic()
    result = EvidenceSearch(_settings(server.url)).search("aspirin", k=2, source="pubmed")
    assert result.source == "pubmed" and len(result.articles) == 2
    first, second = server.requests_to("esearch")
    assert second.at - first.at >= 0.95  # Retry-After: 1
    assert time.monotonic() - start < 5


def test_server_errors_are_retried_then_reported_in_one_line(server):
    server.fail("esearch", "500", "500", "500")
    result = EvidenceSearch(_settings(server.url, evidence_retries=2)).search("aspirin", source="pubmed")
    assert result.articles == () and result.source == "none"
    assert result.message == "PubMed could not be reached (server error, HTTP 500); answering without evidence."
    assert len(server.requests_to("esearch")) == 3


def test_one_server_error_is_retried_transparently(server):
    server.fail("efetch", "503")
    result = EvidenceSearch(_settings(server.url, evidence_retries=1)).search("aspirin", source="pubmed")
    assert result.source == "pubmed" and len(server.requests_to("efetch")) == 2


def test_a_response_slower_than_the_timeout_is_a_timeout(server):
    server.slow_seconds = 1.5
    server.fail("esearch", "slow")
    start = time.monotonic()
    result = EvidenceSearch(_settings(server.url, evidence_timeout=0.3, evidence_retries=0)).search(
        "aspirin", source="pubmed")
    assert result.message == "PubMed could not be reached (timeout); answering without evidence."
    assert time.monotonic() - start < 1.4


@pytest.mark.parametrize("fault", ["malformed", "empty"])
def test_unreadable_xml_is_an_empty_result_with_one_line(server, fault):
    server.fail("efetch", fault)
    result = EvidenceSearch(_settings(server.url)).search("aspirin", source="pubmed")
    assert result.articles == () and result.source == "none"
    assert result.message == "PubMed could not be reached (unreadable response); answering without evidence."


def test_only_vanished_pmids_found_nothing():
    with FakeEutils(hits=[VANISHED, NO_ABSTRACT]) as fake:
        result = EvidenceSearch(_settings(fake.url)).search("aspirin", source="pubmed")
    assert result.articles == () and result.source == "pubmed"
    assert result.message.startswith("Evidence: PubMed found no article with an abstract")


def test_connection_refused_and_dns_failure_are_one_line_each():
    refused = EvidenceSearch(_settings(_closed_port_url())).search("aspirin", source="pubmed")
    assert refused.message == "PubMed could not be reached (connection refused); answering without evidence."

    def no_dns(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)

    dns = EvidenceSearch(_settings("https://eutils.example.invalid/"), transport=httpx.MockTransport(no_dns))
    assert dns.search("aspirin", source="pubmed").message == (
        "PubMed could not be reached (DNS lookup failed); answering without evidence.")


def test_a_repeated_question_is_answered_from_the_cache(server):
    evidence = EvidenceSearch(_settings(server.url))
    first = evidence.search("Does aspirin prevent infarction?", k=2, source="pubmed")
    n = len(server.requests)
    second = evidence.search("does  aspirin prevent infarction?", k=2, source="pubmed")
    assert len(server.requests) == n and second.articles == first.articles
    evidence.search("Does aspirin prevent infarction?", k=3, source="pubmed")  # another k: another search
    assert len(server.requests) > n


def test_the_api_key_is_sent_but_never_logged_or_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("NCBI_API_KEY", API_KEY)
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included: they log request URLs
    settings = _settings(server.url, evidence_retries=1)
    assert API_KEY not in repr(settings)
    evidence = EvidenceSearch(settings)
    ok = evidence.search("aspirin", source="pubmed")
    server.fail("esearch", "429", "500")
    failed = evidence.search("a different question about aspirin", source="pubmed")
    server.fail("*", "500")
    auto = evidence.search("a third question about aspirin", source="auto")
    messages = [ok.message, failed.message, auto.message]
    assert ok.source == "pubmed" and failed.source == "none"
    assert all(r.params.get("api_key") == API_KEY for r in server.requests)  # sent, in the body
    assert all(API_KEY not in r.path for r in server.requests)  # never in a URL
    assert API_KEY not in caplog.text and not any(API_KEY in m for m in messages)
    assert "HTTP Request" in caplog.text or "retry" in caplog.text  # the logs were captured at all


def test_requests_are_spaced_by_the_process_wide_rate_limit(server, monkeypatch):
    monkeypatch.setattr(pubmed, "RATE_WITHOUT_KEY", 3.0)
    monkeypatch.setattr(pubmed, "RATE_WITH_KEY", 10.0)
    evidence = EvidenceSearch(_settings(server.url))
    for i in range(3):
        evidence.search(f"question number {i} about aspirin", k=2, source="pubmed")
    times = [r.at for r in server.requests]
    assert len(times) == 6
    assert min(b - a for a, b in itertools.pairwise(times)) >= 1 / 3 - 0.02  # 3 a second without a key
    assert shared_limiter(server.url, False) is shared_limiter(server.url, False)
    monkeypatch.setenv("NCBI_API_KEY", API_KEY)
    assert EvidenceSearch(_settings(server.url)).pubmed._limiter.interval == pytest.approx(0.1)  # 10 with a key


def test_cache_entries_expire_and_the_least_recent_goes_first():
    now = [0.0]
    cache = TTLCache(size=2, ttl=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    now[0] = 11
    assert cache.get("a") is None and cache.get("c") is None
    TTLCache(size=0, ttl=10).put("x", 1)  # size 0: no cache, no error


def test_auto_checks_pubmed_again_once_the_recheck_time_has_passed(server, pubmedqa_dir):
    evidence = EvidenceSearch(_settings(server.url, evidence="auto", evidence_recheck=0,
                                        evidence_local_data=str(pubmedqa_dir)))
    server.fail("einfo", "500")
    assert evidence.search("aspirin and stroke", k=2).source == "local"
    assert evidence.search("aspirin and stroke", k=2).source == "pubmed"  # checked again: reachable now
    assert [r.endpoint for r in server.requests].count("einfo") == 2


def test_rate_limiter_spaces_threads():
    limiter = RateLimiter(rate=20)
    starts: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(3):
            limiter.acquire()
            with lock:
                starts.append(time.monotonic())

    threads = [threading.Thread(target=take) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    starts.sort()
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.05 - 0.01


# -- the local index and the source choice ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_evidence(pubmedqa_dir) -> EvidenceSearch:
    evidence = EvidenceSearch(_settings(evidence_local_data=str(pubmedqa_dir), evidence="local"))
    evidence.local_index()
    return evidence


def test_a_pubmedqa_question_finds_its_own_abstract(local_evidence, pubmedqa_dir):
    records = load_local(pubmedqa_dir)
    test_ids = set(load_test_ids(pubmedqa_dir))
    sample = [r for pubid, r in sorted(records.items()) if pubid not in test_ids][::25]  # 20 non-test questions
    found = 0
    for record in sample:
        result = local_evidence.search(record.question, k=5)
        found += record.pubid in [a.pmid for a in result.articles]
    assert found >= len(sample) - 1
    result = local_evidence.search(records["21645374"].question, k=5)
    assert result.source == "local" and result.articles[0].pmid == "21645374"
    assert result.message == f"Evidence: local index of 1,000 PubMedQA abstracts, {len(result.articles)} " + (
        "articles" if len(result.articles) > 1 else "article")
    article = result.articles[0]
    assert article.year == 2011 and article.conclusion == records["21645374"].long_answer
    assert article.context_text(include_conclusion=False) == records["21645374"].context
    assert all(0 < s <= 1 for s in result.scores) and list(result.scores) == sorted(result.scores, reverse=True)


def test_an_unrelated_question_finds_nothing_locally(local_evidence):
    result = local_evidence.search("What is the capital city of Mongolia's neighbouring country?", k=5)
    assert result.articles == () and result.source == "local"
    assert result.message.startswith("Evidence: no article in the local index of 1,000 PubMedQA abstracts")


def test_extra_abstract_files_in_both_formats(tmp_path, caplog):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([
        {"pmid": "1", "title": "Zebrafish fin regeneration", "abstract": "Zebrafish regrow fins after amputation.",
         "journal": "Dev Biol", "year": 2001},
        {"pmid": "2", "title": "Axolotl limbs", "contexts": ["Axolotls regrow limbs.", "Blastema cells help."],
         "labels": ["background", "results"]},
    ]))
    pqa = tmp_path / "pqa.json"
    pqa.write_text(json.dumps({"3": {"QUESTION": "Do planarians regenerate heads?",
                                     "CONTEXTS": ["Planarian neoblasts."],
                                     "LABELS": ["BACKGROUND"], "LONG_ANSWER": "They do.", "YEAR": "2005"}}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    evidence = EvidenceSearch(_settings(evidence="local", evidence_local_files=f"{listed}, {pqa},{broken}"))
    result = evidence.search("zebrafish regeneration", k=3)
    assert result.articles[0].citation()["journal"] == "Dev Biol" and result.articles[0].year == 2001
    assert evidence.local_index().description == "3 abstracts"
    axolotl = evidence.search("axolotl limbs", k=1).articles[0]
    assert axolotl.context_text() == "BACKGROUND: Axolotls regrow limbs.\nRESULTS: Blastema cells help."
    # a PubMedQA-format title is its question: not indexed, so only the abstract can match
    assert evidence.search("heads", k=1).articles == ()
    assert evidence.search("neoblasts", k=1).articles[0].conclusion == "They do."
    assert "broken.json is not readable JSON" in caplog.text


def test_no_local_abstracts_is_one_line():
    result = EvidenceSearch(_settings(evidence="local")).search("aspirin")
    assert result.source == "none" and result.articles == ()
    assert result.message.startswith("No local abstracts are available")


def test_auto_uses_pubmed_when_it_answers(server, pubmedqa_dir):
    evidence = EvidenceSearch(_settings(server.url, evidence="auto", evidence_local_data=str(pubmedqa_dir)))
    result = evidence.search("aspirin infarction", k=2)
    assert result.source == "pubmed" and result.message == "Evidence: PubMed (2 articles)"
    assert [r.endpoint for r in server.requests] == ["einfo", "esearch", "efetch"]
    evidence.search("aspirin and stroke", k=2)
    assert [r.endpoint for r in server.requests].count("einfo") == 1  # the check is cached


def test_auto_falls_back_to_the_local_index_when_pubmed_is_down(pubmedqa_dir):
    evidence = EvidenceSearch(_settings(_closed_port_url(), evidence="auto", evidence_local_data=str(pubmedqa_dir)))
    records = load_local(pubmedqa_dir)
    result = evidence.search(records["21645374"].question, k=3)
    assert result.source == "local" and result.articles[0].pmid == "21645374"
    assert result.message.startswith("Evidence: local index of 1,000 PubMedQA abstracts, ")
    assert result.message.endswith("(PubMed unreachable: connection refused)")
    sent = evidence.pubmed.requests_sent
    evidence.search("aspirin and myocardial infarction", k=3)
    assert evidence.pubmed.requests_sent == sent  # remembered as down: no new attempt until the recheck


def test_auto_falls_back_when_pubmed_fails_after_the_check(server, pubmedqa_dir):
    server.fail("esearch", "500", "500")
    evidence = EvidenceSearch(_settings(server.url, evidence="auto", evidence_retries=1,
                                        evidence_local_data=str(pubmedqa_dir)))
    result = evidence.search("aspirin and myocardial infarction", k=3)
    assert result.source == "local" and result.message.endswith("(PubMed unreachable: server error, HTTP 500)")


def test_off_and_empty_questions_search_nothing(server):
    evidence = EvidenceSearch(_settings(server.url, evidence="off"))
    assert evidence.search("aspirin").message == "Evidence: off"
    assert EvidenceSearch(_settings(server.url)).search("   ", source="pubmed").source == "none"
    assert server.requests == []
    with pytest.raises(ValueError):
        evidence.search("aspirin", k=0)


def test_a_bug_inside_a_source_never_reaches_the_caller(local_evidence, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(local_evidence.local_index()), "search", broken)
    result = local_evidence.search("aspirin")
    assert result.message == "Evidence retrieval failed (internal error); answering without evidence."
    assert "RuntimeError: boom" in caplog.text


def test_concurrent_searches_share_one_client_and_index(server, pubmedqa_dir):
    evidence = EvidenceSearch(_settings(server.url, evidence_local_data=str(pubmedqa_dir)))
    results: list = []

    def run(i: int) -> None:
        results.append(evidence.search("mitochondria programmed cell death", k=2, source=("local", "pubmed")[i % 2]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and {r.source for r in results} == {"local", "pubmed"}
    assert len({tuple(a.pmid for a in r.articles) for r in results if r.source == "local"}) == 1
    assert len(server.requests_to("esearch")) >= 1


def test_context_text_numbers_the_articles_and_keeps_whole_ones_within_a_limit():
    articles = parse_pubmed_xml(_xml(STRUCTURED, UNSTRUCTURED))
    from pubmedqa.evidence import EvidenceResult

    result = EvidenceResult(tuple(articles), "pubmed", "Evidence: PubMed (2 articles)")
    text = result.context_text()
    assert text.startswith("[1] Do β-blockers reduce Helicobacter pylori relapse in Sjögren's syndrome? "
                           f"(Scandinavian Journal of Rheumatology, 2020) PMID {STRUCTURED}\nBACKGROUND: ")
    second = f"[2] Aspirin and myocardial infarction: a cohort study. (Journal of Tests, 1998) PMID {UNSTRUCTURED}"
    assert f"\n\n{second}\n" in text
    first = result.context_text(max_chars=len(text) - 1)
    assert first.startswith("[1]") and "[2]" not in first
    assert len(result.context_text(max_chars=50)) == 50
    assert [c["pmid"] for c in result.citations()] == [STRUCTURED, UNSTRUCTURED]


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("PUBMEDQA_EVIDENCE", "local")
    monkeypatch.setenv("PUBMEDQA_EVIDENCE_K", "3")
    monkeypatch.setenv("PUBMEDQA_EVIDENCE_TIMEOUT", "4.5")
    (settings,) = parse_settings([EvidenceSettings], ["--evidence_email", "me@example.org"])
    assert (settings.evidence, settings.evidence_k, settings.evidence_timeout) == ("local", 3, 4.5)
    assert settings.evidence_email == "me@example.org" and settings.ncbi_api_key is None
    with pytest.raises(ValueError, match="PUBMEDQA_EVIDENCE"):
        EvidenceSettings(evidence="google")
    defaults = EvidenceSettings()
    assert defaults.evidence_base_url == "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"


def test_an_article_set_with_a_book_and_a_deleted_citation():
    book = """<PubmedBookArticle><BookDocument><PMID>20301295</PMID><ArticleTitle>Cystic Fibrosis</ArticleTitle>
        <Book><Publisher><PublisherName>University of Washington</PublisherName></Publisher>
        <BookTitle>GeneReviews</BookTitle><PubDate><Year>2001</Year></PubDate></Book>
        <Abstract><AbstractText Label="CLINICAL CHARACTERISTICS">CF affects the lungs.</AbstractText></Abstract>
        </BookDocument></PubmedBookArticle>"""
    xml = DOCTYPE + f"<PubmedArticleSet>{book}<DeleteCitation><PMID>1</PMID></DeleteCitation>" + \
        pubmed_article("5", "Title", "<AbstractText>Text.</AbstractText>") + "</PubmedArticleSet>"
    book_article, article = parse_pubmed_xml(xml)
    assert (book_article.pmid, book_article.year) == ("20301295", 2001)
    assert book_article.journal == "University of Washington"
    assert book_article.context_text() == "CLINICAL CHARACTERISTICS: CF affects the lungs."
    assert article.pmid == "5"
