"""Fine-tuning, evaluation and publishing CLIs for the PubMedQA chatbot (`python -m training.<command>`)."""
