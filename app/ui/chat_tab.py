"""The Chat tab: multi-turn conversation with streaming, Stop, Clear, optional context and generation settings.

:func:`_layout` creates the components, :class:`ChatHandlers` answers their events and :func:`_wire` connects the
two; :func:`register_chat_api` adds the ``/chat`` endpoint for scripts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from app.chat import ChatUpdate, stream_answer
from app.evidence import FoundEvidence
from app.literal_text import from_literal_markdown, literal_markdown
from app.rate_limits import PerMinuteLimiter, log_refusal
from app.ui.answer_notes import with_footer, without_footer
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
from app.validation import message_text
from app.votes import VoteError, VoteLog
from pubmedqa import variants
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import Engine, GenerationSettings, LoadState
from pubmedqa.evidence import EvidenceSearch
from pubmedqa.prompts import parse_decision
from pubmedqa.variants import Variant

# (conversation, question box, notice, evidence list, article choice, evidence state, context box) as it grows
ChatUpdates = Iterator[tuple[Any, Any, Any, Any, Any, Any, Any]]
WAITING, LOADING = "…", "⏳ Loading the model…"  # the answer's placeholder until its first token


def as_written(history: Any) -> Any:
    """The conversation as it was typed and answered: the Chatbot shows each message escaped (:func:`literal_markdown`,
    so that nothing in it renders as Markdown or HTML), and sends it back so."""
    if not isinstance(history, list):
        return history  # for the request's validation to refuse
    return [{**m, "content": from_literal_markdown(without_footer(message_text(m.get("content"))))}
            if isinstance(m, dict) else m for m in history]


def variant_update(engine: Engine) -> dict[str, Any]:
    """The model choice as the engine allows it now: fine-tuned only once an adapter is really loaded."""
    reason = engine.adapter_unavailable_reason()
    if reason:
        return gr.update(
            interactive=False, value=variants.choice(variants.DEFAULT), info=f"Fine-tuned unavailable: {reason}."
        )
    if engine.state is LoadState.READY:
        return gr.update(
            interactive=True, value=variants.choice(variants.PREFERRED),
            info=f"Same base weights; {variants.choice(Variant.TUNED)!r} adds the LoRA adapter.",
        )
    return gr.update(interactive=False, info="Available once the model has loaded.")


@dataclass
class ChatTab:
    """What the page needs from the Chat tab once it is built."""

    variant: gr.Radio
    end_session: Callable[[gr.Request], None]  # to call when a browser session ends
    conversation: gr.Chatbot
    saved: gr.BrowserState  # the conversation in the visitor's browser

    def restore_on_load(self, demo: gr.Blocks) -> None:
        """A reload shows the conversation the browser kept (in the browser only: nothing goes to the server)."""
        demo.load(None, self.saved, self.conversation, js="(saved) => [saved ?? []]", queue=False,
                  api_visibility="private", show_progress="hidden")


@dataclass
class ChatComponents:
    chatbot: gr.Chatbot
    saved: gr.BrowserState
    question: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    notice: gr.Markdown
    variant: gr.Radio
    settings: SettingsControls
    context: gr.Textbox
    evidence: EvidencePanel


def _layout(
    limits: ServerSettings, examples: list[dict[str, str]], search: EvidenceSearch | None
) -> ChatComponents:
    # One column in reading order (model, conversation, context, question and its buttons), so that on a phone,
    # where columns stack, nothing a question needs comes after the buttons.
    with gr.Row():
        with gr.Column(scale=3):
            variant = _variant_radio()
            chatbot = _conversation()
            # Kept in the visitor's browser (localStorage, encrypted with a key of this server's start), so that a
            # reload keeps the conversation until "New chat".
            saved = gr.BrowserState([], storage_key="pubmedqa-chat-conversation")
            context = _context_box(limits)
            evidence = build_evidence_panel(search, "chat")
            with gr.Row():
                question = _question_box(limits)
                send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="chat-stop")
            with gr.Row():
                clear = gr.Button("New chat", elem_id="chat-clear")
            notice = gr.Markdown()
        with gr.Column(scale=2, min_width=280):
            settings = build_settings_controls(limits)
    if examples:
        gr.Examples(
            examples=[[ex["question"], ex["context"]] for ex in examples],
            inputs=[question, context],
            example_labels=[ex["question"] for ex in examples],
            label="Examples from PubMedQA (training questions)",
        )
    return ChatComponents(
        chatbot=chatbot, saved=saved, question=question, send=send, stop=stop, clear=clear, notice=notice,
        variant=variant,
        settings=settings, context=context, evidence=evidence,
    )


def _conversation() -> gr.Chatbot:
    return gr.Chatbot(
        label="Conversation",
        elem_id="chat-conversation",
        height=460,
        buttons=["copy", "copy_all"],
        editable="user",  # a question can be edited: the conversation goes on from it (see ChatHandlers.edit)
        feedback_options=("Like", "Dislike"),  # thumbs under each answer: the human ratings (app/human_ratings.py)
        latex_delimiters=[],  # messages are shown as written (literal_markdown), formulas included
        placeholder="Ask a yes/no/maybe question about biomedical research. "
        "To ground the answer, paste the abstract into the Abstract / context box.",
    )


def _question_box(limits: ServerSettings) -> gr.Textbox:
    return gr.Textbox(
        placeholder="e.g. Does aspirin reduce the risk of myocardial infarction?",
        show_label=False,
        scale=5,
        max_lines=6,
        max_length=limits.max_question_chars,
        autofocus=True,
        elem_id="chat-question",
    )


def _variant_radio() -> gr.Radio:
    # Starts disabled: the page's status poll enables it once the engine can say which variants it serves.
    return gr.Radio(
        choices=list(variants.CHOICES), value=variants.choice(variants.DEFAULT), label="Model", interactive=False,
        elem_id="chat-model",
    )


def _context_box(limits: ServerSettings) -> gr.Textbox:
    return gr.Textbox(
        label="Abstract / context (optional)",
        placeholder="Paste the abstract the question is about; it is put into the prompt.",
        lines=3,
        max_lines=16,
        elem_id="chat-context",
        max_length=limits.max_context_chars,
    )


class AnsweredTurns:
    """What each session's finished answers were (question, variant, decision, settings), by their index in the
    conversation, so that a thumb on an answer is recorded with what produced it, whatever the browser sends.
    Bounded: a session keeps its last ``per_session`` answers, the registry its last ``sessions`` sessions."""

    def __init__(self, per_session: int, sessions: int = 1000):
        self.per_session, self.sessions = per_session, sessions
        self._turns: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, session: str, index: int, record: dict[str, Any]) -> None:
        with self._lock:
            turns = self._turns.setdefault(session, {})
            self._turns.move_to_end(session)
            turns[index] = record
            for old in sorted(turns)[: max(0, len(turns) - self.per_session)]:
                del turns[old]
            while len(self._turns) > self.sessions:
                self._turns.popitem(last=False)

    def get(self, session: str, index: Any) -> dict[str, Any] | None:
        if not isinstance(index, int) or isinstance(index, bool):
            return None
        with self._lock:
            return self._turns.get(session, {}).get(index)

    def forget(self, session: str, from_index: int = 0) -> None:
        """The session's answers from ``from_index`` on (all by default): taken back by undo, retry or an edit."""
        with self._lock:
            turns = self._turns.get(session, {})
            for index in [i for i in turns if i >= from_index]:
                del turns[index]
            if not turns:
                self._turns.pop(session, None)


