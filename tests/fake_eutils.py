"""A fake NCBI E-utilities server for tests and benchmarks: stdlib http.server in a thread on 127.0.0.1, a random
port. It answers esearch (JSON) and efetch (XML in PubMed's PubmedArticleSet format), GET or POST, records every
request, and plays scripted faults (429 with Retry-After, 500, a response slower than the client's timeout,
malformed or empty XML).

    with FakeEutils() as server:
        settings = EvidenceSettings(evidence_base_url=server.url)
        server.fail("esearch", "429")    # the next esearch request gets a 429, then normal service
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DOCTYPE = ('<?xml version="1.0" ?>\n'
           '<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
           '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n')


def pubmed_article(pmid: str, title: str, abstract: str | None, journal: str = "Journal of Tests",
                   pub_date: str = "<Year>2020</Year><Month>Mar</Month>") -> str:
    """One <PubmedArticle> as efetch writes it; ``title`` and ``abstract`` are XML (markup allowed), ``abstract``
    the inner XML of <Abstract> or None for an article without one."""
    abstract_xml = f"<Abstract>{abstract}</Abstract>" if abstract is not None else ""
    return f"""<PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM">
        <PMID Version="1">{pmid}</PMID>
        <Article PubModel="Print-Electronic">
            <Journal>
                <ISSN IssnType="Electronic">1234-5678</ISSN>
                <JournalIssue CitedMedium="Internet"><Volume>12</Volume><Issue>3</Issue>
                    <PubDate>{pub_date}</PubDate>
                </JournalIssue>
                <Title>{journal}</Title>
                <ISOAbbreviation>J Tests</ISOAbbreviation>
            </Journal>
            <ArticleTitle>{title}</ArticleTitle>
            {abstract_xml}
            <Language>eng</Language>
        </Article>
        <MedlineJournalInfo><MedlineTA>J Tests</MedlineTA></MedlineJournalInfo>
    </MedlineCitation>
    <PubmedData><PublicationStatus>ppublish</PublicationStatus></PubmedData>
