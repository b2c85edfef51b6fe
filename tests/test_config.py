"""Settings: defaults, environment variables, then CLI flags; bad values are refused with the setting's name."""

from __future__ import annotations

import pytest

from pubmedqa.config import ModelSettings, ServerSettings, parse_settings


def test_environment_overrides_defaults_and_flags_override_environment(monkeypatch):
    monkeypatch.setenv("PUBMEDQA_BASE_MODEL", "meta-llama/Llama-2-13b-chat-hf")
    monkeypatch.setenv("PUBMEDQA_QUANTIZATION", "8bit")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    monkeypatch.setenv("PUBMEDQA_PRELOAD", "false")
    model, server = parse_settings([ModelSettings, ServerSettings], ["--quantization", "none"])
    assert model.base_model == "meta-llama/Llama-2-13b-chat-hf"
    assert model.quantization == "none"
    assert server.server_port == 9000 and server.preload is False


def test_defaults_are_the_embedded_model_in_4bit_on_localhost(monkeypatch):
    for name in ("PUBMEDQA_BASE_MODEL", "PUBMEDQA_QUANTIZATION", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model, server = parse_settings([ModelSettings, ServerSettings], [])
    assert (model.base_model, model.quantization) == ("embedded", "4bit")
    assert (server.server_name, server.server_port) == ("127.0.0.1", 7860)


def test_adapter_none_disables_the_fine_tuned_variant():
    assert ModelSettings(adapter="none").adapter_source is None
    assert ModelSettings(adapter="user/my-adapter").adapter_source == "user/my-adapter"


def test_bad_values_name_the_setting(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "eighty")
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT"):
        parse_settings([ServerSettings], [])
    with pytest.raises(ValueError, match="PUBMEDQA_QUANTIZATION"):
        ModelSettings(quantization="3bit")


def test_one_engine_choice_and_the_removed_backend_spelling_refused(monkeypatch):
    from pubmedqa.engines.factory import create_engine
    from pubmedqa.engines.openai_engine import OpenAIEngine

    remote = {"base_url": "http://127.0.0.1:9/v1", "remote_model": "pubmedqa-base"}
    (settings,) = parse_settings([ModelSettings], ["--engine", "openai", "--base_url", remote["base_url"],
                                                   "--model", remote["remote_model"]])
    assert settings.engine == "openai" and isinstance(create_engine(settings), OpenAIEngine)
    with pytest.raises(ValueError, match="--backend"):
        parse_settings([ModelSettings], ["--backend", "openai"])
    monkeypatch.setenv("PUBMEDQA_BACKEND", "openai")
    with pytest.raises(ValueError, match="PUBMEDQA_BACKEND was removed: set PUBMEDQA_ENGINE"):
        parse_settings([ModelSettings], [])
    monkeypatch.delenv("PUBMEDQA_BACKEND")
    with pytest.raises(ValueError, match="openai engine needs --base_url"):
        ModelSettings(engine="openai")


def test_concurrency_follows_the_engine_unless_set_and_parallel_rows_are_checked(monkeypatch):
    class Engine:
        concurrent_requests = 16

    assert ServerSettings().for_engine(Engine()).concurrency_limit == 16
    assert ServerSettings(concurrency_limit=3).for_engine(Engine()).concurrency_limit == 3
    monkeypatch.setenv("PUBMEDQA_PARALLEL_ROWS", "4")
    model, server = parse_settings([ModelSettings, ServerSettings], [])
    assert model.parallel_rows == 4 and server.concurrency_limit == 0
    for bad in ("0", "65"):
        monkeypatch.setenv("PUBMEDQA_PARALLEL_ROWS", bad)
        with pytest.raises(ValueError, match="parallel_rows"):
            parse_settings([ModelSettings], [])
    with pytest.raises(ValueError, match="concurrency_limit"):
        ServerSettings(concurrency_limit=-1)
