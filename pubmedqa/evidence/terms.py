"""Words of a question or an abstract, shared by the PubMed query and the local BM25 index."""

from __future__ import annotations

import re

# A word: letters and digits (any script, so "β-blockers" and "Sjögren" survive), with inner hyphens or
# apostrophes ("COVID-19", "IL-6", "Crohn's"). Everything else (quotes, brackets, '*', ':', '#', '/') is dropped:
# those are PubMed query syntax (phrases, field tags, wildcards, ranges, history, MeSH subheadings).
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")

# Lucene's English stopwords (what bm25s uses) plus the auxiliaries and question words that make up a yes/no
# question's frame ("Does ... improve ...?", "Is there ..."): they carry nothing to match an abstract on.
STOPWORDS = frozenset(
    """a an and are as at be but by for if in into is it no not of on or such that the their then there these they
    this to was will with
    about after all also am any been before being between both can could did do does doing done during each either
    from had has have having her here his how i its itself may might more most must my neither nor our out over
    own same she should so some than those through too under until very vs versus we were what when where whether
    which while who whom whose why would you your""".split()
)


def words(text: str) -> list[str]:
    """Content words of ``text``, lower-cased, in order: stopwords and one-character words left out."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS]


def stem(word: str) -> str:
    """A light plural stemmer (Harman's S-stemmer): "patients" and "patient", "studies" and "study" match, nothing
    more aggressive. A full stemmer would need PyStemmer (a C extension); plurals are most of what a question and
    its abstract differ by."""
    if len(word) > 4 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def index_terms(text: str) -> list[str]:
    """What the BM25 index matches on: content words, stemmed; a hyphenated word also counts as its parts
    ("beta-blocker" matches "beta blocker")."""
    terms = []
    for word in words(text):
        terms.append(stem(word))
        if "-" in word:
            terms += [stem(part) for part in word.split("-") if len(part) > 1 and part not in STOPWORDS]
    return terms
