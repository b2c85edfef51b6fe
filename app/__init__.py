"""PubMedQA chatbot: a Gradio app for biomedical question answering with a base model and its LoRA fine-tune."""
