"""The yes/no/maybe decision by option likelihood: how likely the model finds each answer option right after the
shared prompt. Used by training (dev accuracy), evaluation and the app.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from pubmedqa.prompts import ANSWER_OPTIONS, answer_prefix, encode_prompt


def option_token_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of each answer option as it follows the prompt (e.g. " yes" after "Answer:")."""
    prefix = answer_prefix(tokenizer)
    return [tokenizer(prefix + option, add_special_tokens=False)["input_ids"] for option in ANSWER_OPTIONS]


@torch.inference_mode()
def score_options(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 8,
    adapter_names: Sequence[str] | None = None,
) -> list[dict[str, float]]:
    """For each rendered prompt, the probability of each answer option, normalised over the options.

    Options are scored by their full log-likelihood. When every option is one token (Gemma, Llama), one forward
    pass per batch with ``logits_to_keep=1`` is enough: the full-vocabulary logits of every position would take
    gigabytes for a 262k vocabulary.
    """
    options = option_token_ids(tokenizer)
    single_token = all(len(ids) == 1 for ids in options)
    device = model.get_input_embeddings().weight.device
    results: list[dict[str, float]] = []
    for start in range(0, len(prompts), batch_size):
        batch = [encode_prompt(p, tokenizer) for p in prompts[start : start + batch_size]]
        names = list(adapter_names[start : start + batch_size]) if adapter_names is not None else None
        if single_token:
            ids, mask = left_pad(tokenizer, batch, device)
            results += option_probabilities(_forward(model, ids, mask, 1, names)[:, -1, [o[0] for o in options]])
        else:
            scores = [_continuation_logprob(model, tokenizer, batch, ids, names, device) for ids in options]
            results += option_probabilities(torch.stack(scores, dim=1))
    return results


def single_token_options(tokenizer: Any) -> list[list[int]] | None:
    """The options' token ids when each is one token (Gemma, Llama), else None."""
    options = option_token_ids(tokenizer)
    return options if all(len(ids) == 1 for ids in options) else None


def option_probabilities(option_scores: torch.Tensor) -> list[dict[str, float]]:
    """Normalise each row of option log-likelihoods (or, for single-token options, their next-token logits: the
    softmax is the same) into the options' probabilities."""
    probs = torch.softmax(option_scores.float(), dim=1)
    return [dict(zip(ANSWER_OPTIONS, row.tolist())) for row in probs]


class FirstStepOptionOffsets:
    """A ``generate`` logits processor that adds the decision calibration's offsets to the answer options' logits
    at the first step, in the given rows: the answer text then starts with the decision the app shows (the option
    with the highest calibrated score) instead of the uncalibrated one."""

    def __init__(self, options: list[list[int]], offsets: Sequence[float], rows: Sequence[bool]):
        self.columns = [ids[0] for ids in options]
        self.offsets, self.rows = list(offsets), list(rows)
        self.done = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.done:
            return scores
        self.done = True
        shift = torch.zeros_like(scores)
        rows = torch.tensor(self.rows, device=scores.device)
        shift[:, self.columns] = torch.tensor(self.offsets, dtype=scores.dtype, device=scores.device)
        return scores + shift * rows.unsqueeze(1)


class FirstStepOptionScores:
    """A ``generate`` logits processor that keeps the next-token logits of the answer options at the first step,
    i.e. right after the prompt: the decision comes out of the generation's own pass over the prompt instead of a
    second one. It sees the logits after ``generate``'s own processors; see :func:`first_step_logits_are_raw`."""

    def __init__(self, options: list[list[int]]):
        self.options = options
        self.logits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = scores.detach().clone()[:, [ids[0] for ids in self.options]]
        return scores

    def probabilities(self) -> list[dict[str, float]]:
        if self.logits is None:
            raise RuntimeError("generation produced no step: no option scores were recorded")
        return option_probabilities(self.logits)


# generation_config settings under which greedy decoding changes the first step's logits of individual tokens
_FIRST_STEP_PROCESSORS = (
    "sequence_bias", "bad_words_ids", "no_repeat_ngram_size", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id",
)


def first_step_logits_are_raw(generation_config: Any) -> bool:
    """Whether greedy ``generate`` hands a logits processor the model's own logits at the first step (no
    repetition penalty, token bias or suppression configured), so option scores read there are exact."""
    penalty = getattr(generation_config, "repetition_penalty", None)
    return penalty in (None, 1.0) and not any(getattr(generation_config, k, None) for k in _FIRST_STEP_PROCESSORS)


def left_pad(tokenizer: Any, sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch (ids, attention mask): the last position is every row's last token."""
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int, names: list[str] | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep}
    if names is not None:
        kwargs["adapter_names"] = names
    return model(**kwargs).logits


def _continuation_logprob(model, tokenizer, batch, option_ids, names, device) -> torch.Tensor:
    ids, mask = left_pad(tokenizer, [p + option_ids for p in batch], device)
    n = len(option_ids)
    # The logits at positions -n-1 .. -2 predict the option's n tokens.
    logits = _forward(model, ids, mask, n + 1, names)[:, :-1, :].float()
    target = torch.tensor(option_ids, device=device).expand(len(batch), n)
    return torch.log_softmax(logits, dim=-1).gather(2, target.unsqueeze(-1)).squeeze(-1).sum(dim=1)


@torch.inference_mode()
def text_logprobs(
    model: Any, tokenizer: Any, text: str, adapter_names: Sequence[str] | None = None, top: int = 0, tail: int = 16
) -> tuple[list[tuple[str, int, float | None]], dict[str, float]]:
    """Each token of ``text`` as (token text, character offset, log-probability given the tokens before it), and the
    ``top`` most likely next tokens with their log-probabilities. Only the last ``tail`` tokens are scored (None
    before them, and for the first token): scoring every position would run the 262k-vocabulary output layer over
    the whole prompt, and answer options are scored at the end."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    device = model.get_input_embeddings().weight.device
    batch = torch.tensor([ids], device=device)
    keep = min(tail, len(ids) - 1) + 1
    logprobs = torch.log_softmax(_forward(model, batch, torch.ones_like(batch), keep, adapter_names)[0].float(), dim=-1)
    first_scored = len(ids) - keep + 1  # logits row r predicts token first_scored + r
    rows = []
    for i, (token_id, (start, _)) in enumerate(zip(ids, encoding["offset_mapping"])):
        value = logprobs[i - first_scored, token_id].item() if i >= first_scored else None
        rows.append((tokenizer.decode([token_id]), start, value))
    best = torch.topk(logprobs[-1], top) if top else None
    following = {tokenizer.decode([i]): v for v, i in zip(best.values.tolist(), best.indices.tolist())} if best else {}
    return rows, following


def predicted_decision(probabilities: dict[str, float]) -> str:
    return max(probabilities, key=probabilities.get)
