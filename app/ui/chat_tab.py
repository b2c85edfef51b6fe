"""The Chat tab: multi-turn conversation with streaming, Stop, Clear, optional context and generation settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from app.chat import stream_answer
from app.ui.common import (
    MODEL_EVENTS,
    SessionCancels,
    build_settings_controls,
    generation_settings,
    notices_markdown,
    run_guarded,
    session_id,
)
from pubmedqa.backends.base import GenerationSettings, LoadState, ModelBackend, Variant
from pubmedqa.config import ServerSettings


def variant_update(backend: ModelBackend) -> dict[str, Any]:
    """The model choice as the backend allows it now: fine-tuned only once an adapter is really loaded."""
    reason = backend.adapter_unavailable_reason()
    if reason:
        return gr.update(interactive=False, value=Variant.BASE.value, info=f"Fine-tuned unavailable: {reason}.")
    if backend.state is LoadState.READY:
        return gr.update(interactive=True, info="Same base weights; 'fine-tuned' adds the LoRA adapter.")
    return gr.update(interactive=False, info="Available once the model has loaded.")


@dataclass
class ChatTab:
    variant: gr.Radio
    end_session: Callable[[gr.Request], None]  # to call when a browser session ends


def build_chat_tab(backend: ModelBackend, limits: ServerSettings, examples: list[dict[str, str]]) -> ChatTab:
    cancels = SessionCancels()
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Conversation",
                elem_id="chat-conversation",
                height=460,
                buttons=["copy", "copy_all"],
                feedback_options=None,
                placeholder="Ask a yes/no/maybe question about biomedical research. "
                "Paste an abstract on the right to ground the answer.",
            )
            with gr.Row():
                question = gr.Textbox(
                    placeholder="e.g. Does aspirin reduce the risk of myocardial infarction?",
                    show_label=False,
                    scale=5,
                    max_lines=6,
                    max_length=limits.max_question_chars,
                    autofocus=True,
                    elem_id="chat-question",
                )
                send = gr.Button("Send", variant="primary", scale=1)
            with gr.Row():
                stop = gr.Button("Stop", variant="stop")
                clear = gr.Button("Clear", elem_id="chat-clear")
            notice = gr.Markdown()
        with gr.Column(scale=2):
            variant = gr.Radio(
                choices=[v.value for v in Variant], value=Variant.BASE.value, label="Model", interactive=False
            )
            controls = build_settings_controls(limits)
            context = gr.Textbox(
                label="Abstract / context (optional)",
                placeholder="Paste the abstract the question is about; it is put into the prompt.",
                lines=8,
                max_lines=16,
                max_length=limits.max_context_chars,
            )
    if examples:
        gr.Examples(
            examples=[[ex["question"], ex["context"]] for ex in examples],
            inputs=[question, context],
            example_labels=[ex["question"] for ex in examples],
            label="Examples from PubMedQA (training questions)",
        )

    def respond(
        message: str,
        history: list[dict[str, Any]] | None,
        context_text: str,
        variant: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        seed: float,
        request: gr.Request,
    ) -> Iterator[tuple[Any, Any, Any]]:
        if not isinstance(message, str) or not message.strip():
            raise gr.Error("Please type a question.")
        original = list(history or [])
        waiting = "⏳ Loading the model…" if backend.state is not LoadState.READY else "…"
        pending = original + [{"role": "user", "content": message}, {"role": "assistant", "content": waiting}]
        yield pending, "", ""
        cancel = cancels.start(session_id(request))
        updates = stream_answer(
            backend, limits, message, context_text, original, variant,
            generation_settings(max_new_tokens, temperature, top_p, seed), cancel,
        )
        try:
            for update in run_guarded(updates):
                pending[-1] = {"role": "assistant", "content": update.answer or waiting}
                yield pending, gr.skip(), notices_markdown(update.notices)
        except gr.Error:
            yield original, message, ""  # give the question back: nothing the user typed is lost
            raise
        if not pending[-1]["content"] or pending[-1]["content"] == waiting:
            pending[-1] = {"role": "assistant", "content": "_(stopped before any text was generated)_"}
            yield pending, gr.skip(), gr.skip()

    def stop_generation(request: gr.Request) -> None:
        cancels.cancel(session_id(request))

    def clear_chat(request: gr.Request) -> tuple[list, str, str]:
        cancels.cancel(session_id(request))
        return [], "", ""

    chat_event = gr.on(
        triggers=[question.submit, send.click],
        fn=respond,
        inputs=[question, chatbot, context, variant, *controls.inputs],
        outputs=[chatbot, question, notice],
        api_visibility="private",
        concurrency_id=MODEL_EVENTS,
        concurrency_limit=limits.concurrency_limit,
    )
    stop.click(stop_generation, None, None, cancels=[chat_event], queue=False, api_visibility="private")
    clear.click(
        clear_chat, None, [chatbot, question, notice], cancels=[chat_event], queue=False, api_visibility="private"
    )
    return ChatTab(variant=variant, end_session=stop_generation)


def register_chat_api(backend: ModelBackend, limits: ServerSettings) -> None:
    """The ``/chat`` endpoint for scripts (gradio_client): same validation and model as the Chat tab."""

    def chat(
        question: str,
        context: str = "",
        history: list[dict] | None = None,
        model: str = Variant.BASE.value,
        max_new_tokens: int = GenerationSettings.max_new_tokens,
        temperature: float = GenerationSettings.temperature,
        top_p: float = GenerationSettings.top_p,
        seed: int = GenerationSettings.seed,
    ) -> Iterator[str]:
        """Answer a biomedical question. `history` is a list of {"role": "user"|"assistant", "content": str}
        messages; `model` is "base" or "fine-tuned". Streams the growing answer; the last value is the answer."""
        settings = generation_settings(max_new_tokens, temperature, top_p, seed)
        updates = stream_answer(backend, limits, question, context, history, model, settings)
        for update in run_guarded(updates):
            yield update.answer

    gr.api(chat, api_name="chat", concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit)
