"""The model engine on a tiny random-weight model: one load, per-call adapter choice, streaming, Stop, errors."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app import model_status
from pubmedqa.config import ModelSettings
from pubmedqa.engines.base import AdapterUnavailableError, GenerationSettings, LoadState
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import PromptInput, encode_prompt
from pubmedqa.variants import Variant

GREEDY = GenerationSettings(max_new_tokens=12, repetition_penalty=1.0, min_new_tokens=0)  # plain greedy, as model.generate decodes
QUESTIONS = [f"Does treatment {i} reduce mortality in patients with diabetes?" for i in range(6)]


def _answer(engine: TransformersEngine, question: str, variant: Variant, settings: GenerationSettings = GREEDY) -> str:
    prompt = engine.prepare(PromptInput(question), settings)
    return engine.generate(prompt, variant, settings)


def test_engine_loads_the_model_once_for_concurrent_callers(tiny_engine, monkeypatch):
    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: tiny_engine.load(), range(4)))
    assert len(calls) == 1
    assert all(item is loaded[0] for item in loaded)
    assert tiny_engine.state is LoadState.READY


def test_base_variant_matches_the_plain_base_model_and_tuned_differs(tiny_engine, tiny_model_dir):
    base_answer = _answer(tiny_engine, QUESTIONS[0], Variant.BASE)
    tuned_answer = _answer(tiny_engine, QUESTIONS[0], Variant.TUNED)

    # The same prompt through a separately loaded plain model (no PEFT at all).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tiny_engine.prepare(PromptInput(QUESTIONS[0]), GREEDY)
    ids = torch.tensor([encode_prompt(prompt.text, tokenizer)])
    out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain_answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert base_answer and tuned_answer
    assert plain_answer.strip().startswith(base_answer)
    assert tuned_answer != base_answer


def test_one_copy_of_the_base_weights_serves_both_variants(tiny_engine):
    loaded = tiny_engine.load()
    base_params = [p for n, p in loaded.model.named_parameters() if "lora_" not in n]
    tiny_base = AutoModelForCausalLM.from_pretrained(tiny_engine.settings.base_model)
    assert sum(p.numel() for p in base_params) == sum(p.numel() for p in tiny_base.parameters())


def test_concurrent_requests_with_different_variants_do_not_cross(tiny_engine):
    jobs = [(q, Variant.BASE if i % 2 else Variant.TUNED) for i, q in enumerate(QUESTIONS)]
    alone = [_answer(tiny_engine, q, v) for q, v in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _answer(tiny_engine, *job), jobs))
    assert together == alone


def test_stream_grows_and_stop_ends_generation_early(tiny_engine):
    settings = GenerationSettings(max_new_tokens=200)
    prompt = tiny_engine.prepare(PromptInput(QUESTIONS[1]), settings)
    full = tiny_engine.generate(prompt, Variant.BASE, settings)

    cancel = threading.Event()
    seen = []
    for text in tiny_engine.stream(prompt, Variant.BASE, settings, cancel):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()
    assert len(seen) < 10
    assert len(seen[-1]) < len(full)
    # The model is free again right away: another request completes.
    assert _answer(tiny_engine, QUESTIONS[2], Variant.TUNED)


def test_closing_the_stream_releases_the_model(tiny_engine):
    settings = GenerationSettings(max_new_tokens=200)
    prompt = tiny_engine.prepare(PromptInput(QUESTIONS[1]), settings)
    stream = tiny_engine.stream(prompt, Variant.BASE, settings)
    next(stream)
    stream.close()  # what Gradio does when the user presses Stop or leaves
    given_up = threading.Event()
    threading.Timer(5, given_up.set).start()
    assert tiny_engine._model_lock.acquire(given_up)
    tiny_engine._model_lock.release()


def test_sampling_is_reproducible_with_the_same_seed(tiny_engine):
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = _answer(tiny_engine, QUESTIONS[3], Variant.BASE, sampled)
    assert _answer(tiny_engine, QUESTIONS[3], Variant.BASE, sampled) == first


def test_without_adapter_the_fine_tuned_variant_says_why(tiny_model_dir):
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter="none", quantization="none"))
    assert "no adapter configured" in engine.adapter_unavailable_reason()
    assert _answer(engine, QUESTIONS[0], Variant.BASE)
    with pytest.raises(AdapterUnavailableError, match="not available"):
        _answer(engine, QUESTIONS[0], Variant.TUNED)


def test_missing_base_model_directory_names_the_setting(tmp_path):
    engine = TransformersEngine(ModelSettings(base_model=str(tmp_path / "nope"), adapter="none"))
    with pytest.raises(ModelLoadError, match="PUBMEDQA_BASE_MODEL"):
        engine.check_sources()
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.load()
    assert engine.state is LoadState.FAILED
    assert "does not exist" in model_status.details(engine)


def test_adapter_directory_without_config_names_the_setting(tiny_model_dir, tmp_path):
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="PUBMEDQA_ADAPTER"):
        engine.check_sources()


def test_corrupted_adapter_keeps_the_base_model_serving(tiny_model_dir, tiny_adapter_dir, tmp_path):
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    config = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(broken), quantization="none"))
    assert _answer(engine, QUESTIONS[0], Variant.BASE)
    assert "could not be loaded" in engine.adapter_unavailable_reason()
    with pytest.raises(AdapterUnavailableError, match="PUBMEDQA_ADAPTER"):
        _answer(engine, QUESTIONS[0], Variant.TUNED)


def test_4bit_with_adapter_generates_both_variants(tiny_model_dir, tiny_adapter_dir):
    pytest.importorskip("bitsandbytes")
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir)))
    loaded = engine.load()
    assert loaded.quantization == "4bit"
    assert any("Linear4bit" in type(m).__name__ for m in loaded.model.modules())
    assert _answer(engine, QUESTIONS[0], Variant.BASE) != _answer(engine, QUESTIONS[0], Variant.TUNED)


def test_failed_4bit_load_falls_back_to_bf16_with_one_log_line(tiny_settings, monkeypatch, caplog):
    original = AutoModelForCausalLM.from_pretrained

    def no_bitsandbytes(*args, **kwargs):
        if "quantization_config" in kwargs:
            raise ImportError("bitsandbytes is not installed")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_bitsandbytes)
    settings = ModelSettings(base_model=tiny_settings.base_model, adapter="none", quantization="4bit")
    with caplog.at_level(logging.WARNING, logger="pubmedqa.engines.transformers_engine"):
        loaded = TransformersEngine(settings).load()
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


def test_batched_generation_mixes_variants_and_matches_one_at_a_time(tiny_engine):
    prompts = [tiny_engine.prepare(PromptInput(q), GREEDY) for q in QUESTIONS[:4]]
    variants = [Variant.BASE, Variant.TUNED, Variant.TUNED, Variant.BASE]
    batched = tiny_engine.generate_batch(prompts, variants, GREEDY)
    alone = [tiny_engine.generate(p, v, GREEDY) for p, v in zip(prompts, variants)]
    assert batched == alone


def test_answers_and_decisions_in_one_pass_equal_the_two_separate_passes(tiny_engine, monkeypatch):
    contexts = ["", "We studied 120 patients.", "", "A randomized trial of heart failure in elderly patients " * 3]
    prompts = [tiny_engine.prepare(PromptInput(q, c), GREEDY) for q, c in zip(QUESTIONS, contexts)]
    assert len({p.n_tokens for p in prompts}) > 1  # left padding is part of what must agree
    variants = [Variant.BASE, Variant.TUNED, Variant.TUNED, Variant.BASE]
    separate = tiny_engine.score_decisions(prompts, variants), tiny_engine.generate_batch(prompts, variants, GREEDY)
    # the one-pass path must really be taken: scoring on its own would make it two passes again
    monkeypatch.setattr(tiny_engine, "score_decisions", lambda *a, **k: pytest.fail("scored in a second pass"))
    answers, decisions = tiny_engine.generate_with_decisions(prompts, variants, GREEDY)
    assert answers == separate[1]
    for got, want in zip(decisions, separate[0]):
        assert got == pytest.approx(want, abs=1e-5)
    assert len({round(d["yes"], 6) for d in decisions}) > 1  # the rows' own scores, not one row copied


def test_one_pass_decisions_fall_back_where_generation_changes_the_first_step(tiny_engine):
    # A repetition penalty changes the option logits that a logits processor sees: score them separately then.
    model = tiny_engine.load().model
    model.generation_config.repetition_penalty = 1.3
    prompts = [tiny_engine.prepare(PromptInput(q), GREEDY) for q in QUESTIONS[:2]]
    _, decisions = tiny_engine.generate_with_decisions(prompts, [Variant.BASE] * 2, GREEDY)
    assert decisions == tiny_engine.score_decisions(prompts, [Variant.BASE] * 2)


def test_bf16_loads_bfloat16_weights_without_quantising(tiny_model_dir):
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter="none", quantization="bf16"))
    loaded = engine.load()
    assert loaded.quantization == "bf16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert engine.generate(engine.prepare(PromptInput(QUESTIONS[0]), GREEDY), Variant.BASE, GREEDY)
