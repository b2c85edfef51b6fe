"""The Evaluation tab: metric charts of base vs fine-tuned and the per-example table."""

import gradio as gr


def build_evaluation_tab() -> None:
    gr.Markdown(
        "### Coming soon\nAccuracy, macro-F1, Token-F1, BLEU, ROUGE, BERTScore and LLM-as-a-judge scores of the "
        "base and fine-tuned models on the official PubMedQA test set will be shown here."
    )
