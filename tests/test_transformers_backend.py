"""The model backend on a tiny random-weight model: one load, per-call adapter choice, streaming, Stop, errors."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pubmedqa.backends.base import AdapterUnavailableError, GenerationSettings, LoadState, Variant
from pubmedqa.backends.transformers_backend import TransformersBackend
from pubmedqa.config import ModelSettings
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import PromptInput, encode_prompt

GREEDY = GenerationSettings(max_new_tokens=12, repetition_penalty=1.0, min_new_tokens=0)  # plain greedy, as model.generate decodes
QUESTIONS = [f"Does treatment {i} reduce mortality in patients with diabetes?" for i in range(6)]


def _answer(backend: TransformersBackend, question: str, variant: Variant, settings: GenerationSettings = GREEDY) -> str:
    prompt = backend.prepare(PromptInput(question), settings)
    return backend.generate(prompt, variant, settings)


def test_backend_loads_the_model_once_for_concurrent_callers(tiny_backend, monkeypatch):
    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: tiny_backend.load(), range(4)))
    assert len(calls) == 1
    assert all(item is loaded[0] for item in loaded)
    assert tiny_backend.state is LoadState.READY


def test_base_variant_matches_the_plain_base_model_and_tuned_differs(tiny_backend, tiny_model_dir):
    base_answer = _answer(tiny_backend, QUESTIONS[0], Variant.BASE)
    tuned_answer = _answer(tiny_backend, QUESTIONS[0], Variant.TUNED)

    # The same prompt through a separately loaded plain model (no PEFT at all).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tiny_backend.prepare(PromptInput(QUESTIONS[0]), GREEDY)
    ids = torch.tensor([encode_prompt(prompt.text, tokenizer)])
    out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain_answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert base_answer and tuned_answer
    assert plain_answer.strip().startswith(base_answer)
    assert tuned_answer != base_answer


def test_one_copy_of_the_base_weights_serves_both_variants(tiny_backend):
    loaded = tiny_backend.load()
    base_params = [p for n, p in loaded.model.named_parameters() if "lora_" not in n]
    tiny_base = AutoModelForCausalLM.from_pretrained(tiny_backend.settings.base_model)
    assert sum(p.numel() for p in base_params) == sum(p.numel() for p in tiny_base.parameters())


def test_concurrent_requests_with_different_variants_do_not_cross(tiny_backend):
    jobs = [(q, Variant.BASE if i % 2 else Variant.TUNED) for i, q in enumerate(QUESTIONS)]
    alone = [_answer(tiny_backend, q, v) for q, v in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _answer(tiny_backend, *job), jobs))
    assert together == alone


def test_stream_grows_and_stop_ends_generation_early(tiny_backend):
    settings = GenerationSettings(max_new_tokens=200)
    prompt = tiny_backend.prepare(PromptInput(QUESTIONS[1]), settings)
    full = tiny_backend.generate(prompt, Variant.BASE, settings)

    cancel = threading.Event()
    seen = []
    for text in tiny_backend.stream(prompt, Variant.BASE, settings, cancel):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()
    assert len(seen) < 10
    assert len(seen[-1]) < len(full)
    # The model is free again right away: another request completes.
    assert _answer(tiny_backend, QUESTIONS[2], Variant.TUNED)


def test_closing_the_stream_releases_the_model(tiny_backend):
    settings = GenerationSettings(max_new_tokens=200)
    prompt = tiny_backend.prepare(PromptInput(QUESTIONS[1]), settings)
    stream = tiny_backend.stream(prompt, Variant.BASE, settings)
    next(stream)
    stream.close()  # what Gradio does when the user presses Stop or leaves
    given_up = threading.Event()
    threading.Timer(5, given_up.set).start()
    assert tiny_backend._model_lock.acquire(given_up)
    tiny_backend._model_lock.release()


def test_sampling_is_reproducible_with_the_same_seed(tiny_backend):
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = _answer(tiny_backend, QUESTIONS[3], Variant.BASE, sampled)
    assert _answer(tiny_backend, QUESTIONS[3], Variant.BASE, sampled) == first


def test_without_adapter_the_fine_tuned_variant_says_why(tiny_model_dir):
    backend = TransformersBackend(ModelSettings(base_model=str(tiny_model_dir), adapter="none", quantization="none"))
    assert "no adapter configured" in backend.adapter_unavailable_reason()
    assert _answer(backend, QUESTIONS[0], Variant.BASE)
    with pytest.raises(AdapterUnavailableError, match="not available"):
        _answer(backend, QUESTIONS[0], Variant.TUNED)


def test_missing_base_model_directory_names_the_setting(tmp_path):
    backend = TransformersBackend(ModelSettings(base_model=str(tmp_path / "nope"), adapter="none"))
    with pytest.raises(ModelLoadError, match="PUBMEDQA_BASE_MODEL"):
        backend.check_sources()
    with pytest.raises(ModelLoadError, match="does not exist"):
        backend.load()
    assert backend.state is LoadState.FAILED
    assert "does not exist" in backend.status_message()


def test_adapter_directory_without_config_names_the_setting(tiny_model_dir, tmp_path):
    backend = TransformersBackend(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="PUBMEDQA_ADAPTER"):
        backend.check_sources()


def test_corrupted_adapter_keeps_the_base_model_serving(tiny_model_dir, tiny_adapter_dir, tmp_path):
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    config = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    backend = TransformersBackend(ModelSettings(base_model=str(tiny_model_dir), adapter=str(broken), quantization="none"))
    assert _answer(backend, QUESTIONS[0], Variant.BASE)
    assert "could not be loaded" in backend.adapter_unavailable_reason()
    with pytest.raises(AdapterUnavailableError, match="PUBMEDQA_ADAPTER"):
        _answer(backend, QUESTIONS[0], Variant.TUNED)


def test_4bit_with_adapter_generates_both_variants(tiny_model_dir, tiny_adapter_dir):
    pytest.importorskip("bitsandbytes")
    backend = TransformersBackend(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir)))
    loaded = backend.load()
    assert loaded.quantization == "4bit"
    assert any("Linear4bit" in type(m).__name__ for m in loaded.model.modules())
    assert _answer(backend, QUESTIONS[0], Variant.BASE) != _answer(backend, QUESTIONS[0], Variant.TUNED)


def test_failed_4bit_load_falls_back_to_bf16_with_one_log_line(tiny_settings, monkeypatch, caplog):
    original = AutoModelForCausalLM.from_pretrained

    def no_bitsandbytes(*args, **kwargs):
        if "quantization_config" in kwargs:
            raise ImportError("bitsandbytes is not installed")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_bitsandbytes)
    settings = ModelSettings(base_model=tiny_settings.base_model, adapter="none", quantization="4bit")
    with caplog.at_level(logging.WARNING, logger="pubmedqa.backends.transformers_backend"):
        loaded = TransformersBackend(settings).load()
    assert loaded.model.dtype == torch.bfloat16
    assert "bf16" in loaded.quantization
    warnings = [r for r in caplog.records if "4bit quantization is not available" in r.getMessage()]
    assert len(warnings) == 1 and "bitsandbytes is not installed" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "settings, problem",
    [
        (GenerationSettings(max_new_tokens=0), "max new tokens"),
        (GenerationSettings(max_new_tokens=5000), "max new tokens"),
        (GenerationSettings(temperature=-1), "temperature"),
        (GenerationSettings(top_p=0), "top-p"),
        (GenerationSettings(seed=-3), "seed"),
    ],
)
def test_out_of_range_settings_are_rejected_with_the_reason(settings, problem):
    with pytest.raises(ValueError, match=problem):
        settings.validated(max_new_tokens_limit=1024)


def test_batched_generation_mixes_variants_and_matches_one_at_a_time(tiny_backend):
    prompts = [tiny_backend.prepare(PromptInput(q), GREEDY) for q in QUESTIONS[:4]]
    variants = [Variant.BASE, Variant.TUNED, Variant.TUNED, Variant.BASE]
    batched = tiny_backend.generate_batch(prompts, variants, GREEDY)
    alone = [tiny_backend.generate(p, v, GREEDY) for p, v in zip(prompts, variants)]
    assert batched == alone


def test_answers_and_decisions_in_one_pass_equal_the_two_separate_passes(tiny_backend, monkeypatch):
    contexts = ["", "We studied 120 patients.", "", "A randomized trial of heart failure in elderly patients " * 3]
    prompts = [tiny_backend.prepare(PromptInput(q, c), GREEDY) for q, c in zip(QUESTIONS, contexts)]
    assert len({p.n_tokens for p in prompts}) > 1  # left padding is part of what must agree
    variants = [Variant.BASE, Variant.TUNED, Variant.TUNED, Variant.BASE]
    separate = tiny_backend.score_decisions(prompts, variants), tiny_backend.generate_batch(prompts, variants, GREEDY)
    # the one-pass path must really be taken: scoring on its own would make it two passes again
    monkeypatch.setattr(tiny_backend, "score_decisions", lambda *a, **k: pytest.fail("scored in a second pass"))
    answers, decisions = tiny_backend.generate_with_decisions(prompts, variants, GREEDY)
    assert answers == separate[1]
    for got, want in zip(decisions, separate[0]):
        assert got == pytest.approx(want, abs=1e-5)
    assert len({round(d["yes"], 6) for d in decisions}) > 1  # the rows' own scores, not one row copied


def test_one_pass_decisions_fall_back_where_generation_changes_the_first_step(tiny_backend):
    # A repetition penalty changes the option logits that a logits processor sees: score them separately then.
    model = tiny_backend.load().model
    model.generation_config.repetition_penalty = 1.3
    prompts = [tiny_backend.prepare(PromptInput(q), GREEDY) for q in QUESTIONS[:2]]
    _, decisions = tiny_backend.generate_with_decisions(prompts, [Variant.BASE] * 2, GREEDY)
    assert decisions == tiny_backend.score_decisions(prompts, [Variant.BASE] * 2)


def test_bf16_loads_bfloat16_weights_without_quantising(tiny_model_dir):
    backend = TransformersBackend(ModelSettings(base_model=str(tiny_model_dir), adapter="none", quantization="bf16"))
    loaded = backend.load()
    assert loaded.quantization == "bf16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert backend.generate(backend.prepare(PromptInput(QUESTIONS[0]), GREEDY), Variant.BASE, GREEDY)
