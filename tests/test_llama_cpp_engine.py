"""The llama.cpp engine on the real embedded GGUF: one model, base and fine-tuned on their own contexts, a Compare pair
side by side, the decision policy, Stop, stop sequences, the engine choice, and bad input. (Chat, Compare and reliability through the app run against
both engines in their own test files.)"""

from __future__ import annotations

import threading

import pytest

from app import model_status
from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings, ServerSettings
from pubmedqa.engines.base import GenerationSettings, LoadState
from pubmedqa.engines.factory import create_engine, resolve_engine
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import PromptInput, parse_decision
from pubmedqa.variants import Variant

llama_cpp = pytest.importorskip("llama_cpp")
from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine  # noqa: E402

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
    "Is aspirin effective in preventing a first myocardial infarction in elderly women?",
    "Does vitamin D supplementation reduce the risk of falls in older adults?",
]
GREEDY = GenerationSettings(max_new_tokens=24, repetition_penalty=1.0, min_new_tokens=0)  # plain greedy, as bare llama.cpp decodes


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = LlamaCppEngine(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR), engine="llama.cpp"))
    engine.load()
    return engine


def _prompt(engine, question: str = QUESTIONS[0], settings: GenerationSettings = GREEDY):
    return engine.prepare(PromptInput(question), settings)


def test_the_adapter_changes_the_answer_and_switching_back_restores_the_base_exactly(engine):
    prompt = _prompt(engine)
    base = engine.generate(prompt, Variant.BASE, GREEDY)
    tuned = engine.generate(prompt, Variant.TUNED, GREEDY)
    assert base and tuned and base != tuned
    assert parse_decision(tuned) in ("yes", "no", "maybe")
    assert engine.generate(prompt, Variant.BASE, GREEDY) == base
    # Mixed rows in one call give each row its own variant.
    assert engine.generate_batch([prompt, prompt], [Variant.TUNED, Variant.BASE], GREEDY) == [tuned, base]
    status = model_status.details(engine)
    assert "llama.cpp" in status and "Q4_K_M" in status and "decision probe on layer 10" in status


def test_a_compare_pair_streams_both_answers_side_by_side_as_each_would_be_alone(engine):
    settings = GenerationSettings(max_new_tokens=32)
    prompt = _prompt(engine, QUESTIONS[1], settings)
    alone = [engine.generate(prompt, variant, settings) for variant in (Variant.BASE, Variant.TUNED)]
    updates = list(engine.stream_batch([prompt, prompt], [Variant.BASE, Variant.TUNED], settings))
    assert updates[-1] == alone
    # The fine-tuned answer starts while the base one is still growing (not after it, as in turn).
    both_started = next(i for i, (base, tuned) in enumerate(updates) if base and tuned)
    assert updates[both_started][0] != alone[0] and len(updates[both_started][0].split()) <= 2
    # The pair's one-pass decisions are those of scoring each row.
    answers, decided = engine.generate_with_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED], settings)
    assert answers == alone
    for got, want in zip(decided, engine.score_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED])):
        assert got == pytest.approx(want, abs=1e-5)


def test_a_compare_and_a_chat_answer_read_each_prompt_once_and_decide_as_scoring_does(engine, monkeypatch):
    from app.compare import stream_comparison

    settings = GenerationSettings(max_new_tokens=16)
    prompt = _prompt(engine, QUESTIONS[0], settings)
    scored = engine.score_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED])
    reads = []
    original = engine.scheduler._first_step  # once per prompt read, at its end
    monkeypatch.setattr(engine.scheduler, "_first_step", lambda *a: reads.append(1) or original(*a))
    last = list(stream_comparison(engine, ServerSettings(), QUESTIONS[0], "", settings.__dict__))[-1]
    assert len(reads) == 2  # one per side: the decisions come from each answer's first step
    for side, want in zip(last.sides, scored):
        assert side.probabilities == pytest.approx(want, abs=1e-5)
        assert side.decision == max(want, key=want.get)
    decisions = []
    answer = list(engine.stream_decided([prompt], [Variant.TUNED], settings, None, decisions))[-1][0]
    assert len(reads) == 3 and answer and decisions[0] == pytest.approx(scored[1], abs=1e-5)


