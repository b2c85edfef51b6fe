"""PubMed through NCBI E-utilities: esearch (PMIDs by relevance) then efetch (their records as XML).

A well-behaved client, as NCBI asks (https://www.ncbi.nlm.nih.gov/books/NBK25497/): ``tool`` and ``email`` on every
request, at most 3 requests a second (10 with an API key) across the whole process, retries with exponential
backoff on HTTP 429/5xx and timeouts (Retry-After honoured), and a small in-memory cache so a repeated question
costs no request. Every failure becomes :class:`EvidenceUnavailable` with a one-line message.

Requests are POSTs with form-encoded parameters (E-utilities accept POST for every utility): the API key then
travels in the body, never in a URL, so neither httpx's request log line nor an exception's text can show it.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import httpx

from pubmedqa.config import EvidenceSettings
from pubmedqa.evidence.articles import Article, ArticleParseError, parse_pubmed_xml
from pubmedqa.evidence.errors import BAD_RESPONSE, RATE_LIMITED, TIMEOUT, EvidenceUnavailable, redact
from pubmedqa.evidence.terms import words

logger = logging.getLogger(__name__)

RATE_WITHOUT_KEY = 3.0  # requests per second NCBI allows without an API key
RATE_WITH_KEY = 10.0
MAX_RETRY_AFTER = 10.0  # a server asking to wait longer than this is not waited for: the user is waiting too
PING_TIMEOUT = 3.0  # the reachability check must be quick: 'auto' falls back to the local index on failure
MAX_TERMS = 16  # words of the question that go into the query
MAX_FETCH = 40  # PMIDs fetched per question at most


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart, across threads. A caller reserves the next free
    slot under the lock and sleeps outside it, so waiting threads queue in order without holding the lock."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / rate
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for this caller's slot; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait

    def defer(self, seconds: float) -> None:
        """No request starts in the next ``seconds`` (a server's Retry-After applies to every thread)."""
        with self._lock:
            self._next = max(self._next, self._clock() + seconds)


# NCBI's limit is per client (IP address, or API key), not per object: one limiter per server and key, shared by
# every client in the process.
_LIMITERS: dict[tuple[str, bool], RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def shared_limiter(base_url: str, with_key: bool) -> RateLimiter:
    """The process-wide limiter for ``base_url``: 10 requests a second with an API key, 3 without."""
    with _LIMITERS_LOCK:
        key = (base_url, with_key)
        if key not in _LIMITERS:
            _LIMITERS[key] = RateLimiter(RATE_WITH_KEY if with_key else RATE_WITHOUT_KEY)
        return _LIMITERS[key]


class TTLCache:
    """A small LRU cache whose entries also expire ``ttl`` seconds after they were stored. Thread-safe."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl, self._clock = size, ttl, clock
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self._clock() - item[0] > self.ttl:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = (self._clock(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def truncate_question(question: str, max_chars: int) -> str:
    """At most ``max_chars`` of ``question``, cut at a word boundary."""
    question = " ".join(question.split())
    if len(question) <= max_chars:
        return question
    cut = question[:max_chars]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def build_queries(question: str, max_chars: int = 300) -> tuple[str, str] | None:
    """The esearch terms for a natural-language question: (strict, loose), or None when it has no content words.

    Sent verbatim, a question rarely finds anything: PubMed ANDs every word, stopwords and the question's frame
    included ("Does", "play", "a", "role"...). So the question is reduced to its content words, without punctuation
    or query syntax (quotes, brackets, field tags, wildcards), and searched twice at most:

    - strict: the words separated by spaces, which lets PubMed's automatic term mapping turn them into MeSH terms
      and phrases and AND them — precise, but often fewer hits than wanted for a long question;
    - loose: the same words ORed, when the strict query found fewer than k articles. With ``sort=relevance``
      (Best Match) the articles matching most of the words come first, so it fills the list sensibly.
    """
    terms = list(dict.fromkeys(words(truncate_question(question, max_chars))))[:MAX_TERMS]
    if not terms:
        return None
    return " ".join(terms), " OR ".join(terms)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds a 429/503 response asks to wait: Retry-After as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _connect_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "name or service" in text or "name resolution" in text or "nodename" in text or "getaddrinfo" in text:
        return "DNS lookup failed"
    if "refused" in text:
        return "connection refused"
    return "connection failed"


class PubMedClient:
    """Searches PubMed for a question's articles. Thread-safe (httpx's client is; the cache and limiter lock)."""

    def __init__(self, settings: EvidenceSettings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._api_key = settings.ncbi_api_key
        base_url = settings.evidence_base_url.rstrip("/") + "/"
        self.base_url = base_url
        self._limiter = shared_limiter(base_url, self._api_key is not None)
        self._cache = TTLCache(settings.evidence_cache_size, settings.evidence_cache_ttl)
        self._client = httpx.Client(
            base_url=base_url, timeout=httpx.Timeout(settings.evidence_timeout), transport=transport,
            headers={"User-Agent": f"{settings.evidence_tool} (python-httpx)"},
            # No redirects: httpx turns a POST into a body-less GET on 301/302, which would lose every parameter.
            follow_redirects=False,
        )
        self._stats_lock = threading.Lock()
        self.requests_sent = 0  # HTTP requests made, retries included (for tests and benchmarks)

    def close(self) -> None:
        self._client.close()

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = {**params, "tool": self.settings.evidence_tool}
        if self.settings.evidence_email:
            params["email"] = self.settings.evidence_email
        if self._api_key:
            params["api_key"] = self._api_key
        return params

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key)

    def _post(self, endpoint: str, params: dict[str, Any], retries: int,
              timeout: float | None = None) -> httpx.Response:
        """POST to an E-utility, retrying HTTP 429/5xx, timeouts and dropped connections; one exception type out."""
        data = self._params(params)
        for attempt in range(retries + 1):
            self._limiter.acquire()
            with self._stats_lock:
                self.requests_sent += 1
            wait: float | None = None
            try:
                response = self._client.post(endpoint, data=data, **({"timeout": timeout} if timeout else {}))
            except httpx.TimeoutException:
                failure = EvidenceUnavailable(TIMEOUT)
            except httpx.ConnectError as exc:
                # DNS failure or refused connection: retrying within the same second will not help.
                raise EvidenceUnavailable(_connect_reason(exc)) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                failure = EvidenceUnavailable("connection dropped")
            except httpx.HTTPError as exc:
                raise EvidenceUnavailable(f"network error, {type(exc).__name__}") from None
            else:
                status = response.status_code
                if status == 200:
                    return response
                if status == 429:
                    failure = EvidenceUnavailable(RATE_LIMITED)
                    wait = _retry_after(response)
                elif status >= 500:
                    failure = EvidenceUnavailable(f"server error, HTTP {status}")
                    wait = _retry_after(response) if status == 503 else None
                else:  # 400 (a bad or revoked API key, a refused query), 404 (a wrong base URL): not transient
                    raise EvidenceUnavailable(f"HTTP {status}")
            if attempt == retries:
                raise failure
            if wait is not None and wait > MAX_RETRY_AFTER:
                logger.warning("PubMed %s: %s, asked to wait %.0f s; giving up", endpoint, failure.reason, wait)
                raise failure
            if wait is not None:
                self._limiter.defer(wait)  # the server's wait holds for every thread's next request
            else:
                wait = self.settings.evidence_backoff * 2**attempt * random.uniform(1.0, 1.25)
            logger.warning("PubMed %s%s: %s; retry %d of %d in %.1f s", self.base_url, endpoint, failure.reason,
                           attempt + 1, retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def ping(self) -> None:
        """A cheap check that E-utilities answer (einfo, no retries, a short timeout); raises EvidenceUnavailable."""
        response = self._post("einfo.fcgi", {"retmode": "json"}, retries=0,
                              timeout=min(PING_TIMEOUT, self.settings.evidence_timeout))
        try:
            ok = isinstance(response.json().get("einforesult"), dict)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise EvidenceUnavailable(BAD_RESPONSE)

    def esearch(self, term: str, retmax: int) -> list[str]:
        """PMIDs for ``term``, most relevant first."""
        response = self._post("esearch.fcgi", {"db": "pubmed", "term": term, "retmax": retmax, "sort": "relevance",
                                               "retmode": "json"}, self.settings.evidence_retries)
        try:
            result = response.json()["esearchresult"]
            ids = result.get("idlist", [])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EvidenceUnavailable(BAD_RESPONSE) from None
        if "ERROR" in result:  # e.g. a engine failure reported with HTTP 200
            logger.warning("PubMed esearch reported an error: %s", self._redact(str(result["ERROR"]))[:200])
            raise EvidenceUnavailable(BAD_RESPONSE)
        return [str(pmid) for pmid in ids if str(pmid).isdigit()]

    def efetch(self, pmids: list[str]) -> list[Article]:
        """The records of ``pmids`` (PMIDs PubMed no longer has are simply absent)."""
        response = self._post("efetch.fcgi", {"db": "pubmed", "id": ",".join(pmids), "retmode": "xml",
                                              "rettype": "abstract"}, self.settings.evidence_retries)
        try:
            return parse_pubmed_xml(response.content)
        except ArticleParseError as exc:
            logger.warning("PubMed efetch sent XML that could not be read: %s", self._redact(str(exc))[:200])
            raise EvidenceUnavailable(BAD_RESPONSE) from None

    # -- search --------------------------------------------------------------------------------------------------

    def search(self, question: str, k: int) -> list[Article]:
        """Up to ``k`` articles with an abstract for ``question``, most relevant first. Raises EvidenceUnavailable."""
        key = (" ".join(question.lower().split()), k)
        cached = self._cache.get(key)
        if cached is not None:
            return list(cached)
        start = time.perf_counter()
        queries = build_queries(question, self.settings.evidence_max_query_chars)
        if queries is None:
            return []
        strict, loose = queries
        # Fetch more PMIDs than asked for: some records have no abstract, and some PMIDs vanish between the two calls.
        wanted = min(max(2 * k, k + 3), MAX_FETCH)
        pmids = self.esearch(strict, wanted)
        if len(pmids) < k and loose != strict:
            pmids += [pmid for pmid in self.esearch(loose, wanted) if pmid not in pmids]
        pmids = pmids[:wanted]
        articles: list[Article] = []
        if pmids:
            by_pmid = {article.pmid: article for article in self.efetch(pmids)}
            missing = [pmid for pmid in pmids if pmid not in by_pmid]
            if missing:
                logger.info("PubMed efetch did not return %d of %d PMIDs (withdrawn or merged)", len(missing),
                            len(pmids))
            articles = [by_pmid[pmid] for pmid in pmids if pmid in by_pmid and by_pmid[pmid].has_abstract][:k]
        logger.info("PubMed: %d article(s) from %d PMID(s) in %.2f s", len(articles), len(pmids),
                    time.perf_counter() - start)
        self._cache.put(key, tuple(articles))
        return articles
