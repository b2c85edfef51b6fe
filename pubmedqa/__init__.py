"""The core of the PubMedQA chatbot: configuration, the prompt format, the data, the decision policy, the engines that
run a model, and the evaluation. The app's UI (``app/``) and the training CLIs (``training/``) both build on it; it
imports neither."""
