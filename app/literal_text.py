"""Text that Markdown (and the HTML inside it) shows as itself: visitors' questions, model answers, PubMed's and the
data set's texts, wherever the page renders Markdown (the Chatbot, the Compare answers, the evidence list, the
Evaluation example).

:func:`literal_markdown` backslash-escapes what could start a Markdown or HTML construct (tags, entities, links,
images, bare URLs and addresses, emphasis, code, tables, and headings, lists, quotes or rules at a line's start),
and only that, so that an answer copied from the page reads as written; :func:`from_literal_markdown` gives the
text back exactly (the Chatbot's value comes back to the server as the conversation's history).
"""

from __future__ import annotations

import re

_INLINE = frozenset("\\`*_{}[]<>!|~&$@")
_LINE_START = re.compile(r"^([ \t]*)([#+\-=]|\d+(?=[.)]))", re.MULTILINE)
_AUTOLINK = re.compile(r"(?i)\b(https?|ftp|www)([:.])")  # GitHub-flavoured Markdown links bare URLs
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before any ASCII punctuation


def literal_markdown(text: str) -> str:
    """``text`` escaped so that Markdown renders it as itself (line breaks kept)."""
    escaped = "".join(f"\\{c}" if c in _INLINE else c for c in text)
    return _AUTOLINK.sub(r"\1\\\2", _LINE_START.sub(_escape_line_start, escaped))


def _escape_line_start(match: re.Match[str]) -> str:
    indent, mark = match.group(1), match.group(2)
    if mark.isdigit():  # "1." or "1)" starts an ordered list: escape the punctuation after the number
        return f"{indent}{mark}\\"
    return f"{indent}\\{mark}"


def from_literal_markdown(text: str) -> str:
    """The text :func:`literal_markdown` escaped, as it was."""
    return _ESCAPED.sub(r"\1", text)
