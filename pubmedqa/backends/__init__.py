"""The backends that run a model for the app, the APIs and the evaluation: the interface (``base``), the local
transformers backend, the remote OpenAI-compatible one, and the factory that picks one from the settings."""
