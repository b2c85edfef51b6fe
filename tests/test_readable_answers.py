"""Answers people can read: a repetition control on every in-process engine that leaves the decision alone, and the
two per-answer measures (looping, ended by itself)."""

from __future__ import annotations

from collections import Counter

import pytest

from app.validation import UserInputError, parse_generation_settings
from pubmedqa.config import ServerSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.evaluation.metrics import is_looping, readability_metrics
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant


def test_looping_is_some_three_word_sequence_said_three_times():
    assert is_looping("Noninvasive, noninvasive, noninvasive, noninvasive, noninvasive ventilation.")
    assert is_looping("the drug works. The drug works! the drug works and more")
    assert not is_looping("The drug works. The drug works in children.")  # twice is not a loop
    assert not is_looping("yes. Early surgery reduced mortality in elderly patients with hip fractures.")
    assert not is_looping("")
    figures = readability_metrics(["a b c a b c a b c", "fine answer here."], [False, True])
    assert figures["looping"] == 50 and figures["ended_by_itself"] == 50
    assert figures["per_example"][0] == {"looping": True, "ended": False}


def test_the_default_penalty_is_the_one_chosen_on_dev():
    assert GenerationSettings().repetition_penalty == 1.2  # docs/results.md, "Readable answers": the dev figures behind it


def test_the_repetition_penalty_is_validated_where_requests_come_in():
    with pytest.raises(ValueError, match="repetition penalty must be between 1"):
        GenerationSettings(repetition_penalty=0.5).validated(256)
    with pytest.raises(UserInputError, match="must be numbers"):
        parse_generation_settings({"repetition_penalty": "lots"}, ServerSettings())
    assert parse_generation_settings({"repetition_penalty": 1.3}, ServerSettings()).repetition_penalty == 1.3


def _most_repeated(engine, text: str) -> int:
    ids = engine.load().tokenizer(text, add_special_tokens=False)["input_ids"]
    return max(Counter(ids).values()) if ids else 0


def test_the_penalty_curbs_repeats_and_leaves_the_decision_and_first_token_alone(each_engine):
    engine = each_engine
    question = PromptInput("Is laparoscopic surgery safe for elderly patients with colorectal cancer?")
    plain = GenerationSettings(max_new_tokens=48, repetition_penalty=1.0)
    penalised = GenerationSettings(max_new_tokens=48, repetition_penalty=1.5)
    prompt = engine.prepare(question, plain)
    for variant in (Variant.BASE, Variant.TUNED):
        (free, ), (free_decision, ) = engine.generate_with_decisions([prompt], [variant], plain)
        (curbed, ), (curbed_decision, ) = engine.generate_with_decisions([prompt], [variant], penalised)
        assert curbed_decision == pytest.approx(free_decision, abs=1e-5)  # scored before any penalty
        if engine.name == "llama.cpp":  # a real model: the penalty never makes it repeat more
            assert _most_repeated(engine, curbed) <= _most_repeated(engine, free)
    # The prompt's tokens are not penalised: the first token is the model's own even under a strong penalty.
    one = GenerationSettings(max_new_tokens=1, repetition_penalty=1.0)
    strong = GenerationSettings(max_new_tokens=1, repetition_penalty=2.0)
    assert engine.generate(prompt, Variant.BASE, one) == engine.generate(prompt, Variant.BASE, strong)
    # The tiny random model repeats itself constantly: there the penalty must visibly bite.
    if engine.name == "transformers":
        free = engine.generate(prompt, Variant.BASE, plain)
        curbed = engine.generate(prompt, Variant.BASE, penalised)
        assert _most_repeated(engine, curbed) < _most_repeated(engine, free)
