"""Option-likelihood scoring of yes/no/maybe, checked against a naive full-logits computation."""

from __future__ import annotations

import pytest
import torch

import pubmedqa.engines.transformers_passes as scoring
from pubmedqa.engines.transformers_engine import ADAPTER_NAME, BASE_ADAPTER_NAME
from pubmedqa.prompts import ANSWER_OPTIONS, PromptInput, encode_prompt, render_prompt

QUESTIONS = ["Does aspirin help?", "Is ultrasound equal to X-ray in pediatric fracture diagnosis?", "Do moles exist?"]


def _naive(model, tokenizer, prompt: str, options: list[list[int]]) -> list[float]:
    scores = []
    for ids in options:
        full = torch.tensor([encode_prompt(prompt, tokenizer) + ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0].float(), dim=-1)
        n = len(ids)
        scores.append(sum(logprobs[full.shape[1] - n - 1 + i, tok].item() for i, tok in enumerate(ids)))
    return torch.softmax(torch.tensor(scores), dim=0).tolist()


@pytest.fixture
def loaded(tiny_engine):
    return tiny_engine.load()


def test_batched_scores_match_one_prompt_at_a_time_full_logits(loaded):
    prompts = [render_prompt(PromptInput(q), loaded.tokenizer) for q in QUESTIONS]
    names = [BASE_ADAPTER_NAME] * len(prompts)
    batched = scoring.score_options(loaded.model, loaded.tokenizer, prompts, batch_size=3, adapter_names=names)
    options = scoring.option_token_ids(loaded.tokenizer)
    with loaded.model.disable_adapter():
        for prompt, got in zip(prompts, batched):
            assert [got[o] for o in ANSWER_OPTIONS] == pytest.approx(_naive(loaded.model, loaded.tokenizer, prompt, options), abs=1e-4)
    assert all(sum(p.values()) == pytest.approx(1.0) for p in batched)


def test_multi_token_options_are_scored_by_their_whole_likelihood(loaded, monkeypatch):
    prompts = [render_prompt(PromptInput(q), loaded.tokenizer) for q in QUESTIONS]
    options = [scoring.option_token_ids(loaded.tokenizer)[i] + [5 + i] for i in range(3)]
    monkeypatch.setattr(scoring, "option_token_ids", lambda tokenizer: options)
    names = [BASE_ADAPTER_NAME] * len(prompts)
    got = scoring.score_options(loaded.model, loaded.tokenizer, prompts, batch_size=2, adapter_names=names)
    with loaded.model.disable_adapter():
        for prompt, probs in zip(prompts, got):
            assert [probs[o] for o in ANSWER_OPTIONS] == pytest.approx(_naive(loaded.model, loaded.tokenizer, prompt, options), abs=1e-4)


def test_adapter_rows_and_base_rows_are_scored_in_one_batch(loaded):
    prompt = render_prompt(PromptInput(QUESTIONS[0]), loaded.tokenizer)
    mixed = scoring.score_options(loaded.model, loaded.tokenizer, [prompt, prompt], adapter_names=[BASE_ADAPTER_NAME, ADAPTER_NAME])
    base = scoring.score_options(loaded.model, loaded.tokenizer, [prompt], adapter_names=[BASE_ADAPTER_NAME])
    tuned = scoring.score_options(loaded.model, loaded.tokenizer, [prompt], adapter_names=[ADAPTER_NAME])
    assert mixed[0] == pytest.approx(base[0], abs=1e-5) and mixed[1] == pytest.approx(tuned[0], abs=1e-5)
    assert mixed[0] != pytest.approx(mixed[1], abs=1e-5)
