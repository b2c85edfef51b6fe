"""The Chat tab: multi-turn conversation with streaming, Stop, Clear, optional context and generation settings."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from app.chat import ChatUpdate, UserInputError, stream_answer
from app.config import ServerSettings
from app.registry import AdapterUnavailableError, GenerationSettings, LoadState, ModelLoadError, ModelRegistry, Variant

logger = logging.getLogger(__name__)

MODEL_EVENTS = "model"  # concurrency group of every event that runs the model


class SessionCancels:
    """One cancel flag per browser session, so Stop interrupts that session's generation at once, even while it
    is still waiting for its turn on the model."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
        return event

    def cancel(self, session: str) -> None:
        with self._lock:
            event = self._events.pop(session, None)
        if event is not None:
            event.set()


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def notices_markdown(notices: list[str]) -> str:
    return "\n".join(f"ℹ️ {notice}" for notice in notices)


def generation_settings(max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}


def run_guarded(updates: Iterator[ChatUpdate]) -> Iterator[ChatUpdate]:
    """Turn the errors a user can act on into a gr.Error with the message, and anything else into a generic one
    (logged with its traceback), so a failing request never takes the app down."""
    try:
        yield from updates
    except (UserInputError, AdapterUnavailableError, ModelLoadError) as exc:
        raise gr.Error(str(exc)) from None
    except Exception as exc:
        logger.exception("Generation failed")
        raise gr.Error(f"Generation failed ({type(exc).__name__}). Please try again.") from None


@dataclass
class SettingsControls:
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.max_new_tokens, self.temperature, self.top_p, self.seed]


def build_settings_controls(limits: ServerSettings) -> SettingsControls:
    defaults = GenerationSettings()
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(
            1, limits.max_new_tokens_limit, value=defaults.max_new_tokens, step=1, label="Max new tokens"
        )
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
        seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
    return SettingsControls(max_new_tokens, temperature, top_p, seed)


def variant_update(registry: ModelRegistry) -> dict[str, Any]:
    """The model choice as the registry allows it now: fine-tuned only once an adapter is really loaded."""
    reason = registry.adapter_unavailable_reason()
    if reason:
        return gr.update(interactive=False, value=Variant.BASE.value, info=f"Fine-tuned unavailable: {reason}.")
    if registry.state is LoadState.READY:
        return gr.update(interactive=True, info="Same base weights; 'fine-tuned' adds the LoRA adapter.")
    return gr.update(interactive=False, info="Available once the model has loaded.")


@dataclass
class ChatTab:
    variant: gr.Radio
    end_session: Callable[[gr.Request], None]  # to call when a browser session ends


def build_chat_tab(registry: ModelRegistry, limits: ServerSettings, examples: list[dict[str, str]]) -> ChatTab:
    cancels = SessionCancels()
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Conversation",
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
                )
                send = gr.Button("Send", variant="primary", scale=1)
            with gr.Row():
                stop = gr.Button("Stop", variant="stop")
                clear = gr.Button("Clear")
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
        waiting = "⏳ Loading the model…" if registry.state is not LoadState.READY else "…"
        pending = original + [{"role": "user", "content": message}, {"role": "assistant", "content": waiting}]
        yield pending, "", ""
        cancel = cancels.start(_session(request))
        updates = stream_answer(
            registry, limits, message, context_text, original, variant,
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
        cancels.cancel(_session(request))

    def clear_chat(request: gr.Request) -> tuple[list, str, str]:
        cancels.cancel(_session(request))
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


def register_chat_api(registry: ModelRegistry, limits: ServerSettings) -> None:
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
        updates = stream_answer(registry, limits, question, context, history, model, settings)
        for update in run_guarded(updates):
            yield update.answer

    gr.api(chat, api_name="chat", concurrency_id=MODEL_EVENTS, concurrency_limit=limits.concurrency_limit)
