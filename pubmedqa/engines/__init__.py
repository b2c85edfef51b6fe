"""What runs a model for the app, the APIs and the evaluation: the interface (``base``, with the two variants), one
engine per engine of ``--engine`` (``llama_cpp_engine`` and ``transformers_engine`` in this process, ``remote``
for ``openai``, an OpenAI-compatible server) and the factory that picks one from the settings."""
