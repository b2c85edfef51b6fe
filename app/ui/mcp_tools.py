"""The MCP server's tools (Gradio's ``mcp_server``, at ``/gradio_api/mcp``): ``answer_question`` (registered here
as the ``/answer`` endpoint), ``compare_models`` (``/compare``) and ``find_evidence`` (``/evidence``). Each is a
queued Gradio endpoint, so the API key, the per-visitor limits and the input checks of ``/chat`` apply to it; the
descriptions are the functions' docstrings. ``/chat`` (a stream of text) and the page's own events are not tools."""

from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr

from app.ui.chat_tab import api_answer
from app.ui.sessions import MODEL_EVENTS
from app.ui.visitor_guard import VisitorGuard, register_api
from pubmedqa import variants
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine, GenerationSettings
from pubmedqa.evidence import EvidenceSearch

logger = logging.getLogger(__name__)

#: The endpoints that are MCP tools.
TOOL_ENDPOINTS = ("/answer", "/compare", "/evidence")


def register_answer_api(
    engine: Engine, limits: ServerSettings, guard: VisitorGuard, search: EvidenceSearch | None = None
) -> None:
    """The ``/answer`` endpoint: one question, one finished answer with its decision (the MCP ``answer_question``)."""

    def answer_question(
        question: str,
        abstract: str = "",
        model: str = variants.choice(variants.Variant.TUNED),
        evidence: str = "auto",
        max_new_tokens: int = 128,
        request: gr.Request = None,
    ) -> dict:
        """Answer a biomedical research question (PubMedQA style: yes, no or maybe, with a short explanation).

        Args:
            question: The question, e.g. "Do statins reduce mortality after stroke?" (at most 2,000 characters).
            abstract: Optional text of a research abstract to answer from; empty to answer without one.
            model: "fine-tuned" (the PubMedQA adapter) or "base" (the pretrained model alone).
            evidence: "off" (no search), "auto" (search PubMed when no abstract is given, then answer from the best
                article) or "on" (always search).
            max_new_tokens: Longest answer, in tokens.
        Returns:
            The answer text, the decision (yes/no/maybe), the probability of each option, notices about the request,
            and the citations of the articles found (pmid, title, journal, year, url) with the PMID the answer used.
        """
        settings = {**vars(GenerationSettings()), "max_new_tokens": max_new_tokens}
        *_, last = api_answer(engine, limits, guard, search, request, question, abstract, None, model, settings,
                              evidence)
        return {"model": model, "answer": last.answer, "decision": last.decision,
                "probabilities": last.probabilities, "notices": last.notices,
                "evidence": last.evidence.as_dict() if last.evidence is not None else None}

    register_api(answer_question, guard.validator(compare=False, context_at=1, api=True), api_name="answer",
                 concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit)


def configure_mcp_tools(demo: gr.Blocks) -> None:
    """The MCP server's tools: :data:`TOOL_ENDPOINTS` only (Gradio lists every public endpoint), their results as
    JSON text (Gradio writes ``str(result)``, a Python repr, which MCP clients cannot parse)."""
    server = demo.mcp_server_obj
    if server is None:
        if getattr(demo, "mcp_error", None):
            logger.error("The MCP server is off: %s", demo.mcp_error)
        return
    server.tool_to_endpoint = {tool: endpoint for tool, endpoint in server.tool_to_endpoint.items()
                               if endpoint in TOOL_ENDPOINTS}
    as_text = server.postprocess_output_data

    def as_json(data: list[Any], root_url: str) -> list[Any]:
        return as_text([json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
                        for value in data], root_url)

    server.postprocess_output_data = as_json
