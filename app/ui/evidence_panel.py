"""The "Find evidence" panel the Chat and Compare tabs share: the articles found for the question, the one whose
abstract fills the context box (the user may pick another, or paste their own), and the automatic search when a
question comes without an abstract.

The panel keeps this session's :class:`~app.evidence.FoundEvidence` in a ``gr.State``; an answer cites the chosen
article only while the context box still holds that article's text (a pasted abstract is the user's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import gradio as gr

from app.evidence import (
    FoundEvidence,
    article_choices,
    evidence_for,
    evidence_markdown,
    find_evidence,
    wants_search,
)
from app.ui.user_messages import user_error
from app.ui.visitor_guard import VisitorGuard
from app.validation import UserInputError, clean_text, parse_evidence_mode, parse_question
from pubmedqa.config import ServerSettings
from pubmedqa.evidence import EvidenceSearch

#: A tab's update of the panel's outputs and the context box (``EvidencePanel.outputs`` + context): unchanged.
UNCHANGED = (gr.skip(),) * 4


@dataclass
class EvidencePanel:
    find: gr.Button
    auto: gr.Checkbox
    choice: gr.Dropdown
    listing: gr.Markdown
    state: gr.State

    @property
    def outputs(self) -> list[Any]:
        """What a search updates, besides the context box: the list, the choice and the state."""
        return [self.listing, self.choice, self.state]


def build_evidence_panel(search: EvidenceSearch | None, prefix: str) -> EvidencePanel:
    """The panel's components (hidden when evidence is off); place it right under the context box."""
    visible = search is not None
    with gr.Row(visible=visible):
        find = gr.Button("Find evidence", size="sm", scale=1, min_width=120, elem_id=f"{prefix}-find-evidence")
        auto = gr.Checkbox(
            value=visible, label="Find evidence when no abstract is given", scale=3, elem_id=f"{prefix}-auto-evidence"
        )
    choice = gr.Dropdown(
        choices=[], value=None, label="Answer from", visible=False, elem_id=f"{prefix}-evidence-choice"
    )
    listing = gr.Markdown(_privacy_note(search), elem_id=f"{prefix}-evidence", visible=visible)
    return EvidencePanel(find, auto, choice, listing, gr.State(None))


def _privacy_note(search: EvidenceSearch | None) -> str:
    if search is None:
        return ""
    source = search.settings.evidence
    if source in ("auto", "pubmed"):
        host = urlparse(search.settings.evidence_base_url).hostname or "NCBI"
        return f"_Finding evidence sends your question to NCBI PubMed ({host}), an outside service._"
    return "_Evidence comes from a local index of abstracts; nothing leaves this server._"


class EvidenceHandlers:
    """Find, pick and the automatic search, for one tab."""

    def __init__(self, search: EvidenceSearch | None, limits: ServerSettings, guard: VisitorGuard):
        self.search = search
        self.limits = limits
        self.guard = guard

    def find(self, question: Any, request: gr.Request) -> tuple[Any, Any, Any, Any]:
        """(listing, choice, state, context) for the Find evidence button."""
        if self.search is None:
            raise user_error("Evidence search is off on this app.")
        try:
            text = clean_text(question, "question", self.limits.max_question_chars)
        except UserInputError as exc:
            raise user_error(str(exc)) from None
        if not text:
            raise user_error("Type a question first; the evidence is searched for it.")
        if not self.guard.allow_evidence(request):
            raise user_error(self.guard.evidence_limit_message(request))
        return shown(find_evidence(self.search, text))

    def pick(self, index: Any, found: FoundEvidence | None) -> tuple[Any, Any, Any, Any]:
        """Another article chosen as the context."""
        if found is None or not isinstance(index, int) or not 0 <= index < len(found.result.articles):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return shown(FoundEvidence(found.result, index))

    def for_request(
        self, question: str, context: str, auto: bool, found: FoundEvidence | None, request: gr.Request
    ) -> tuple[FoundEvidence | None, bool, str | None]:
        """The evidence an answer uses: the chosen article while the context box holds its text, else a new search
        when ``auto`` and the box is empty. Returns (evidence, whether it is a new search to show, a notice)."""
        if found is not None and found.article is not None and context.strip() == found.context.strip():
            return found, False, None
        if self.search is None or not wants_search("auto" if auto else "off", context):
            return None, False, None
        if not self.guard.allow_evidence(request):
            return None, False, self.guard.evidence_limit_message(request) + " Answering without evidence."
        return find_evidence(self.search, question.strip()), True, None


def shown(found: FoundEvidence) -> tuple[Any, Any, Any, Any]:
    """(listing, choice, state, context box) showing ``found``."""
    choices = article_choices(found)
    choice = gr.update(choices=choices, value=found.chosen if choices else None, visible=bool(choices))
    return evidence_markdown(found), choice, found, found.context if found.article is not None else gr.skip()


def wire_evidence_panel(panel: EvidencePanel, handlers: EvidenceHandlers, question: Any, context: Any) -> None:
    outputs = [*panel.outputs, context]
    # Not a model event: a search waits for the network, not for the model (at most 4 at once).
    panel.find.click(handlers.find, question, outputs, api_visibility="private", concurrency_limit=4)
    panel.choice.input(handlers.pick, [panel.choice, panel.state], outputs, api_visibility="private")


def api_evidence(
    search: EvidenceSearch | None, guard: VisitorGuard, limits: ServerSettings, question: Any, context: Any,
    mode: Any, request: gr.Request | None,
) -> FoundEvidence | None:
    """The evidence an API request's ``evidence`` option asks for (see :func:`app.validation.parse_evidence_mode`)."""
    try:
        mode = parse_evidence_mode(mode)
        question_text, context_text = parse_question(question, context, limits)
    except UserInputError as exc:
        raise user_error(str(exc)) from None
    if not wants_search(mode, context_text):
        return None
    if search is None:
        if mode == "on":
            raise user_error("Evidence search is off on this app (PUBMEDQA_EVIDENCE=off).")
        return None
    if not guard.allow_evidence(request):
        raise user_error(guard.evidence_limit_message(request))
    return evidence_for(search, question_text, context_text, mode)


def register_evidence_api(search: EvidenceSearch | None, limits: ServerSettings, guard: VisitorGuard) -> None:
    """The ``/evidence`` endpoint: the articles a question's answer would be based on."""

    def find_evidence(question: str, request: gr.Request = None) -> dict:
        """Search PubMed (or the app's local index) for articles that answer a biomedical question.

        Args:
            question: The question to search for (at most 2,000 characters).
        Returns:
            The status message, the source searched, the PMID an answer would use and the citations (pmid, title,
            journal, year, url) of the articles found.
        """
        guard.check_api_caller(request)
        found = api_evidence(search, guard, limits, question, "", "on", request)
        return found.as_dict() if found is not None else {}

    gr.api(find_evidence, api_name="evidence", concurrency_limit=4)
