"""Evidence retrieval: the PubMed articles (or local abstracts) a question is answered from.

    from pubmedqa.config import EvidenceSettings
    from pubmedqa.evidence import EvidenceSearch

    evidence = EvidenceSearch(EvidenceSettings())            # one per process; thread-safe
    result = evidence.search("Does aspirin reduce the risk of myocardial infarction?", k=5)
    result.message         # "Evidence: PubMed (5 articles)" — the status line to show
    result.context_text()  # the articles as the prompt's context
    result.citations()     # [{pmid, title, journal, year, url}, ...]

Modules: ``articles`` (the Article and PubMed XML parsing), ``pubmed`` (the E-utilities client), ``local_index``
(the offline BM25 index), ``search`` (the source choice and the status line), ``errors``, ``terms``.
"""

from pubmedqa.evidence.articles import AbstractSection, Article, ArticleParseError, parse_pubmed_xml
from pubmedqa.evidence.errors import EvidenceUnavailable
from pubmedqa.evidence.local_index import LocalIndex, ScoredArticle, load_local_corpus
from pubmedqa.evidence.pubmed import PubMedClient, build_queries
from pubmedqa.evidence.search import EvidenceResult, EvidenceSearch

__all__ = [
    "AbstractSection",
    "Article",
    "ArticleParseError",
    "EvidenceResult",
    "EvidenceSearch",
    "EvidenceUnavailable",
    "LocalIndex",
    "PubMedClient",
    "ScoredArticle",
    "build_queries",
    "load_local_corpus",
    "parse_pubmed_xml",
]
