"""The answer options as a model sees them: their token ids after the shared prompt, and the decision that option
scores make. Engine-agnostic: every engine and the training code score options through these."""

from __future__ import annotations

from typing import Any

import torch

from pubmedqa.prompts import ANSWER_OPTIONS, answer_prefix


def option_token_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of each answer option as it follows the prompt (e.g. " yes" after "Answer:")."""
    prefix = answer_prefix(tokenizer)
    return [tokenizer(prefix + option, add_special_tokens=False)["input_ids"] for option in ANSWER_OPTIONS]



def single_token_options(tokenizer: Any) -> list[list[int]] | None:
    """The options' token ids when each is one token (Gemma, Llama), else None."""
    options = option_token_ids(tokenizer)
    return options if all(len(ids) == 1 for ids in options) else None



def option_probabilities(option_scores: torch.Tensor) -> list[dict[str, float]]:
    """Normalise each row of option log-likelihoods (or, for single-token options, their next-token logits: the
    softmax is the same) into the options' probabilities."""
    probs = torch.softmax(option_scores.float(), dim=1)
    return [dict(zip(ANSWER_OPTIONS, row.tolist())) for row in probs]



def predicted_decision(probabilities: dict[str, float]) -> str:
    return max(probabilities, key=probabilities.get)
