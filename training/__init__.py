"""The fine-tuning steps behind ``python -m scripts.train`` (settings, data, LoRA placement, the trainer, the run's
record) and what publishing an adapter needs (model cards, the Hub, llama.cpp's tools, Ollama). The modules named
like commands here are the old spellings of ``scripts/``, kept for one release."""