def test_stop_ends_both_answers_of_a_pair(engine):
    settings = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    prompt = _prompt(engine, QUESTIONS[2], settings)
    cancel = threading.Event()
    seen = []
    for texts in engine.stream_batch([prompt, prompt], [Variant.BASE, Variant.TUNED], settings, cancel):
        seen.append(texts)
        if all(len(t.split()) >= 3 for t in texts):
            cancel.set()
    assert all(0 < len(t.split()) < 60 for t in seen[-1])
    # The model is free again: a chat answer follows at once.
    assert engine.generate(prompt, Variant.BASE, GREEDY)


def test_one_pass_decisions_equal_scoring_and_the_answer_opens_with_the_decision(engine):
    prompts = [_prompt(engine, q) for q in QUESTIONS]
    variants = [Variant.BASE, Variant.TUNED, Variant.TUNED]
    scored = engine.score_decisions(prompts, variants)
    answers, decided = engine.generate_with_decisions(prompts, variants, GREEDY)
    for got, want in zip(decided, scored):
        assert got == pytest.approx(want, abs=1e-5)
    for answer, decision in zip(answers[1:], decided[1:]):
        assert parse_decision(answer) == max(decision, key=decision.get)
    # Without the calibration's offsets the fine-tuned rows differ; the base row never has any.
    raw = engine.load().policy.without_offsets(scored, [v is Variant.TUNED for v in variants])
    assert raw[0] == scored[0] and raw[1] != pytest.approx(scored[1])


def test_rows_decoded_together_decide_as_one_row_at_a_time(engine):
    # More rows than are decoded together, of different lengths, with the default repetition penalty.
    settings = GenerationSettings(max_new_tokens=24)
    prompts = [_prompt(engine, q, settings) for q in QUESTIONS * 3]
    assert len(prompts) > engine.settings.parallel_rows
    for variant in (Variant.BASE, Variant.TUNED):
        answers, decisions = engine.generate_with_decisions(prompts, [variant] * len(prompts), settings)
        assert engine.generate_with_decisions(prompts, [variant] * len(prompts), settings) == (answers, decisions)
        for prompt, answer, decision in zip(prompts, answers, decisions):
            [alone], [alone_decision] = engine.generate_with_decisions([prompt], [variant], settings)
            # With other rows, llama.cpp's multi-row kernels round differently, so answers may part after a
            # near-tie, but the decision (the first step, read off each prompt's own decode) is the same.
            assert decision == pytest.approx(alone_decision, abs=1e-4)
            assert answer.split()[0] == alone.split()[0]


def test_an_answer_goes_on_past_its_decision_word(engine, pubmedqa_dir):
    from pubmedqa.data import SplitSettings

    # A dev question the shipped adapter, left free, answers with its decision alone.
    record = SplitSettings(data=str(pubmedqa_dir)).load_split().dev[0]
    free = GenerationSettings(max_new_tokens=24, min_new_tokens=0)
    prompt = engine.prepare(record.prompt_input(), free)
    assert len(engine.generate(prompt, Variant.TUNED, free).split()) == 1
    default = GenerationSettings(max_new_tokens=24)
    explained = engine.generate(prompt, Variant.TUNED, default)
    assert parse_decision(explained) and len(explained.split()) > 3
    # The same in the evaluation's rows-together path.
    answers, _ = engine.generate_with_decisions([prompt, prompt], [Variant.TUNED] * 2, default)
    assert all(parse_decision(a) and len(a.split()) > 3 for a in answers)


def test_option_scores_rank_the_options_as_the_transformers_engine_does():
    from pubmedqa.engines.transformers_engine import TransformersEngine

    llama = LlamaCppEngine(ModelSettings(adapter="none", engine="llama.cpp"))
    # The transformers engine on the GGUF's own dequantised weights: the same model, another runtime.
    hf = TransformersEngine(ModelSettings(adapter="none", quantization="none", engine="transformers"))
    for question in QUESTIONS:
        inp = PromptInput(question)
        (ours,) = llama.score_decisions([llama.prepare(inp, GREEDY)], [Variant.BASE])
        (theirs,) = hf.score_decisions([hf.prepare(inp, GREEDY)], [Variant.BASE])
        assert sorted(ours, key=ours.get) == sorted(theirs, key=theirs.get)
        assert ours == pytest.approx(theirs, abs=0.05)


