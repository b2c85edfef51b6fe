"""Forward passes of a transformers model for the decision: option scores at the last position (``logits_to_keep``),
the decision probe's features read by a hook in the same pass, and token log-probabilities. Used by the transformers
engine and by training (dev scoring, probe features)."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from pubmedqa.decisions.options import option_probabilities, option_token_ids
from pubmedqa.decisions.probe import ProbeError, pooled_features
from pubmedqa.prompts import encode_prompt


@torch.inference_mode()
def option_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 8,
    adapter_names: Sequence[str] | None = None,
    feature_layer: int | None = None,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The answer options' scores after each rendered prompt (rows x options), and, with ``feature_layer``, the
    decision probe's features read in the same passes (rows x 2 hidden size; see :class:`ProbeReader`).

    Options are scored by their full log-likelihood. When every option is one token (Gemma, Llama), one forward
    pass per batch with ``logits_to_keep=1`` is enough, and the scores are the next-token logits (the same softmax
    over the options): the full-vocabulary logits of every position would take gigabytes for a 262k vocabulary.
    Prompts are batched by length (less padding); results come back in the prompts' order. ``desc``: a progress bar.
    """
    options = option_token_ids(tokenizer)
    single_token = all(len(ids) == 1 for ids in options)
    if feature_layer is not None and not single_token:
        raise ValueError("the decision probe's features are read with one-token answer options only")
    device = model.get_input_embeddings().weight.device
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    scores = torch.zeros(len(prompts), len(options))
    features: torch.Tensor | None = None
    reader = ProbeReader(model, feature_layer) if feature_layer is not None else contextlib.nullcontext()
    with reader:
        for rows in tqdm(batches, desc=desc, unit="batch", disable=desc is None):
            batch = [encoded[i] for i in rows]
            names = [adapter_names[i] for i in rows] if adapter_names is not None else None
            if single_token:
                ids, mask = left_pad(tokenizer, batch, device)
                scores[rows] = _forward(model, ids, mask, 1, names)[:, -1, [o[0] for o in options]].float().cpu()
            else:
                columns = [_continuation_logprob(model, tokenizer, batch, ids, names, device) for ids in options]
                scores[rows] = torch.stack(columns, dim=1).cpu()
            if feature_layer is not None:
                pooled = reader.pooled.pop().cpu()
                features = features if features is not None else torch.zeros(len(prompts), pooled.shape[1])
                features[rows] = pooled
    return scores, features


def score_options(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 8, adapter_names: Sequence[str] | None = None
) -> list[dict[str, float]]:
    """For each rendered prompt, the probability of each answer option, normalised over the options (the model's
    own decision, before any decision policy)."""
    return option_probabilities(option_scores(model, tokenizer, prompts, batch_size, adapter_names)[0])


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


@torch.inference_mode()
def score_ids(
    model: Any, ids: Sequence[int], adapter_names: Sequence[str] | None, top: int, chunk: int = 256
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """``ids`` scored in one forward pass (:meth:`Engine.score_tokens`), its output rows normalised ``chunk`` at a
    time (:func:`score_rows`)."""
    from pubmedqa.engines.base import score_rows

    device = model.get_input_embeddings().weight.device
    batch = torch.tensor([list(ids)], device=device)
    rows = _forward(model, batch, torch.ones_like(batch), len(ids), list(adapter_names) if adapter_names else None)[0]
    logprobs: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    for start in range(0, len(ids), chunk):
        part_logprobs, part_tops = score_rows(rows[start : start + chunk], ids[start + 1 : start + 1 + chunk], top)
        logprobs += part_logprobs
        tops += part_tops
    return logprobs, tops


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder's layer list of a transformers causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ProbeError(f"{type(base).__name__} has no decoder layer list for a decision probe to read")
    return layers


class ProbeReader:
    """While active (``with``), keeps a probe's features of every forward pass of ``model``: the output of decoder
    layer ``layer - 1``, averaged over each row's real tokens (the attention mask, so left padding is left out), then
    its last real token's (``pooled_features``).
    ``pooled[0]`` is a generation's pass over the prompts."""

    def __init__(self, model: Any, layer: int):
        self.model, self.layer = model, layer
        self.pooled: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> ProbeReader:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._hooks = [
            base.get_decoder().register_forward_pre_hook(self._keep_mask, with_kwargs=True),
            decoder_layers(self.model)[self.layer - 1].register_forward_hook(self._pool),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()

    def _keep_mask(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def _pool(self, module: Any, inputs: Any, output: Any) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).float()
        if self._mask is None:
            self.pooled.append(pooled_features(hidden.mean(dim=1), hidden[:, -1]))
            return
        mask = self._mask[:, -hidden.shape[1] :].to(hidden.dtype)  # the new positions' mask
        mean = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        last = hidden.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # each row's last real token, whatever the padding side
        self.pooled.append(pooled_features(mean, hidden[torch.arange(hidden.shape[0]), last]))
