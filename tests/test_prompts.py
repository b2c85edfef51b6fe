"""The shared prompt format: rendering, completions, fitting to the window, stop sequences, decisions."""

from __future__ import annotations

import pytest

from pubmedqa.prompts import (
    ANSWER_OPTIONS,
    PromptInput,
    PromptTooLongError,
    Turn,
    cut_at_stop,
    encode_prompt,
    first_sentence,
    fit_prompt,
    format_answer,
    format_completion,
    parse_decision,
    render_prompt,
    stable_prefix,
    training_answer,
)
from tests.conftest import build_tiny_tokenizer

QUESTION = "Does aspirin reduce the risk of myocardial infarction?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def test_raw_prompt_contains_context_history_and_question_in_order(tokenizer):
    inp = PromptInput(QUESTION, context="We studied 120 patients.", history=(Turn("Is it safe?", "yes. It is."),))
    text = render_prompt(inp, tokenizer)
    assert text.index("Context: We studied 120 patients.") < text.index("Question: Is it safe?")
    assert text.index("Answer: yes. It is.") < text.index(f"Question: {QUESTION}")
    assert text.endswith(f"Question: {QUESTION}\nAnswer:")


def test_prompt_plus_completion_is_what_the_model_sees_in_the_next_turn(tokenizer):
    """Round trip: a training example (prompt + completion) is exactly the prefix of the chat prompt that has
    that exchange in its history, so tuning and chatting use byte-identical text."""
    answer = format_answer("yes", "Aspirin lowered the risk.")
    first = render_prompt(PromptInput(QUESTION), tokenizer) + format_completion(answer, tokenizer)
    second = render_prompt(PromptInput("And in children?", history=(Turn(QUESTION, answer),)), tokenizer)
    assert second.startswith(first + "\n")


def test_format_answer_and_parse_decision_agree():
    for option in ANSWER_OPTIONS:
        assert parse_decision(format_answer(option, "Because the data show it.")) == option
    assert parse_decision("Maybe, the evidence is mixed.") == "maybe"
    assert parse_decision("The answer is unclear.") is None
    with pytest.raises(ValueError):
        format_answer("perhaps", "x")


def test_the_short_training_target_is_the_conclusions_first_sentence():
    conclusion = "Aspirin lowered the risk (e.g. in trial no. 3, vs. placebo) at 5.2 mg. Larger trials are needed.\n"
    assert first_sentence(conclusion) == "Aspirin lowered the risk (e.g. in trial no. 3, vs. placebo) at 5.2 mg."
    assert first_sentence("One sentence only, ending in P < .05.") == "One sentence only, ending in P < .05."
    assert first_sentence("Is it safe? 12 of 40 patients said no.") == "Is it safe?"
    assert training_answer("Yes", conclusion, "first_sentence") == "yes. " + first_sentence(conclusion)
    assert training_answer("no", conclusion, "conclusion") == "no. " + " ".join(conclusion.split())
    with pytest.raises(ValueError, match="answer target"):
        training_answer("yes", conclusion, "summary")


def test_chat_template_models_get_the_same_content_through_their_template(chat_tokenizer):
    inp = PromptInput(QUESTION, context="Abstract text.", history=(Turn("Q1?", "no. A1."),))
    text = render_prompt(inp, chat_tokenizer)
    assert text.startswith("<bos><|user|>Answer the biomedical")
    assert "Context: Abstract text." in text and "<|assistant|>no. A1.<|end|>" in text
    assert text.endswith(f"<|user|>{QUESTION}<|end|><|assistant|>")
    assert format_completion("yes.", chat_tokenizer) == "yes."
    # The template already holds the BOS token: encoding must not add a second one.
    assert encode_prompt(text, chat_tokenizer).count(chat_tokenizer.bos_token_id) == 1


def test_long_context_is_truncated_never_the_question(tokenizer):
    context = " ".join(f"Patients in cohort {i} received the treatment." for i in range(400))
    fitted = fit_prompt(PromptInput(QUESTION, context=context), tokenizer, max_tokens=300)
    assert fitted.context_truncated and fitted.n_tokens <= 300
    assert len(encode_prompt(fitted.text, tokenizer)) == fitted.n_tokens
    assert f"Question: {QUESTION}\nAnswer:" in fitted.text
    assert "[...]" in fitted.text
    assert any("truncated" in notice for notice in fitted.notices)


def test_oldest_turns_are_dropped_before_the_context_is_cut(tokenizer):
    history = tuple(Turn(f"Earlier question number {i}?", "yes. " + "Because. " * 30) for i in range(6))
    inp = PromptInput(QUESTION, context="Short abstract.", history=history)
    full = len(encode_prompt(render_prompt(inp, tokenizer), tokenizer))
    fitted = fit_prompt(inp, tokenizer, max_tokens=full - 50)
    assert fitted.dropped_turns >= 1 and not fitted.context_truncated
    assert "Earlier question number 0?" not in fitted.text and "Earlier question number 5?" in fitted.text
    assert "Short abstract." in fitted.text


def test_a_question_that_alone_is_too_long_is_refused_with_a_reason(tokenizer):
    with pytest.raises(PromptTooLongError, match="question is too long"):
        fit_prompt(PromptInput(QUESTION * 50), tokenizer, max_tokens=60)


def test_stop_sequences_cut_invented_follow_up_questions():
    text, stopped = cut_at_stop("yes. It works.\nQuestion: Does it also cure cancer?")
    assert (text, stopped) == ("yes. It works.", True)
    assert cut_at_stop("no. It does not.") == ("no. It does not.", False)
    # While streaming, a tail that may become a stop sequence is held back; normal text is not.
    assert stable_prefix("yes. It works.\nQue") == "yes. It works."
    assert stable_prefix("yes. It works.") == "yes. It works."
