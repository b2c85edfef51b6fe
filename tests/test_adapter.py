"""The one Adapter object: a local folder or a Hub snapshot (with the decision files and the training record),
resolved once per engine load, with clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pubmedqa.adapter import CONFIG_FILE, HUB_PATTERNS, Adapter, AdapterError
from pubmedqa.config import SHIPPED_ADAPTER_DIR


def test_a_local_folder_is_used_as_it_is_with_its_training_record():
    adapter = Adapter.resolve(str(SHIPPED_ADAPTER_DIR))
    assert adapter.folder == SHIPPED_ADAPTER_DIR and adapter.name == "adapter"
    assert adapter.file(CONFIG_FILE) == SHIPPED_ADAPTER_DIR / CONFIG_FILE and adapter.file("nothing.json") is None
    assert adapter.metadata is not None and adapter.metadata.base_quantization.startswith("none")


def test_a_hub_repo_is_one_snapshot_of_what_the_app_reads(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        folder = tmp_path / "snapshot"
        shutil.copytree(SHIPPED_ADAPTER_DIR, folder, dirs_exist_ok=True)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    adapter = Adapter.resolve("someone/pubmedqa-lora")
    assert calls == [("someone/pubmedqa-lora", list(HUB_PATTERNS))] and adapter.name == "someone/pubmedqa-lora"
    assert {"decision_probe*.safetensors", "decision_calibration*.json", "pubmedqa_adapter.json"} <= set(HUB_PATTERNS)
    assert adapter.file("decision_probe.safetensors") is not None  # the engine's policy reads it from there


def test_bad_adapters_are_refused_with_one_clear_line(monkeypatch, tmp_path):
    with pytest.raises(AdapterError, match="is not a folder"):
        Adapter.resolve(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        Adapter.resolve(str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise ConnectionError("https://huggingface.co/api/models/x?token=hf_SECRET unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(AdapterError, match=r"neither a local folder nor a downloadable Hub repo \(ConnectionError\)") as exc:
        Adapter.resolve("someone/missing")
    assert "hf_SECRET" not in str(exc.value)


def test_an_engine_resolves_the_adapter_once_and_a_bad_one_leaves_the_base_serving(tiny_settings, monkeypatch):
    from dataclasses import replace

    from pubmedqa.engines.transformers_engine import TransformersEngine

    resolved = []
    real = Adapter.resolve.__func__

    def counting(cls, source):
        resolved.append(source)
        return real(cls, source)

    monkeypatch.setattr(Adapter, "resolve", classmethod(counting))
    engine = TransformersEngine(tiny_settings)
    assert engine.load().adapter_loaded and resolved == [tiny_settings.adapter]
    assert engine.adapter.folder == Path(tiny_settings.adapter)

    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    broken = TransformersEngine(replace(tiny_settings, adapter="someone/not-there"))
    assert not broken.load().adapter_loaded
    assert "not-there" in broken.adapter_unavailable_reason() and "PUBMEDQA_ADAPTER" in broken.adapter_unavailable_reason()
