"""The Compare tab: base and fine-tuned answers to the same question, side by side and streaming, with votes.

:func:`_layout` creates the components, :class:`CompareHandlers` answers their events and :func:`_wire` connects
the two; :func:`register_compare_api` adds the ``/compare`` endpoint for scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from app.compare import ComparisonUpdate, SideResult, stream_comparison
from app.evidence import FoundEvidence
from app.literal_text import literal_markdown
from app.rate_limits import PerMinuteLimiter
from app.ui.answer_notes import option_scores
from app.ui.evidence_panel import (
    UNCHANGED,
    EvidenceHandlers,
    EvidencePanel,
    api_evidence,
    build_evidence_panel,
    shown,
    wire_evidence_panel,
)
from app.ui.sessions import MODEL_EVENTS, SessionCancels, mark_stopped, session_id
from app.ui.settings_controls import SettingsControls, build_settings_controls, generation_settings
from app.ui.user_messages import notices_markdown, run_guarded, user_error
from app.ui.visitor_guard import VisitorGuard, register_api
from app.votes import VOTE_CHOICES, VoteError, VoteLog, context_hash
from pubmedqa import variants
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine, GenerationSettings
from pubmedqa.evidence import EvidenceSearch
from pubmedqa.variants import Variant

# (base answer, fine-tuned answer, base stats, fine-tuned stats, notices, the record a vote refers to, evidence list,
# article choice, evidence state, context box)
CompareUpdates = Iterator[tuple[Any, ...]]
PENDING, NO_ADAPTER = "…", "—"  # a panel before its first token; the fine-tuned panel without an adapter


def side_stats(side: SideResult | None, done: bool) -> str:
    if side is None:
        return "_No fine-tuned adapter is loaded._"
    if not done:
        return "_generating…_"
    parts = []
    if side.decision:
        # The option scores, labelled as such: they need not match what the generated text says.
        parts.append(f"Model's yes/no/maybe probabilities: {option_scores(side.probabilities, side.decision)}")
        parts.append(f"The text answers: **{side.stated_decision}**" if side.stated_decision
                     else "The text states no yes/no/maybe.")
    timing = [f"{side.n_tokens} tokens"]
    if side.ttft_s is not None:
        timing.append(f"first token {side.ttft_s:.2f} s")
    if side.tokens_per_s:
        timing.append(f"{side.tokens_per_s:.1f} tokens/s")
    parts.append(" · ".join(timing))
    return "  \n".join(parts)


def vote_summary_markdown(votes: VoteLog) -> str:
    counts = votes.summary()
    total = sum(counts.values())
    text = f"**{total} votes** — " + " · ".join(f"{choice}: {n}" for choice, n in counts.items()) if total else "No votes yet."
    return text + (" Voting is closed: the vote box is full." if votes.full else "")


@dataclass
class AnswerPanel:
    answer: gr.Markdown
    stats: gr.Markdown


@dataclass
class CompareComponents:
    question: gr.Textbox
    context: gr.Textbox
    example: gr.Dropdown
    settings: SettingsControls
    compare: gr.Button
    stop: gr.Button
    reference: gr.Markdown
    info: gr.Markdown
    base: AnswerPanel
    tuned: AnswerPanel
    last_result: gr.State
    vote_buttons: list[gr.Button]
    comment: gr.Textbox
    summary: gr.Markdown
    evidence: EvidencePanel


def _layout(
    limits: ServerSettings, examples: list[dict[str, str]], vote_summary: str, search: EvidenceSearch | None
) -> CompareComponents:
    with gr.Row():
        with gr.Column(scale=3):
            question = gr.Textbox(label="Question", max_lines=4, elem_id="compare-question",
                                  max_length=limits.max_question_chars,
                                  placeholder="Ask once, get the base and the fine-tuned answer side by side.")
            context = gr.Textbox(label="Abstract / context (optional)", lines=4, max_lines=12,
                                 max_length=limits.max_context_chars, elem_id="compare-context")
            evidence = build_evidence_panel(search, "compare")
        with gr.Column(scale=2):
            example = gr.Dropdown(
                choices=[(ex["question"], i) for i, ex in enumerate(examples)], value=None,
                label="PubMedQA dev example (shows the reference answer)",
            )
            settings = build_settings_controls(limits)
            with gr.Row():
                compare = gr.Button("Compare", variant="primary")
                stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    reference = gr.Markdown()
    info = gr.Markdown()
    with gr.Row(equal_height=True):
        base = _answer_panel(Variant.BASE, "compare-base-answer")
        tuned = _answer_panel(Variant.TUNED, "compare-tuned-answer")
    last_result = gr.State(None)  # this session's last comparison, what a vote refers to
    with gr.Group():
        with gr.Row():
            vote_buttons = [gr.Button(choice, size="sm") for choice in VOTE_CHOICES]
        comment = gr.Textbox(label="Comment (optional)", max_length=limits.max_comment_chars, max_lines=3)
    summary = gr.Markdown(vote_summary)
    return CompareComponents(
        question=question, context=context, example=example, settings=settings, compare=compare, stop=stop,
        reference=reference, info=info, base=base, tuned=tuned, last_result=last_result, vote_buttons=vote_buttons,
        comment=comment, summary=summary, evidence=evidence,
    )


def _answer_panel(variant: Variant, elem_id: str) -> AnswerPanel:
    with gr.Column():
        gr.Markdown(f"### {variants.HEADINGS[variant]}")
        # Answers are shown as written (literal_markdown), formulas included.
        answer = gr.Markdown(container=True, min_height=120, elem_id=elem_id, latex_delimiters=[])
        return AnswerPanel(answer=answer, stats=gr.Markdown())


class CompareHandlers:
    """The Compare tab's event handlers; one cancel flag per browser session, so Stop reaches only it."""

    def __init__(self, engine: Engine, limits: ServerSettings, examples: list[dict[str, str]],
                 votes: VoteLog, guard: VisitorGuard, evidence: EvidenceHandlers | None = None,
                 vote_limiter: PerMinuteLimiter | None = None) -> None:
        self.engine = engine
        self.limits = limits
        self.guard = guard
        self.evidence = evidence or EvidenceHandlers(None, limits, guard)
        self.examples = examples
        self.votes = votes
        self.vote_limiter = vote_limiter or PerMinuteLimiter(limits.votes_per_minute)  # the Chat's ratings count too
        self.cancels = SessionCancels()

    def pick_example(self, index: int | None) -> tuple[Any, Any, str]:
        if index is None or not 0 <= index < len(self.examples):
            return gr.skip(), gr.skip(), ""
        ex = self.examples[index]
        return ex["question"], ex["context"], (
            f"**Gold label: {literal_markdown(ex['final_decision'])}** — reference (the abstract's conclusion): "
            f"{literal_markdown(ex['long_answer'])}"
        )

    def run(self, question_text: str, context_text: str, auto_evidence: bool, found: FoundEvidence | None,
            max_new_tokens: float, temperature: float, top_p: float, seed: float, repetition_penalty: float,
            min_new_tokens: float, request: gr.Request) -> CompareUpdates:
        with self.guard.heavy_job(request, compare=True):  # admitted by the event's validator
            yield from self._run(question_text, context_text, auto_evidence, found, generation_settings(
                max_new_tokens, temperature, top_p, seed, repetition_penalty, min_new_tokens), request)

    def _run(self, question_text: str, context_text: str, auto_evidence: bool, found: FoundEvidence | None,
             settings: dict[str, Any], request: gr.Request) -> CompareUpdates:
        context_text = context_text if isinstance(context_text, str) else ""
        question_text = question_text if isinstance(question_text, str) else ""
        evidence, searched, evidence_notice = (None, False, None) if not question_text.strip() else (
            self.evidence.for_request(question_text, context_text, auto_evidence, found, request)
        )
        if searched:  # both answers use what was found: show it first
            yield *(gr.skip(),) * 6, *shown(evidence)
        cancel = self.cancels.start(session_id(request))
        update: ComparisonUpdate | None = None
        updates = stream_comparison(
            self.engine, self.limits, question_text, context_text, settings, cancel, evidence
        )
        for update in run_guarded(updates):
            base = update.sides[0]
            tuned = update.sides[1] if len(update.sides) > 1 else None
            notices = update.notices + [n for n in (evidence_notice,) if n] + [f"Mode: {update.mode}."]
            yield (literal_markdown(base.answer) or PENDING,
                   (literal_markdown(tuned.answer) or PENDING) if tuned else NO_ADAPTER,
                   side_stats(base, update.done), side_stats(tuned, update.done), notices_markdown(notices),
                   gr.skip(), *UNCHANGED)
        self.cancels.finish(session_id(request), cancel)
        if update is not None and update.done:
            used = evidence.context if evidence is not None and evidence.article is not None else context_text
            record = self._vote_record(question_text, used, settings, update.sides)
            yield *(gr.skip(),) * 5, record, *UNCHANGED

    def _vote_record(self, question_text: str, context_text: str, settings: dict[str, Any],
                     sides: list[SideResult]) -> dict[str, Any]:
        return {
            "kind": "compare", "question": question_text, "context_hash": context_hash(context_text or ""),
            "settings": settings,
            "base_model": self.engine.settings.base_model, "adapter": self.engine.settings.adapter_source,
            "answers": {side.variant: side.answer for side in sides},
        }

    def vote(self, choice: str, note: str, record: dict[str, Any] | None, request: gr.Request) -> tuple[str, str]:
        if not record:
            raise user_error("Compare the two models on a question first, then vote.")
        note = (note or "").strip()
        if len(note) > self.limits.max_comment_chars:
            raise user_error(f"The comment is too long: at most {self.limits.max_comment_chars} characters.")
        if not self.vote_limiter.allow(self.guard.visitor(request)):
            raise user_error(f"Too many votes: at most {self.limits.votes_per_minute} a minute. Please wait a moment.")
        try:
            self.votes.append(choice, {**record, "comment": note})
        except VoteError as exc:
            gr.Warning(str(exc))
            return gr.skip(), vote_summary_markdown(self.votes)
        gr.Info(f"Vote recorded: {choice}.")
        return "", vote_summary_markdown(self.votes)

    def stop_comparison(self, base: str, tuned: str, request: gr.Request) -> tuple[Any, Any, Any, Any]:
        """Stop this session's comparison and mark both answers as stopped where they stand."""
        self.guard.end_session(request)  # a comparison stopped while still queued never runs to free its place
        if not self.cancels.cancel(session_id(request)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        def stopped(text: str) -> str:
            return text if text == NO_ADAPTER else mark_stopped("" if text == PENDING else text)

        return stopped(base), stopped(tuned), "Stopped.", "Stopped." if tuned != NO_ADAPTER else gr.skip()


def _wire(ui: CompareComponents, handlers: CompareHandlers, concurrency_limit: int) -> None:
    ui.example.change(handlers.pick_example, ui.example, [ui.question, ui.context, ui.reference],
                      api_visibility="private")
    wire_evidence_panel(ui.evidence, handlers.evidence, ui.question, ui.context)
    event = gr.on(
        [ui.compare.click, ui.question.submit], handlers.run,
        [ui.question, ui.context, ui.evidence.auto, ui.evidence.state, *ui.settings.inputs],
        [ui.base.answer, ui.tuned.answer, ui.base.stats, ui.tuned.stats, ui.info, ui.last_result,
         *ui.evidence.outputs, ui.context],
        api_visibility="private", concurrency_id=MODEL_EVENTS, concurrency_limit=concurrency_limit,
        trigger_mode="once",  # a second click while running is ignored, not queued
        validator=handlers.guard.validator(compare=True),
    )
    ui.stop.click(handlers.stop_comparison, [ui.base.answer, ui.tuned.answer],
                  [ui.base.answer, ui.tuned.answer, ui.base.stats, ui.tuned.stats], cancels=[event], queue=False,
                  api_visibility="private")
    for button, choice in zip(ui.vote_buttons, VOTE_CHOICES):
        button.click(_vote_for(handlers, choice), [ui.comment, ui.last_result],
                     [ui.comment, ui.summary], api_visibility="private")


def _vote_for(handlers: CompareHandlers, choice: str):
    def vote(note: str, record: dict[str, Any] | None, request: gr.Request) -> tuple[str, str]:
        return handlers.vote(choice, note, record, request)

    return vote


def build_compare_tab(
    engine: Engine, limits: ServerSettings, examples: list[dict[str, str]], guard: VisitorGuard,
    votes: VoteLog, vote_limiter: PerMinuteLimiter, search: EvidenceSearch | None = None,
) -> None:
    ui = _layout(limits, examples, vote_summary_markdown(votes), search)
    handlers = CompareHandlers(engine, limits, examples, votes, guard, EvidenceHandlers(search, limits, guard),
                               vote_limiter)
    _wire(ui, handlers, limits.concurrency_limit)


def register_compare_api(
    engine: Engine, limits: ServerSettings, guard: VisitorGuard, search: EvidenceSearch | None = None
) -> None:
    """The ``/compare`` endpoint for scripts (gradio_client): same validation, limits and model as the Compare tab."""

    def compare_models(question: str, context: str = "", max_new_tokens: int = GenerationSettings.max_new_tokens,
                       temperature: float = GenerationSettings.temperature, top_p: float = GenerationSettings.top_p,
                       seed: int = GenerationSettings.seed,
                       repetition_penalty: float = GenerationSettings.repetition_penalty,
                       min_new_tokens: int = GenerationSettings.min_new_tokens, evidence: str = "off",
                       request: gr.Request = None) -> dict:
        """Answer the same biomedical question with the base and the fine-tuned model, side by side.

        Args:
            question: The question (at most 2,000 characters).
            context: Optional text of a research abstract both models answer from.
            max_new_tokens: Longest answer, in tokens.
            temperature: 0 for greedy decoding (the same answer each time), higher for more varied answers.
            top_p: Nucleus sampling: the share of probability mass sampled from (with temperature > 0).
            seed: Random seed of the sampling.
            repetition_penalty: Above 1 discourages repeating the answer's own tokens; 1 is off.
            min_new_tokens: Shortest answer, in tokens.
            evidence: "off", "auto" (search PubMed when no context is given) or "on" (always search).
        Returns:
            Both answers with their decision, option probabilities, time to first token, tokens/s and token count;
            with evidence, the citations (pmid, title, journal, year, url) and the PMID both answers are based on.
        """
        settings = generation_settings(max_new_tokens, temperature, top_p, seed, repetition_penalty, min_new_tokens)
        with guard.heavy_job(request, compare=True):  # key and limits: checked when sent
            found = api_evidence(search, guard, limits, question, context, evidence, request)
            *_, last = run_guarded(stream_comparison(engine, limits, question, context, settings, evidence=found))
        result = {"mode": last.mode, "notices": last.notices, **{side.variant: side.as_dict() for side in last.sides}}
        return result | ({"evidence": found.as_dict()} if found is not None else {})

    register_api(compare_models, guard.validator(compare=True, api=True), api_name="compare",
                 concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit)
