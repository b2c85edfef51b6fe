"""The generation settings controls every tab shows, and the settings they send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import GenerationSettings


@dataclass
class SettingsControls:
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number
    repetition_penalty: gr.Slider
    min_new_tokens: gr.Slider

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.max_new_tokens, self.temperature, self.top_p, self.seed, self.repetition_penalty, self.min_new_tokens]


def build_settings_controls(limits: ServerSettings) -> SettingsControls:
    defaults = GenerationSettings()
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(
            1, limits.max_new_tokens_limit, value=defaults.max_new_tokens, step=1, label="Max new tokens"
        )
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
        seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
        repetition_penalty = gr.Slider(
            1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty (1 = off)",
            info="Keeps answers from repeating themselves; it counts the answer's own words only, so the "
            "yes/no/maybe decision stays the model's own.",
        )
        min_new_tokens = gr.Slider(
            0, 16, value=defaults.min_new_tokens, step=1, label="Minimum answer tokens (0 = off)",
            info="No end before this many tokens, so an answer explains its decision instead of stopping at 'yes.'.",
        )
    return SettingsControls(max_new_tokens, temperature, top_p, seed, repetition_penalty, min_new_tokens)


def generation_settings(
    max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any, repetition_penalty: Any, min_new_tokens: Any
) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
            "repetition_penalty": repetition_penalty, "min_new_tokens": min_new_tokens}
