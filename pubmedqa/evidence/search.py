"""The public entry point: :class:`EvidenceSearch` picks the source (``auto``, ``pubmed``, ``local``, ``off``), runs
the search and returns an :class:`EvidenceResult` whose ``message`` is the status line the app shows.

``search`` never raises for anything the network, NCBI or the data files do: every failure is an empty result with
a one-line message. Its only exception is ValueError for a ``k`` below 1 or an unknown source name (a caller's bug).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import httpx

from pubmedqa.config import EVIDENCE_CHOICES, EvidenceSettings
from pubmedqa.evidence.articles import Article
from pubmedqa.evidence.errors import EvidenceUnavailable, is_unreachable, redact
from pubmedqa.evidence.local_index import LocalIndex, MiniLMReranker, load_local_corpus
from pubmedqa.evidence.pubmed import PubMedClient

logger = logging.getLogger(__name__)

MAX_K = 20  # more abstracts than this never fit a prompt anyway
RERANK_CANDIDATES = 20  # BM25 candidates the optional MiniLM re-ranker reorders


def _articles(n: int) -> str:
    return f"{n} article{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class EvidenceResult:
    """What a search found. ``source``: ``pubmed`` or ``local`` (where the articles come from), ``off`` (evidence
    disabled) or ``none`` (no source could be used). ``message``: one line for the user, plain text. ``scores``: the
    local index's score (share of the question's BM25 weight, 0-1) of each article, empty for PubMed."""

    articles: tuple[Article, ...]
    source: str
    message: str
    scores: tuple[float, ...] = field(default_factory=tuple)
    seconds: float = 0.0

    @property
    def found(self) -> bool:
        return bool(self.articles)

    def citations(self) -> list[dict[str, Any]]:
        return [article.citation() for article in self.articles]

    def context_text(self, max_chars: int | None = None, include_conclusion: bool = True) -> str:
        """The articles as one context string for the prompt (pubmedqa.prompts.PromptInput.context): each numbered,
        with its title, journal, year and PMID, then its labelled abstract. With ``max_chars``, whole articles are
        kept while they fit (the first is cut if even it does not), since the prompt fitting would otherwise cut
        the last article anywhere."""
        blocks = []
        for number, article in enumerate(self.articles, 1):
            source = ", ".join(str(part) for part in (article.journal, article.year) if part)
            header = f"[{number}] {article.title or '(untitled)'}" + (f" ({source})" if source else "")
            header += f" PMID {article.pmid}"
            blocks.append(f"{header}\n{article.context_text(include_conclusion)}")
        if max_chars is None:
            return "\n\n".join(blocks)
        kept: list[str] = []
        for block in blocks:
            if len("\n\n".join([*kept, block])) > max_chars:
                break
            kept.append(block)
        if not kept and blocks:
            return blocks[0][:max_chars]
        return "\n\n".join(kept)


class EvidenceSearch:
    """Evidence for questions, from the source the settings name. One instance serves the whole app: it is
    thread-safe, keeps the PubMed client (with its cache) and builds the local index once, on first use."""

    def __init__(self, settings: EvidenceSettings | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings or EvidenceSettings()
        self._transport = transport  # tests and benchmarks may route PubMed requests to a fake server
        self._pubmed: PubMedClient | None = None
        self._pubmed_lock = threading.Lock()
        self._index: LocalIndex | None = None
        self._index_error: EvidenceUnavailable | None = None
        self._index_lock = threading.Lock()
        self._reranker: MiniLMReranker | None = None
        self._reranker_failed = False
        # 'auto': when PubMed was last checked, and why it was unusable then (None: reachable).
        self._reachability: tuple[float, str | None] | None = None
        self._reachability_lock = threading.Lock()

    # -- the sources ---------------------------------------------------------------------------------------------

    @property
    def pubmed(self) -> PubMedClient:
        with self._pubmed_lock:
            if self._pubmed is None:
                self._pubmed = PubMedClient(self.settings, self._transport)
            return self._pubmed

    def local_index(self) -> LocalIndex:
        """The local BM25 index, built on first use (under a second for PubMedQA's 1,000 abstracts); raises
        EvidenceUnavailable when there are no local abstracts."""
        with self._index_lock:
            if self._index is not None:
                return self._index
            if self._index_error is not None:
                raise self._index_error
            corpus = load_local_corpus(self.settings)
            if not corpus.articles:
                self._index_error = EvidenceUnavailable(
                    "no local abstracts", source="Local index",
                    message="No local abstracts are available (set PUBMEDQA_EVIDENCE_LOCAL_DATA or "
                            "PUBMEDQA_EVIDENCE_LOCAL_FILES); answering without evidence.")
                raise self._index_error
            self._index = LocalIndex(corpus.articles, corpus.untitled, corpus.description)
            return self._index

    def _rerank(self, question: str, hits: list, index: LocalIndex) -> list:
        if not self.settings.evidence_rerank or self._reranker_failed:
            return hits
        try:
            if self._reranker is None:
                with self._index_lock:
                    if self._reranker is None:
                        self._reranker = MiniLMReranker()
            return self._reranker.rerank(question, hits, index)
        except (ImportError, RuntimeError, OSError, ValueError) as exc:
            self._reranker_failed = True  # once: no model here, so BM25's order stands from now on
            logger.warning("Evidence re-ranking is off: the MiniLM model could not be loaded (%s)", exc)
            return hits

    def pubmed_unavailable_reason(self) -> str | None:
        """Why PubMed is unusable now (None: reachable), from a cheap check cached ``evidence_recheck`` seconds."""
        with self._reachability_lock:
            state = self._reachability
            if state is not None and time.monotonic() - state[0] < self.settings.evidence_recheck:
                return state[1]
            try:
                self.pubmed.ping()
                reason = None
            except EvidenceUnavailable as exc:
                reason = exc.reason
                logger.info("PubMed is not reachable (%s); 'auto' uses the local index for %.0f s", reason,
                            self.settings.evidence_recheck)
            self._reachability = (time.monotonic(), reason)
            return reason

    def _remember(self, reason: str | None) -> None:
        with self._reachability_lock:
            self._reachability = (time.monotonic(), reason)

    # -- searching -----------------------------------------------------------------------------------------------

    def _search_pubmed(self, question: str, k: int) -> EvidenceResult:
        articles = self.pubmed.search(question, k)
        if not articles:
            return EvidenceResult((), "pubmed",
                                  "Evidence: PubMed found no article with an abstract for this question; "
                                  "answering without evidence.")
        return EvidenceResult(tuple(articles), "pubmed", f"Evidence: PubMed ({_articles(len(articles))})")

    def _search_local(self, question: str, k: int, note: str = "") -> EvidenceResult:
        index = self.local_index()
        rerank = self.settings.evidence_rerank and not self._reranker_failed
        hits = index.search(question, k, self.settings.evidence_local_min_score,
                            candidates=RERANK_CANDIDATES if rerank else None)
        hits = self._rerank(question, hits, index)[:k]
        suffix = f" ({note})" if note else ""
        if not hits:
            return EvidenceResult((), "local", f"Evidence: no article in the local index of {index.description} "
                                               f"matches this question{suffix}; answering without evidence.")
        return EvidenceResult(tuple(hit.article for hit in hits), "local",
                              f"Evidence: local index of {index.description}, {_articles(len(hits))}{suffix}",
                              scores=tuple(round(hit.score, 4) for hit in hits))

    def _search_auto(self, question: str, k: int) -> EvidenceResult:
        reason = self.pubmed_unavailable_reason()
        if reason is None:
            try:
                result = self._search_pubmed(question, k)
                self._remember(None)
                return result
            except EvidenceUnavailable as exc:
                reason = exc.reason
                if exc.unreachable:  # down, not just one bad answer: skip PubMed until the next check
                    self._remember(reason)
        verb = "unreachable" if is_unreachable(reason) else "unavailable"
        note = f"PubMed {verb}: {reason}"
        try:
            return self._search_local(question, k, note)
        except EvidenceUnavailable:
            return EvidenceResult((), "none", f"PubMed could not be used ({reason}) and no local abstracts are "
                                              "available; answering without evidence.")

    def search(self, question: str, k: int | None = None, source: str | None = None) -> EvidenceResult:
        """Up to ``k`` articles (default ``evidence_k``, at most 20) for ``question`` from ``source`` (default: the
        ``evidence`` setting). Never raises for failures of the sources (see the module's docstring)."""
        source = source or self.settings.evidence
        if source not in EVIDENCE_CHOICES:
            raise ValueError(f"evidence source must be one of {', '.join(EVIDENCE_CHOICES)}, got {source!r}")
        k = self.settings.evidence_k if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, MAX_K)
        if source == "off":
            return EvidenceResult((), "off", "Evidence: off")
        question = " ".join(question.split())
        if not question:
            return EvidenceResult((), "none", "Evidence: no question to search for.")
        start = time.perf_counter()
        try:
            if source == "pubmed":
                result = self._search_pubmed(question, k)
            elif source == "local":
                result = self._search_local(question, k)
            else:
                result = self._search_auto(question, k)
        except EvidenceUnavailable as exc:
            result = EvidenceResult((), "none", exc.user_message)
        except Exception:  # a bug, not a source failure: logged in full (key redacted), never shown to the user
            logger.error("Evidence retrieval failed:\n%s", redact(traceback.format_exc(), self.settings.ncbi_api_key))
            result = EvidenceResult((), "none",
                                    "Evidence retrieval failed (internal error); answering without evidence.")
        seconds = time.perf_counter() - start
        logger.info("%s (%.2f s)", result.message, seconds)
        return EvidenceResult(result.articles, result.source, result.message, result.scores, seconds)

    def close(self) -> None:
        with self._pubmed_lock:
            if self._pubmed is not None:
                self._pubmed.close()
                self._pubmed = None
