"""The Compare tab: base and fine-tuned answers to the same question, side by side and streaming, with votes."""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from app.compare import ComparisonUpdate, SideResult, stream_comparison
from app.ui.common import (
    MODEL_EVENTS,
    SessionCancels,
    build_settings_controls,
    generation_settings,
    notices_markdown,
    run_guarded,
    session_id,
)
from app.votes import VOTE_CHOICES, VoteError, VoteLog, context_hash
from pubmedqa.backends.base import ModelBackend
from pubmedqa.config import ServerSettings

TITLES = {"base": "Base model", "fine-tuned": "Fine-tuned (LoRA)"}


def side_stats(side: SideResult | None, done: bool) -> str:
    if side is None:
        return "_No fine-tuned adapter is loaded._"
    if not done:
        return "_generating…_"
    parts = []
    if side.decision:
        probs = " · ".join(f"{k} {v:.0%}" for k, v in side.probabilities.items())
        parts.append(f"**Decision: {side.decision}** ({probs})")
    timing = [f"{side.n_tokens} tokens"]
    if side.ttft_s is not None:
        timing.append(f"first token {side.ttft_s:.2f} s")
    if side.tokens_per_s:
        timing.append(f"{side.tokens_per_s:.1f} tokens/s")
    parts.append(" · ".join(timing))
    return "  \n".join(parts)


def vote_summary_markdown(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "No votes yet."
    return f"**{total} votes** — " + " · ".join(f"{choice}: {n}" for choice, n in counts.items())


def build_compare_tab(backend: ModelBackend, limits: ServerSettings, examples: list[dict[str, str]]) -> None:
    cancels = SessionCancels()
    votes = VoteLog(limits.votes_path, limits.votes_repo)
    with gr.Row():
        with gr.Column(scale=3):
            question = gr.Textbox(label="Question", max_lines=4, elem_id="compare-question", max_length=limits.max_question_chars,
                                  placeholder="Ask once, get the base and the fine-tuned answer side by side.")
            context = gr.Textbox(label="Abstract / context (optional)", lines=4, max_lines=12,
                                 max_length=limits.max_context_chars)
        with gr.Column(scale=2):
            example = gr.Dropdown(
                choices=[(ex["question"], i) for i, ex in enumerate(examples)], value=None,
                label="PubMedQA dev example (shows the reference answer)",
            )
            controls = build_settings_controls(limits)
            with gr.Row():
                compare = gr.Button("Compare", variant="primary")
                stop = gr.Button("Stop", variant="stop")
    reference = gr.Markdown()
    info = gr.Markdown()
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown(f"### {TITLES['base']}")
            base_answer = gr.Markdown(container=True, min_height=120, elem_id="compare-base-answer")
            base_stats = gr.Markdown()
        with gr.Column():
            gr.Markdown(f"### {TITLES['fine-tuned']}")
            tuned_answer = gr.Markdown(container=True, min_height=120, elem_id="compare-tuned-answer")
            tuned_stats = gr.Markdown()
    last_result = gr.State(None)  # this session's last comparison, what a vote refers to
    with gr.Group():
        with gr.Row():
            vote_buttons = [gr.Button(choice, size="sm") for choice in VOTE_CHOICES]
        comment = gr.Textbox(label="Comment (optional)", max_length=1000, max_lines=3)
    summary = gr.Markdown(vote_summary_markdown(votes.summary()))

    def pick_example(index: int | None) -> tuple[Any, Any, str]:
        if index is None or not 0 <= index < len(examples):
            return gr.skip(), gr.skip(), ""
        ex = examples[index]
        return ex["question"], ex["context"], (
            f"**Gold label: {ex['final_decision']}** — reference (the abstract's conclusion): {ex['long_answer']}"
        )

    def run(question_text: str, context_text: str, max_new_tokens: float, temperature: float, top_p: float,
            seed: float, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        cancel = cancels.start(session_id(request))
        settings = generation_settings(max_new_tokens, temperature, top_p, seed)
        update: ComparisonUpdate | None = None
        updates = stream_comparison(backend, limits, question_text, context_text, settings, cancel)
        for update in run_guarded(updates):
            base = update.sides[0]
            tuned = update.sides[1] if len(update.sides) > 1 else None
            note = notices_markdown(update.notices + [f"Mode: {update.mode}."])
            yield (base.answer or "…", (tuned.answer or "…") if tuned else "—", side_stats(base, update.done),
                   side_stats(tuned, update.done), note, gr.skip())
        if update is not None and update.done:
            record = {
                "question": question_text, "context_hash": context_hash(context_text or ""), "settings": settings,
                "base_model": backend.settings.base_model, "adapter": backend.settings.adapter_source,
                "answers": {side.variant: side.answer for side in update.sides},
            }
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), record

    def vote(choice: str, note: str, record: dict[str, Any] | None) -> tuple[str, str]:
        if not record:
            raise gr.Error("Compare the two models on a question first, then vote.")
        try:
            votes.append(choice, {**record, "comment": (note or "").strip()[:1000]})
        except VoteError as exc:
            gr.Warning(str(exc))
            return gr.skip(), vote_summary_markdown(votes.summary())
        gr.Info(f"Vote recorded: {choice}.")
        return "", vote_summary_markdown(votes.summary())

    example.change(pick_example, example, [question, context, reference], api_visibility="private")
    event = gr.on(
        [compare.click, question.submit], run, [question, context, *controls.inputs],
        [base_answer, tuned_answer, base_stats, tuned_stats, info, last_result],
        api_visibility="private", concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit,
        trigger_mode="once",  # a second click while running is ignored, not queued
    )
    def stop_comparison(request: gr.Request) -> None:
        cancels.cancel(session_id(request))

    stop.click(stop_comparison, None, None, cancels=[event], queue=False, api_visibility="private")
    for button, choice in zip(vote_buttons, VOTE_CHOICES):
        button.click(lambda note, record, c=choice: vote(c, note, record), [comment, last_result], [comment, summary],
                     api_visibility="private")

    def compare_api(question: str, context: str = "", max_new_tokens: int = 256, temperature: float = 0.0,
                    top_p: float = 0.95, seed: int = 0) -> dict:
        """Answer the same question with the base and the fine-tuned model. Returns both answers with their
        decision, option probabilities, time to first token, tokens/s and token count."""
        settings = generation_settings(max_new_tokens, temperature, top_p, seed)
        *_, last = run_guarded(stream_comparison(backend, limits, question, context, settings))
        return {"mode": last.mode, "notices": last.notices, **{side.variant: side.as_dict() for side in last.sides}}

    gr.api(compare_api, api_name="compare", concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit)