</PubmedArticle>"""


# The default store: a structured abstract (Label and NlmCategory attributes) with a title in <i> markup and
# non-ASCII text; an unstructured abstract with a MedlineDate and <sup>; an article without an abstract. PMID
# 39999999 is "vanished": esearch returns it, efetch does not.
STRUCTURED = "31000001"
UNSTRUCTURED = "31000002"
NO_ABSTRACT = "31000003"
VANISHED = "39999999"
ARTICLES: dict[str, str] = {
    STRUCTURED: pubmed_article(
        STRUCTURED,
        "Do β-blockers reduce <i>Helicobacter pylori</i> relapse in Sjögren's syndrome?",
        """
            <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Relapse of <i>H. pylori</i> infection is
                common in Sjögren's syndrome.</AbstractText>
            <AbstractText Label="METHODS" NlmCategory="METHODS">We randomised 120 patients (≥ 18 years) to
                β-blockers or placebo.</AbstractText>
            <AbstractText Label="RESULTS" NlmCategory="RESULTS">Relapse was lower with β-blockers
                (12% vs 30%, p&lt;0.01).</AbstractText>
            <AbstractText Label="CONCLUSIONS" NlmCategory="CONCLUSIONS">β-blockers reduce relapse.</AbstractText>
            <CopyrightInformation>© 2020 The Authors.</CopyrightInformation>
        """,
        journal="Scandinavian Journal of Rheumatology",
    ),
    UNSTRUCTURED: pubmed_article(
        UNSTRUCTURED,
        "Aspirin and myocardial infarction: a cohort study.",
        """<AbstractText>Aspirin use was recorded in 5,000 adults. Infarction rates fell by 10<sup>2</sup>
            events per year among users. Aspirin use is associated with fewer myocardial infarctions in adults
            followed for ten years.</AbstractText>""",
        pub_date="<MedlineDate>1998 Dec-1999 Jan</MedlineDate>",
    ),
    NO_ABSTRACT: pubmed_article(NO_ABSTRACT, "A letter without an abstract.", None),
}
DEFAULT_HITS = [STRUCTURED, NO_ABSTRACT, VANISHED, UNSTRUCTURED]
FAULTS = ("429", "500", "503", "slow", "malformed", "empty")


@dataclass(frozen=True)
class Request:
    method: str
    endpoint: str  # "esearch", "efetch", "einfo"
    path: str  # the URL path with its query string, as received
    params: dict[str, str]  # query string and form body together
    at: float  # time.monotonic() of its arrival


class FakeEutils:
    def __init__(self, articles: dict[str, str] | None = None, hits: list[str] | None = None,
                 loose_hits: list[str] | None = None, latency: float = 0.0, slow_seconds: float = 2.0,
                 retry_after: str = "1") -> None:
        self.articles = dict(ARTICLES if articles is None else articles)
        self.hits = list(DEFAULT_HITS if hits is None else hits)  # esearch's answer to a query without OR
        self.loose_hits = list(self.hits if loose_hits is None else loose_hits)  # ...and to an OR query
        self.latency = latency  # seconds added to every response (the benchmark's network)
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.requests: list[Request] = []
        self._faults: deque[tuple[str, str]] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- control --------------------------------------------------------------------------------------------------

    def fail(self, endpoint: str, *modes: str) -> None:
        """Queue faults for the next requests to ``endpoint`` ("esearch", "efetch", "einfo" or "*"), one each."""
        for mode in modes:
            assert mode in FAULTS, mode
            self._faults.append((endpoint, mode))

    def _take_fault(self, endpoint: str) -> str | None:
        with self._lock:
            for item in self._faults:
                if item[0] in (endpoint, "*"):
                    self._faults.remove(item)
                    return item[1]
        return None

    def requests_to(self, endpoint: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/entrez/eutils/"

    def start(self) -> FakeEutils:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self, "")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fake._handle(self, self.rfile.read(length).decode("utf-8"))

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeEutils:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving --------------------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, body: str) -> None:
        url = urlsplit(handler.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        params.update({k: v[-1] for k, v in parse_qs(body).items()})
        endpoint = url.path.rsplit("/", 1)[-1].removesuffix(".fcgi")
        with self._lock:
            self.requests.append(Request(handler.command, endpoint, handler.path, params, time.monotonic()))
        if self.latency:
            time.sleep(self.latency)
        fault = self._take_fault(endpoint)
        if fault == "429":
            return self._send(handler, 429, b'{"error":"API rate limit exceeded"}', "application/json",
                              {"Retry-After": self.retry_after})
        if fault in ("500", "503"):
            return self._send(handler, int(fault), b"<html>Internal error</html>", "text/html")
        if fault == "slow":
            time.sleep(self.slow_seconds)
        if endpoint == "einfo":
            return self._send(handler, 200, json.dumps({"einforesult": {"dblist": ["pubmed"]}}).encode(),
                              "application/json")
        if endpoint == "esearch":
            ids = self.loose_hits if " OR " in params.get("term", "") else self.hits
            ids = ids[: int(params.get("retmax", 20))]
            payload = {"header": {"type": "esearch", "version": "0.3"},
                       "esearchresult": {"count": str(len(ids)), "retmax": str(len(ids)), "retstart": "0",
                                         "idlist": ids, "translationset": [],
                                         "querytranslation": params.get("term", "")}}
            return self._send(handler, 200, json.dumps(payload).encode(), "application/json")
        if endpoint == "efetch":
            if fault == "malformed":
                return self._send(handler, 200, (DOCTYPE + "<PubmedArticleSet><PubmedArticle><Medline").encode(),
                                  "text/xml")
            if fault == "empty":
                return self._send(handler, 200, b"", "text/xml")
            ids = [i for i in params.get("id", "").split(",") if i]
            xml = DOCTYPE + "<PubmedArticleSet>\n" + "\n".join(self.articles[i] for i in ids if i in self.articles)
            return self._send(handler, 200, (xml + "\n</PubmedArticleSet>\n").encode("utf-8"), "text/xml")
        return self._send(handler, 404, b"unknown utility", "text/plain")

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first: what the timeout tests want