def test_stop_ends_the_stream_within_one_token(engine):
    settings = GenerationSettings(max_new_tokens=200)
    prompt = _prompt(engine, settings=settings)
    cancel = threading.Event()
    seen = []
    for text in engine.stream(prompt, Variant.BASE, settings, cancel):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()
    assert len(seen) <= 5  # the tokens already decoded when Stop came, and the final value
    # The context is free again for the next request.
    assert engine.generate(prompt, Variant.BASE, GREEDY)


def test_a_stop_sequence_ends_the_answer_before_it(engine, monkeypatch):
    prompt = _prompt(engine)
    full = engine.generate(prompt, Variant.BASE, GenerationSettings(max_new_tokens=40))
    word = full.split()[3]
    monkeypatch.setattr(engine, "stop_sequences", lambda: (" " + word,))
    cut = engine.generate(prompt, Variant.BASE, GenerationSettings(max_new_tokens=40))
    assert cut == full[: full.index(" " + word)].strip()


def test_sampling_follows_the_seed(engine):
    prompt = _prompt(engine)
    sampled = GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    first = engine.generate(prompt, Variant.BASE, sampled)
    assert engine.generate(prompt, Variant.BASE, sampled) == first
    others = {engine.generate(prompt, Variant.BASE, GenerationSettings(16, 1.0, 0.95, seed)) for seed in range(4)}
    assert len(others) > 1


def test_token_logprobs_score_the_last_tokens_as_the_openai_api_needs(engine):
    text = engine.prepare(PromptInput(QUESTIONS[1]), GREEDY).text + " yes"
    tokens, following = engine.token_logprobs(text, Variant.TUNED, top=5)
    assert tokens[-1][0].strip() == "yes" and tokens[-1][2] < 0 and tokens[0][2] is None
    assert "".join(piece for piece, _, _ in tokens[1:]) == text
    assert len(following) == 5 and all(v <= 0 for v in following.values())


def test_auto_engine_is_llama_cpp_for_the_embedded_model_on_a_cpu_and_transformers_for_a_folder(tiny_model_dir, monkeypatch):
    assert resolve_engine(ModelSettings()) == ("llama.cpp", None)
    assert resolve_engine(ModelSettings(base_model=str(tiny_model_dir))) == ("transformers", None)
    with pytest.raises(ValueError, match="runs a GGUF file"):
        resolve_engine(ModelSettings(base_model=str(tiny_model_dir), engine="llama.cpp"))
    monkeypatch.setattr("pubmedqa.engines.factory.llama_cpp_available", lambda: False)
    fallback = create_engine(ModelSettings(base_model=str(tiny_model_dir), adapter="none", engine="auto"))
    assert type(fallback).__name__ == "TransformersEngine"
    engine, note = resolve_engine(ModelSettings(engine="llama.cpp"))
    assert engine == "transformers" and "llama-cpp-python is not installed" in note


def test_a_file_that_is_not_a_gguf_model_gets_one_clear_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model at all")
    engine = LlamaCppEngine(ModelSettings(base_model=str(fake), adapter="none", engine="llama.cpp"))
    with pytest.raises(ModelLoadError, match="could not be loaded by llama.cpp"):
        engine.load()
    assert engine.state is LoadState.FAILED
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppEngine(ModelSettings(base_model=str(tmp_path / "missing.gguf"), engine="llama.cpp")).check_sources()


def test_an_adapter_of_another_model_leaves_the_base_serving_and_says_why(tiny_adapter_dir):
    engine = LlamaCppEngine(ModelSettings(adapter=str(tiny_adapter_dir), engine="llama.cpp"))
    loaded = engine.load()
    assert not loaded.adapter_loaded and "could not be loaded on llama.cpp" in engine.adapter_unavailable_reason()
    assert engine.generate(_prompt(engine), Variant.BASE, GREEDY)
