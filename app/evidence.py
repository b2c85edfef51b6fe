"""Evidence for a question as the Chat and Compare tabs and the APIs use it: when a request searches (its evidence
mode), the articles found, the one whose abstract becomes the answer's context, and the line that cites it.

The search itself (PubMed or the local index, faults, rate of requests to NCBI) is :mod:`pubmedqa.evidence`; this
module decides what a request gets from it. Both answers of a Compare use the same evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.literal_text import literal_markdown
from pubmedqa.evidence import Article, EvidenceResult, EvidenceSearch

#: How the answer's citation line starts; a conversation's history drops the line again (the model never wrote it).
CITATION_MARK = "Source: PMID"


@dataclass(frozen=True)
class FoundEvidence:
    """A search's result and which of its articles the answer is based on (``chosen``: its index)."""

    result: EvidenceResult
    chosen: int = 0

    @property
    def article(self) -> Article | None:
        return self.result.articles[self.chosen] if 0 <= self.chosen < len(self.result.articles) else None

    @property
    def context(self) -> str:
        """The chosen article's title, journal and labelled abstract: the prompt's context."""
        article = self.article
        return article.context_text() if article is not None else ""

    def citation_line(self) -> str:
        """The line under an answer saying which article it is based on (empty without one)."""
        article = self.article
        if article is None:
            return ""
        where = ", ".join(str(part) for part in (article.journal, article.year) if part)
        return f"{CITATION_MARK} {article.pmid} ({article.url}){f', {where}' if where else ''}"

    def cite(self, answer: str) -> str:
        line = self.citation_line()
        return f"{answer}\n\n{line}" if line and answer else answer

    def as_dict(self) -> dict[str, Any]:
        """What the /chat, /compare and /v1 APIs return beside the answer."""
        article = self.article
        return {
            "message": self.result.message,
            "source": self.result.source,
            "used_pmid": article.pmid if article is not None else None,
            "citations": self.result.citations(),
        }


#: A request's evidence option: no search, a search only for a question without a context, or always a search (the
#: best article found becomes the context).
EVIDENCE_MODES = ("off", "auto", "on")


def wants_search(mode: str, context: str) -> bool:
    """Whether a request with evidence ``mode`` and ``context`` searches: 'auto' only when there is no context."""
    return mode == "on" or (mode == "auto" and not context.strip())


def evidence_for(search: EvidenceSearch | None, question: str, context: str, mode: str) -> FoundEvidence | None:
    """The evidence a request asked for, or None (no search configured, or its mode does not search)."""
    if search is None or not wants_search(mode, context):
        return None
    return find_evidence(search, question)


def find_evidence(search: EvidenceSearch, question: str) -> FoundEvidence:
    """The evidence for ``question`` (already validated) from the configured source, its best article chosen; never
    raises for a network or data fault (the result's message says what happened)."""
    return FoundEvidence(search.search(question))


def without_citation(answer: str) -> str:
    """``answer`` without the citation line :meth:`FoundEvidence.cite` added (for a conversation's history)."""
    head, mark, _ = answer.rpartition(f"\n\n{CITATION_MARK} ")
    return head if mark else answer


def evidence_markdown(found: FoundEvidence) -> str:
    """The articles as the page lists them: PubMed's texts escaped, so a title's markup is shown, never rendered."""
    lines = [escape_markdown(found.result.message)]
    for number, article in enumerate(found.result.articles, 1):
        where = ", ".join(escape_markdown(str(part)) for part in (article.journal, article.year) if part)
        used = " ← the answer's context" if number - 1 == found.chosen else ""
        lines.append(
            f"{number}. **{escape_markdown(article.title or '(untitled)')}**{f' — {where}' if where else ''} · "
            f"{article_link(article)}{used}"
        )
        if article.conclusion:
            lines.append(f"    Conclusion: {escape_markdown(_shorten(article.conclusion, 400))}")
    return "\n".join(lines)


def article_choices(found: FoundEvidence) -> list[tuple[str, int]]:
    """(label, index) of each article, for the page's "Answer from" choice."""
    return [
        (f"{n}. PMID {a.pmid}: {_shorten(a.title or '(untitled)', 90)}", n - 1)
        for n, a in enumerate(found.result.articles, 1)
    ]


def article_link(article: Article) -> str:
    """``[PMID n](PubMed's page)`` in Markdown; the PMID as text where it is not a number (nothing to link)."""
    if article.pmid.isdigit():
        return f"[PMID {article.pmid}]({article.url})"
    return f"PMID {escape_markdown(article.pmid)}"


def source_markdown(found: FoundEvidence) -> str:
    """The article an answer is based on, in one line: its link, title (shortened), journal and year."""
    article = found.article
    if article is None:
        return ""
    where = ", ".join(escape_markdown(str(part)) for part in (article.journal, article.year) if part)
    title = escape_markdown(_shorten(article.title, 160)) if article.title else ""
    return f"Source: {article_link(article)}" + "".join(f" — {part}" for part in (title, where) if part)


def escape_markdown(text: str) -> str:
    """``text`` on one line (it is a list item's), rendered as itself."""
    return literal_markdown(text.replace("\n", " "))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
