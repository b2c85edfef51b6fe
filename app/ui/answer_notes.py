"""What the page shows under an answer: the model's yes/no/maybe option scores and the article the answer is based
on (Chat: a quoted footer under each finished answer; Compare: under each side)."""

from __future__ import annotations

from app.chat import ChatUpdate
from app.evidence import source_markdown

#: Where an answer's footer starts. The answer above it is literal Markdown, which escapes every ">", so this never
#: occurs in an answer's own text: the conversation's history cuts each answer here.
FOOTER = "\n\n> "


def option_scores(probabilities: dict[str, float], decision: str | None) -> str:
    """``**yes 71%** · no 20% · maybe 9%``, the decision in bold."""
    return " · ".join(f"**{k} {v:.0%}**" if k == decision else f"{k} {v:.0%}" for k, v in probabilities.items())


def with_footer(shown: str, update: ChatUpdate) -> str:
    """``shown`` (the answer as literal Markdown) with its footer: the option scores and, with evidence, the source
    as a link to PubMed."""
    lines = []
    if update.decision:
        lines.append(f"Decision by option scores: {option_scores(update.probabilities, update.decision)}")
    if update.evidence is not None and update.evidence.article is not None:
        lines.append(source_markdown(update.evidence))
    return shown + FOOTER + "  \n> ".join(lines) if lines else shown


def without_footer(content: str) -> str:
    """An answer as the Chatbot shows it, without its footer."""
    return content.split(FOOTER, 1)[0]
