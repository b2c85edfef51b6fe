"""The yes/no/maybe decision by option likelihood: how likely the model finds each answer option right after the
shared prompt. Used by training (dev accuracy), evaluation and the app.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from app.prompts import ANSWER_OPTIONS, answer_prefix, encode_prompt


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
            logprobs = _next_token_logprobs(model, tokenizer, batch, names, device)
            scores = logprobs[:, [ids[0] for ids in options]]
        else:
            scores = torch.stack(
                [_continuation_logprob(model, tokenizer, batch, ids, names, device) for ids in options], dim=1
            )
        probs = torch.softmax(scores.float(), dim=1)
        results += [dict(zip(ANSWER_OPTIONS, row.tolist())) for row in probs]
    return results


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


def _next_token_logprobs(model, tokenizer, batch, names, device) -> torch.Tensor:
    ids, mask = left_pad(tokenizer, batch, device)
    return torch.log_softmax(_forward(model, ids, mask, 1, names)[:, -1, :].float(), dim=-1)


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
