"""The Compare tab: base and fine-tuned answers to the same question, side by side."""

import gradio as gr


def build_compare_tab() -> None:
    gr.Markdown(
        "### Coming soon\nThe same question answered side by side by the base model and the fine-tuned one, "
        "with votes. Until then, switch the model choice in the Chat tab."
    )
