"""An article as evidence: the fields a citation and a prompt's context need, parsed from PubMed's XML (efetch,
``PubmedArticleSet``) or built from local JSON (the PubMedQA files, or a list of abstracts).

Texts are plain text: inline XML markup (``<i>``, ``<sup>``, MathML) is dropped and its text kept, non-ASCII is kept
as it is, whitespace is collapsed. Nothing is HTML-escaped here; whoever shows a text escapes it.
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PUBMED_URL = "https://pubmed.ncbi.nlm.nih.gov/{pmid}/"
CONCLUSIONS = "CONCLUSIONS"

# A sentence ends at ., ! or ? before a capital, a digit or a bracket (the rule pubmedqa.prompts uses too).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
_YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")
# A conclusion shorter than this is too thin to stand alone: the sentence before it is added.
_SHORT_CONCLUSION = 80


class ArticleParseError(ValueError):
    """A PubMed XML document or a local abstracts file could not be read."""


@dataclass(frozen=True)
class AbstractSection:
    """One paragraph of an abstract. ``label`` is the structured abstract's heading as printed (``BACKGROUND``,
    ``Methods and results``...), empty for an unstructured abstract; ``category`` is NLM's normalised heading
    (``BACKGROUND``, ``OBJECTIVE``, ``METHODS``, ``RESULTS``, ``CONCLUSIONS``, ``UNASSIGNED``) when known."""

    text: str
    label: str = ""
    category: str = ""


@dataclass(frozen=True)
class Article:
    """A retrieved article. Immutable, so that caches and threads can share it."""

    pmid: str
    title: str
    sections: tuple[AbstractSection, ...] = field(default_factory=tuple)
    journal: str = ""
    year: int | None = None

    @property
    def url(self) -> str:
        return PUBMED_URL.format(pmid=self.pmid)

    @property
    def abstract(self) -> str:
        """The whole abstract as one paragraph of plain text."""
        return " ".join(section.text for section in self.sections)

    @property
    def has_abstract(self) -> bool:
        return any(section.text for section in self.sections)

    @property
    def conclusion(self) -> str:
        """The abstract's CONCLUSIONS section; for an abstract without one, its last sentence (the last two when
        the last is very short), where abstracts state their finding."""
        for section in self.sections:
            if _is_conclusion(section):
                return section.text
        sentences = split_sentences(self.abstract)
        if not sentences:
            return ""
        tail = sentences[-1]
        if len(tail) < _SHORT_CONCLUSION and len(sentences) > 1:
            tail = f"{sentences[-2]} {tail}"
        return tail

    def context_text(self, include_conclusion: bool = True) -> str:
        """The abstract as a prompt's context (pubmedqa.prompts): one labelled paragraph per line, as the PubMedQA
        contexts the model was tuned on (``PubMedQARecord.context``). ``include_conclusion=False`` leaves the
        conclusion out, as PubMedQA's own contexts do."""
        lines = [
            f"{section.label}: {section.text}" if section.label else section.text
            for section in self.sections
            if section.text and (include_conclusion or not _is_conclusion(section))
        ]
        return "\n".join(lines)

    def citation(self) -> dict[str, Any]:
        """What a citation shows: ``{pmid, title, journal, year, url}`` (plain text; escape it to show it as HTML)."""
        return {"pmid": self.pmid, "title": self.title, "journal": self.journal, "year": self.year, "url": self.url}


def _is_conclusion(section: AbstractSection) -> bool:
    return section.category == CONCLUSIONS or section.label.upper().startswith("CONCLUSION")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def clean_text(text: str) -> str:
    """Whitespace collapsed (PubMed's XML wraps lines and indents)."""
    return " ".join(text.split())


def _text(element: ET.Element | None) -> str:
    """An element's text with inline markup (<i>, <b>, <sup>, <sub>, MathML) dropped and its content kept."""
    return "" if element is None else clean_text("".join(element.itertext()))


def _year(article: ET.Element) -> int | None:
    """Publication year: the journal issue's Year, else the first year in its MedlineDate ("1998 Dec-1999 Jan"),
    else the electronic ArticleDate (an ahead-of-print article has no issue date yet)."""
    pub_date = article.find("Journal/JournalIssue/PubDate")
    candidates = []
    if pub_date is not None:
        candidates += [_text(pub_date.find("Year")), _text(pub_date.find("MedlineDate"))]
    candidates.append(_text(article.find("ArticleDate/Year")))
    for candidate in candidates:
        match = _YEAR.search(candidate)
        if match:
            return int(match.group(1))
    return None


def _sections(abstract: ET.Element | None) -> tuple[AbstractSection, ...]:
    if abstract is None:
        return ()
    sections = []
    for part in abstract.findall("AbstractText"):
        text = _text(part)
        if text:
            sections.append(AbstractSection(text=text, label=clean_text(part.get("Label", "")),
                                            category=part.get("NlmCategory", "").upper()))
    return tuple(sections)


def _parse_citation(medline: ET.Element) -> Article | None:
    pmid = _text(medline.find("PMID"))
    article = medline.find("Article")
    if not pmid or article is None:
        return None
    journal = _text(article.find("Journal/Title")) or _text(medline.find("MedlineJournalInfo/MedlineTA"))
    # Titles of non-English articles are in [brackets] (NLM's translation convention); the brackets stay.
    return Article(pmid=pmid, title=_text(article.find("ArticleTitle")), sections=_sections(article.find("Abstract")),
                   journal=journal, year=_year(article))


