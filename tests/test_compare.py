"""Compare: both variants from one batched call, each equal to its variant alone; votes; the /compare API."""

from __future__ import annotations

import json

import pytest

from app.compare import stream_comparison
from app.ui.interface import build_app
from app.validation import UserInputError
from app.votes import VoteError, VoteLog
from pubmedqa.config import ModelSettings, ServerSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant
from tests.conftest import serving

SETTINGS = {"max_new_tokens": 10, "temperature": 0.0, "top_p": 0.95, "seed": 0}
QUESTION = "Does metformin lower mortality in elderly patients?"


def _limits(tmp_path) -> ServerSettings:
    return ServerSettings(max_new_tokens_limit=64, votes_path=str(tmp_path / "votes" / "votes.jsonl"))


def test_comparison_gives_each_variant_its_own_answer(each_engine, tmp_path):
    updates = list(stream_comparison(each_engine, _limits(tmp_path), QUESTION, "", SETTINGS))
    final = updates[-1]
    assert final.done and final.mode == each_engine.pair_mode
    base, tuned = final.sides
    settings = GenerationSettings(max_new_tokens=10)
    prompt = each_engine.prepare(PromptInput(QUESTION), settings)
    assert base.answer == each_engine.generate(prompt, Variant.BASE, settings)
    assert tuned.answer == each_engine.generate(prompt, Variant.TUNED, settings)
    assert base.answer != tuned.answer
    for side in final.sides:
        assert sum(side.probabilities.values()) == pytest.approx(1.0) and side.decision in side.probabilities
        assert side.ttft_s is not None and side.n_tokens > 0
    assert base.probabilities != tuned.probabilities


def test_without_adapter_only_the_base_side_answers_and_says_why(tiny_model_dir, tmp_path):
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter="none", quantization="none"))
    final = list(stream_comparison(engine, _limits(tmp_path), QUESTION, "", SETTINGS))[-1]
    assert [s.variant for s in final.sides] == ["base"]
    assert any("Only the base model" in n for n in final.notices)
    with pytest.raises(UserInputError, match="type a question"):
        list(stream_comparison(engine, _limits(tmp_path), " ", "", SETTINGS))


def test_votes_are_appended_and_summarised(tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    log.append("fine-tuned better", {"question": "q1"})
    log.append("tie", {"question": "q2"})
    log.append("fine-tuned better", {"question": "q3"})
    with (tmp_path / "votes.jsonl").open("a") as handle:
        handle.write("{damaged line\n")
    assert log.summary() == {"base better": 0, "fine-tuned better": 2, "tie": 1, "both bad": 0}
    lines = (tmp_path / "votes.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["question"] == "q1" and "timestamp" in json.loads(lines[0])
    with pytest.raises(VoteError, match="Unknown vote"):
        log.append("meh", {})


def test_unwritable_vote_file_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(VoteError, match="could not be saved"):
        VoteLog(blocker / "votes.jsonl").append("tie", {})


def test_compare_api_returns_both_answers_and_their_metadata(each_engine, tmp_path):
    from gradio_client import Client

    with serving(build_app(each_engine, _limits(tmp_path))) as url:
        result = Client(url, verbose=False).predict(question=QUESTION, max_new_tokens=10, api_name="/compare")
    expected = list(stream_comparison(each_engine, _limits(tmp_path), QUESTION, "", SETTINGS))[-1]
    assert result["base"]["answer"] == expected.sides[0].answer
    assert result["fine-tuned"]["answer"] == expected.sides[1].answer
    assert set(result["base"]) >= {"decision", "probabilities", "ttft_s", "tokens_per_s", "n_tokens"}