class ChatHandlers:
    """The Chat tab's event handlers; one cancel flag per browser session, so Stop and Clear reach only it."""

    def __init__(
        self, engine: Engine, limits: ServerSettings, guard: VisitorGuard,
        evidence: EvidenceHandlers | None = None, votes: VoteLog | None = None,
        vote_limiter: PerMinuteLimiter | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self.guard = guard
        self.evidence = evidence or EvidenceHandlers(None, limits, guard)
        self.cancels = SessionCancels()
        self.votes = votes
        self.vote_limiter = vote_limiter or PerMinuteLimiter(limits.votes_per_minute)
        self.answered = AnsweredTurns(limits.max_history_messages)

    def respond(
        self,
        message: str,
        history: list[dict[str, Any]] | None,
        context_text: str,
        auto_evidence: bool,
        found: FoundEvidence | None,
        variant: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        seed: float,
        repetition_penalty: float,
        min_new_tokens: float,
        request: gr.Request,
    ) -> ChatUpdates:
        with self.guard.heavy_job(request, compare=False, context=context_text):  # admitted by the event's validator
            if not isinstance(message, str) or not message.strip():
                raise user_error("Please type a question.")
            context_text = context_text if isinstance(context_text, str) else ""
            yield from self._respond(message, history, context_text, auto_evidence, found, variant,
                                     generation_settings(max_new_tokens, temperature, top_p, seed, repetition_penalty,
                                                         min_new_tokens), request)

    def _respond(self, message: str, history: list[dict[str, Any]] | None, context_text: str, auto_evidence: bool,
                 found: FoundEvidence | None, variant: str, settings: dict[str, Any],
                 request: gr.Request) -> ChatUpdates:
        original = list(history or []) if isinstance(history, list) else []
        waiting = LOADING if self.engine.state is not LoadState.READY else WAITING
        pending = original + [{"role": "user", "content": literal_markdown(message)},
                              {"role": "assistant", "content": waiting}]
        yield pending, "", "", *UNCHANGED
        evidence, searched, evidence_notice = self.evidence.for_request(
            message, context_text, auto_evidence, found, request
        )
        if searched:  # show what was found before the answer starts
            yield pending, gr.skip(), gr.skip(), *shown(evidence)
        cancel = self.cancels.start(session_id(request))
        updates = stream_answer(
            self.engine, self.limits, message, context_text, as_written(history), variant, settings, cancel, evidence
        )
        last = None
        try:
            for last in run_guarded(updates):
                text = literal_markdown(last.answer)
                content = with_footer(text, last) if last.done else text or waiting
                pending[-1] = {"role": "assistant", "content": content}
                notices = last.notices + [n for n in (evidence_notice,) if n]
                yield pending, gr.skip(), notices_markdown(notices), *UNCHANGED
        except gr.Error:
            yield original, message, "", *UNCHANGED  # give the question back: nothing typed is lost
            raise
        self.cancels.finish(session_id(request), cancel)
        if last is None or not last.done:  # stopped while the engine was finishing its last token: say so
            pending[-1] = {"role": "assistant", "content": mark_stopped(pending[-1]["content"].replace(waiting, ""))}
            yield pending, gr.skip(), gr.skip(), *UNCHANGED
            return
        self.answered.remember(session_id(request), len(pending) - 1, {
            "question": message.strip(), "variant": variant, "decision": parse_decision(last.answer) or "",
            "option_decision": last.decision or "", "answer": last.answer, "settings": settings,
            "base_model": self.engine.settings.base_model, "adapter": self.engine.settings.adapter_source,
            "evidence_pmid": evidence.article.pmid if evidence is not None and evidence.article is not None else None,
        })

    def rate(self, data: gr.LikeData, request: gr.Request) -> None:
        """A thumb up or down on an answer: recorded with the question, variant, decision and settings that produced
        it (held on the server); a thumb on anything else (a question, a stopped answer, a forged index) is ignored."""
        if self.votes is None or data.liked not in (True, False):
            return
        record = self.answered.get(session_id(request), data.index)
        if record is None:
            log_refusal("Ignored a rating of no finished answer (index %r)", data.index)
            return
        if not self.vote_limiter.allow(self.guard.visitor(request)):
            raise user_error(f"Too many ratings: at most {self.limits.votes_per_minute} a minute. "
                             "Please wait a moment.")
        try:
            self.votes.append("like" if data.liked else "dislike", {"kind": "chat", **record})
        except VoteError as exc:
            gr.Warning(str(exc))

    def stop_generation(self, history: list[dict[str, Any]] | None, request: gr.Request) -> Any:
        """Stop this session's answer, and mark it as stopped where it stands (the cancelled event sends nothing
        more)."""
        self.guard.end_session(request)  # an answer stopped while still queued never runs to free its place
        if not self.cancels.cancel(session_id(request)) or not history:
            return gr.skip()
        last = dict(history[-1])
        if last.get("role") != "assistant":
            return gr.skip()
        text = message_text(last.get("content"))
        last["content"] = mark_stopped("" if text in (WAITING, LOADING) else text)
        return [*history[:-1], last]

    def end_session(self, request: gr.Request) -> None:
        self.cancels.cancel(session_id(request))
        self.guard.end_session(request)
        self.answered.forget(session_id(request))

    def clear_chat(self, request: gr.Request) -> tuple[list, str, str]:
        """New chat: this session's answer stopped and the conversation emptied."""
        self.end_session(request)
        return [], "", ""

    @staticmethod
    def _question_at(history: Any, index: Any) -> int | None:
        """The position of the question at or before message ``index`` of ``history`` (None if there is none)."""
        if not isinstance(history, list) or not isinstance(index, int) or isinstance(index, bool):
            return None
        for at in range(min(index, len(history) - 1), -1, -1):
            if isinstance(history[at], dict) and history[at].get("role") == "user":
                return at
        return None

    def retry(self, history: Any, data: gr.RetryData, request: gr.Request) -> tuple[Any, Any]:
        """Retry: the conversation back to before the answer's question, and that question in the box, which the
        chained answer event then sends again (through the same checks as a new question)."""
        at = self._question_at(history, data.index)
        if at is None:
            return gr.skip(), gr.skip()
        self.answered.forget(session_id(request), at)
        return history[:at], from_literal_markdown(message_text(history[at].get("content")))

    def edit(self, history: Any, data: gr.EditData, request: gr.Request) -> tuple[Any, Any]:
        """An edited question: the conversation up to it, and the new text in the box, sent again as for retry."""
        at = self._question_at(history, data.index)
        if at is None or at != data.index or not isinstance(data.value, str):
            return gr.skip(), gr.skip()
        self.answered.forget(session_id(request), at)
        return history[:at], data.value

    def undo(self, history: Any, data: gr.UndoData, request: gr.Request) -> tuple[Any, Any]:
        """Undo: the last question and its answer taken back, the question into the box to change or send again."""
        at = self._question_at(history, data.index)
        if at is None:
            return gr.skip(), gr.skip()
        self.cancels.cancel(session_id(request))
        self.answered.forget(session_id(request), at)
        return history[:at], from_literal_markdown(message_text(history[at].get("content")))


def _wire(ui: ChatComponents, handlers: ChatHandlers, concurrency_limit: int) -> None:
    wire_evidence_panel(ui.evidence, handlers.evidence, ui.question, ui.context)
    answer = {  # one answer event, whatever asked for it: a new question, a retry, an edited question
        "fn": handlers.respond,
        "inputs": [ui.question, ui.chatbot, ui.context, ui.evidence.auto, ui.evidence.state, ui.variant,
                   *ui.settings.inputs],
        "outputs": [ui.chatbot, ui.question, ui.notice, *ui.evidence.outputs, ui.context],
        "api_visibility": "private",
        "concurrency_id": MODEL_EVENTS,
        "concurrency_limit": concurrency_limit,
        "validator": handlers.guard.validator(compare=False, context_at=2),
    }
    chat_event = gr.on(triggers=[ui.question.submit, ui.send.click], **answer)
    private = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    # The conversation is saved in the browser, by the browser alone, after each event that changed it. (Not on the
    # Chatbot's change: the page's own empty Chatbot, as it first shows, would overwrite the kept one.)
    keep = {"fn": None, "inputs": ui.chatbot, "outputs": ui.saved, "js": "(now) => [now ?? []]", **private}
    retried = ui.chatbot.retry(handlers.retry, ui.chatbot, [ui.chatbot, ui.question], **private).then(**answer)
    edited = ui.chatbot.edit(handlers.edit, ui.chatbot, [ui.chatbot, ui.question], **private).then(**answer)
    answers = [chat_event, retried, edited]
    undone = ui.chatbot.undo(handlers.undo, ui.chatbot, [ui.chatbot, ui.question], cancels=answers, **private)
    stopped = ui.stop.click(handlers.stop_generation, ui.chatbot, ui.chatbot, cancels=answers, queue=False,
                            api_visibility="private")
    ui.chatbot.like(handlers.rate, None, None, queue=False, api_visibility="private", show_progress="hidden")
    cleared = ui.clear.click(
        handlers.clear_chat, None, [ui.chatbot, ui.question, ui.notice], cancels=answers, queue=False,
        api_visibility="private",
    )
    for changed in (*answers, undone, stopped, cleared):
        changed.then(**keep)


def build_chat_tab(
    engine: Engine, limits: ServerSettings, examples: list[dict[str, str]], guard: VisitorGuard,
    search: EvidenceSearch | None = None, votes: VoteLog | None = None, vote_limiter: PerMinuteLimiter | None = None,
) -> ChatTab:
    ui = _layout(limits, examples, search)
    handlers = ChatHandlers(engine, limits, guard, EvidenceHandlers(search, limits, guard), votes, vote_limiter)
    _wire(ui, handlers, limits.concurrency_limit)
    return ChatTab(variant=ui.variant, end_session=handlers.end_session, conversation=ui.chatbot, saved=ui.saved)


def api_answer(
    engine: Engine, limits: ServerSettings, guard: VisitorGuard, search: EvidenceSearch | None, request: Any,
    question: Any, context: Any, history: Any, model: Any, settings: dict[str, Any], evidence: Any,
) -> Iterator[ChatUpdate]:
    """An API call's answer (``/chat``, ``/answer``): the evidence its ``evidence`` option asks for, then the growing
    answer, errors as the caller's messages; its place among the visitor's heavy requests freed when it ends."""
    with guard.heavy_job(request, compare=False, context=context):  # key and limits: checked when sent
        found = api_evidence(search, guard, limits, question, context, evidence, request)
        yield from run_guarded(stream_answer(engine, limits, question, context, history, model, settings,
                                             evidence=found))


def register_chat_api(
    engine: Engine, limits: ServerSettings, guard: VisitorGuard, search: EvidenceSearch | None = None
) -> None:
    """The ``/chat`` endpoint for scripts (gradio_client): same validation, limits and model as the Chat tab."""

    def chat(
        question: str,
        context: str = "",
        history: list[dict] | None = None,
        model: str = variants.choice(variants.DEFAULT),
        max_new_tokens: int = GenerationSettings.max_new_tokens,
        temperature: float = GenerationSettings.temperature,
        top_p: float = GenerationSettings.top_p,
        seed: int = GenerationSettings.seed,
        repetition_penalty: float = GenerationSettings.repetition_penalty,
        min_new_tokens: int = GenerationSettings.min_new_tokens,
        evidence: str = "off",
        request: gr.Request = None,
    ) -> Iterator[str]:
        """Answer a biomedical question. `history` is a list of {"role": "user"|"assistant", "content": str}
        messages; `model` is "base" or "fine-tuned"; `evidence` is "off", "auto" (search PubMed or the local index
        when no context is given) or "on" (the best article found is the context). Streams the growing answer; the
        last value is the answer, ending with a "Source: PMID ..." line when it is based on an article (the
        articles themselves: the /evidence endpoint)."""
        settings = generation_settings(max_new_tokens, temperature, top_p, seed, repetition_penalty, min_new_tokens)
        for update in api_answer(engine, limits, guard, search, request, question, context, history, model, settings,
                                 evidence):
            yield update.cited

    register_api(chat, guard.validator(compare=False, context_at=1, api=True), api_name="chat",
                 concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit)