def _parse_book(document: ET.Element) -> Article | None:
    pmid = _text(document.find("PMID"))
    if not pmid:
        return None
    title = _text(document.find("ArticleTitle")) or _text(document.find("Book/BookTitle"))
    year = _YEAR.search(_text(document.find("Book/PubDate")))
    return Article(pmid=pmid, title=title, sections=_sections(document.find("Abstract")),
                   journal=_text(document.find("Book/Publisher/PublisherName")),
                   year=int(year.group(1)) if year else None)


def parse_pubmed_xml(xml: str | bytes) -> list[Article]:
    """Articles of an efetch ``PubmedArticleSet`` document, in document order (with and without an abstract: the
    caller decides). Raises :class:`ArticleParseError` for a document that is not well-formed XML or not a
    PubmedArticleSet; an empty set gives ``[]``."""
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    if not xml.strip():
        raise ArticleParseError("empty document")
    # PubMed's XML never declares entities; refusing documents that do keeps entity-expansion bombs out of the
    # parser whatever the expat build (the DOCTYPE line efetch sends is fine: external DTDs are never fetched).
    if b"<!ENTITY" in xml:
        raise ArticleParseError("document declares XML entities")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ArticleParseError(f"malformed XML ({exc})") from None
    if root.tag != "PubmedArticleSet":
        raise ArticleParseError(f"expected a PubmedArticleSet, got <{root.tag}>")
    articles = []
    for item in root:
        if item.tag == "PubmedArticle":
            medline = item.find("MedlineCitation")
            parsed = _parse_citation(medline) if medline is not None else None
        elif item.tag == "PubmedBookArticle":
            document = item.find("BookDocument")
            parsed = _parse_book(document) if document is not None else None
        else:
            continue  # DeleteCitation and the like: nothing to cite
        if parsed is None:
            logger.debug("Skipped a %s without a PMID or an Article element", item.tag)
            continue
        articles.append(parsed)
    return articles


def _as_year(value: Any) -> int | None:
    match = _YEAR.search(str(value)) if value not in (None, "") else None
    return int(match.group(1)) if match else None


def article_from_pubmedqa(pmid: str, item: Mapping[str, Any]) -> Article:
    """An article from a record of the PubMedQA files (``ori_pqal.json``): CONTEXTS with their LABELS, then the
    LONG_ANSWER (the abstract's conclusion) as the CONCLUSIONS section. PubMedQA has no titles; its questions are the
    articles' titles turned into questions, so the question stands in as the title."""
    contexts = item.get("CONTEXTS") or []
    labels = item.get("LABELS") or []
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise ArticleParseError(f"record {pmid}: CONTEXTS must be a list of strings")
    if len(labels) != len(contexts):
        labels = [""] * len(contexts)
    sections = [AbstractSection(text=clean_text(text), label=str(label).upper(), category=str(label).upper())
                for text, label in zip(contexts, labels) if clean_text(text)]
    conclusion = clean_text(str(item.get("LONG_ANSWER") or ""))
    if conclusion:
        sections.append(AbstractSection(text=conclusion, label=CONCLUSIONS, category=CONCLUSIONS))
    return Article(pmid=str(pmid), title=clean_text(str(item.get("QUESTION") or "")), sections=tuple(sections),
                   journal=clean_text(str(item.get("JOURNAL") or "")), year=_as_year(item.get("YEAR")))


def article_from_dict(item: Mapping[str, Any]) -> Article:
    """An article from one entry of a list of abstracts: ``{"pmid", "title", "abstract" (a string) or "contexts"
    (a list of paragraphs, with optional "labels"), "journal"?, "year"?}``."""
    pmid = str(item.get("pmid") or "").strip()
    if not pmid:
        raise ArticleParseError("an entry has no 'pmid'")
    if isinstance(item.get("abstract"), str):
        sections: list[AbstractSection] = [AbstractSection(text=clean_text(item["abstract"]))]
    elif isinstance(item.get("contexts"), list):
        contexts = [str(c) for c in item["contexts"]]
        labels = item.get("labels") if isinstance(item.get("labels"), list) else []
        labels = [str(label).upper() for label in labels] if len(labels) == len(contexts) else [""] * len(contexts)
        sections = [AbstractSection(text=clean_text(c), label=label, category=label)
                    for c, label in zip(contexts, labels)]
    else:
        raise ArticleParseError(f"entry {pmid}: needs 'abstract' (a string) or 'contexts' (a list of strings)")
    return Article(pmid=pmid, title=clean_text(str(item.get("title") or "")),
                   sections=tuple(s for s in sections if s.text), journal=clean_text(str(item.get("journal") or "")),
                   year=_as_year(item.get("year")))


def articles_from_json(raw: Any, where: str = "abstracts") -> list[Article]:
    """Articles from parsed JSON in either documented format: a list of ``{pmid, title, abstract|contexts,
    journal?, year?}``, or the PubMedQA format (an object keyed by PubMed id, values with CONTEXTS)."""
    if isinstance(raw, dict):
        return [article_from_pubmedqa(pmid, item) for pmid, item in raw.items() if isinstance(item, dict)]
    if isinstance(raw, list):
        return [article_from_dict(item) for item in raw if isinstance(item, dict)]
    raise ArticleParseError(f"{where}: expected a list of abstracts or an object keyed by PubMed id")


def load_articles_file(path: str | Path) -> list[Article]:
    """Articles from a JSON file in one of the formats of :func:`articles_from_json`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArticleParseError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArticleParseError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    return articles_from_json(raw, str(path))


def dedupe(articles: Iterable[Article]) -> list[Article]:
    """First article of each PMID, in order."""
    seen: set[str] = set()
    kept = []
    for article in articles:
        if article.pmid not in seen:
            seen.add(article.pmid)
            kept.append(article)
    return kept
