"""Chat requests through the service and through the running app (both in-process engines): validation, history,\nAPI."""

from __future__ import annotations

import pytest

from app.chat import stream_answer
from app.ui.interface import build_app
from app.validation import UserInputError, history_to_turns
from pubmedqa.config import ServerSettings
from pubmedqa.prompts import Turn
from tests.conftest import serving

LIMITS = ServerSettings(max_question_chars=300, max_context_chars=2000, max_new_tokens_limit=64)
SETTINGS = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 0.95, "seed": 0}


def _final(engine, question, context="", history=None, variant="base", settings=SETTINGS):
    updates = list(stream_answer(engine, LIMITS, question, context, history, variant, settings))
    return updates[-1]


@pytest.mark.parametrize(
    "question, context, variant, settings, message",
    [
        ("", "", "base", SETTINGS, "type a question"),
        ("   \n\t ", "", "base", SETTINGS, "type a question"),
        ("x" * 301, "", "base", SETTINGS, "limit is 300"),
        ("Is it?", "c" * 2001, "base", SETTINGS, "context is 2,001 characters"),
        (123, "", "base", SETTINGS, "question must be text"),
        ("Is it?", "", "gpt-5", SETTINGS, "Unknown model choice"),
        ("Is it?", "", "base", {**SETTINGS, "max_new_tokens": 10_000}, "max new tokens"),
        ("Is it?", "", "base", {**SETTINGS, "temperature": "hot"}, "must be numbers"),
    ],
)
def test_bad_requests_get_a_message_saying_what_to_change(tiny_engine, question, context, variant, settings, message):
    with pytest.raises(UserInputError, match=message):
        _final(tiny_engine, question, context, variant=variant, settings=settings)


def test_control_characters_and_markup_are_answered_as_plain_text(each_engine):
    update = _final(each_engine, "Is <script>alert(1)</script> \x00\x07 safe? 💊 安全吗?")
    assert isinstance(update.answer, str)


def test_too_long_context_is_truncated_and_the_user_is_told(each_engine):
    context = "Patients received the drug. " * 70  # under the character limit, over the token budget
    each_engine.settings.max_input_tokens = 200
    update = _final(each_engine, "Did the drug work?", context)
    assert any("truncated" in notice for notice in update.notices)


def test_gradio_history_with_content_parts_becomes_turns():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Is A good?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes. A is good."}]},
        {"role": "user", "content": "Is B good?"},
        {"role": "assistant", "content": "no. B is not."},
        {"role": "user", "content": "unanswered"},
    ]
    assert history_to_turns(history, LIMITS) == (Turn("Is A good?", "yes. A is good."), Turn("Is B good?", "no. B is not."))
    with pytest.raises(UserInputError, match="history"):
        history_to_turns("not a list", LIMITS)


def test_history_changes_the_answer_context(each_engine):
    alone = _final(each_engine, "Is B good?").answer
    history = [{"role": "user", "content": "Is A good?"}, {"role": "assistant", "content": "yes. A is good."}]
    with_history = _final(each_engine, "Is B good?", history=history).answer
    assert alone != with_history


@pytest.fixture
def running_app(each_engine):
    with serving(build_app(each_engine, LIMITS)) as url:
        yield url


def test_chat_api_answers_streams_and_reports_bad_input(running_app, each_engine):
    from gradio_client import Client

    client = Client(running_app, verbose=False)
    question = "Does aspirin reduce the risk of myocardial infarction?"
    answer = client.predict(question=question, model="fine-tuned", max_new_tokens=8, api_name="/chat")
    expected = _final(each_engine, question, variant="fine-tuned").answer
    assert answer == expected and answer

    job = client.submit(question=question, max_new_tokens=8, api_name="/chat")
    outputs = list(job)
    assert len(outputs) >= 2 and outputs[-1] == _final(each_engine, question).answer

    # The minimum answer length of the page's Generation settings reaches the model through the API too.
    no_early_end = {**SETTINGS, "min_new_tokens": 8}
    assert client.predict(question=question, max_new_tokens=8, min_new_tokens=8, api_name="/chat") == _final(
        each_engine, question, settings=no_early_end).answer
    with pytest.raises(Exception, match="min new tokens must be between 0 and 64"):
        client.predict(question=question, min_new_tokens=65, api_name="/chat")

    with pytest.raises(Exception, match="type a question"):
        client.predict(question="  ", api_name="/chat")
    # The app keeps serving after a bad request.
    assert client.predict(question=question, model="fine-tuned", max_new_tokens=8, api_name="/chat") == expected
