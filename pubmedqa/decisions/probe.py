"""The decision probe: the fine-tuned variant's yes/no/maybe read off the base model's own hidden states.

Why: tuned on 450 questions, a small model's yes/no/maybe logits barely rank unseen questions (Gemma 3 270M: pairwise
AUC about 0.51 on test), while a regularised logistic regression on its middle layers' hidden states does better.
The probe is that regression. Training puts LoRA only on the decoder layers above the probe's depth (``python -m
training.train --probe_depth``), so the hidden states the probe reads are the base model's for every row of a
batch, base or fine-tuned: no training label has shaped them, which lets the probe be cross-validated honestly on
all 500 non-test questions (see ``training/decision_probe.py``), and it costs no extra pass, the answer's own
forward pass computes them.

At generation, the fine-tuned rows' answer options get the probe's distribution at the first step (their total
probability is kept), so the answer starts with the probe's decision and the first-step capture reads it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from pubmedqa.prompts import ANSWER_OPTIONS

logger = logging.getLogger(__name__)

PROBE_FILE = "decision_probe.safetensors"


class ProbeError(ValueError):
    """A probe file that cannot be used with this model."""


def probe_layer(num_layers: int, depth: float) -> int | None:
    """How many decoder layers lie below the probe at ``depth`` (a fraction of the model's layers), at least one and
    at most all but one; None for depth 0 (no probe)."""
    if not 0 <= depth < 1:
        raise ValueError(f"probe depth must be in [0, 1), got {depth}")
    if depth == 0:
        return None
    return min(max(round(depth * num_layers), 1), num_layers - 1)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder's layer list of a transformers causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ProbeError(f"{type(base).__name__} has no decoder layer list for a decision probe to read")
    return layers


@dataclass
class DecisionProbe:
    layer: int  # the probe reads the output of decoder layer ``layer - 1``, averaged over the prompt's tokens
    weight: torch.Tensor  # options x hidden size
    bias: torch.Tensor  # options
    details: dict[str, Any] = field(default_factory=dict)  # how it was fitted (L2, cross-validated metrics)

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Option logits (rows x options, float32) of mean-pooled hidden states (rows x hidden size)."""
        return pooled.float() @ self.weight.T.to(pooled.device) + self.bias.to(pooled.device)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / PROBE_FILE
        metadata = {"layer": str(self.layer), "options": json.dumps(ANSWER_OPTIONS), "details": json.dumps(self.details)}
        save_file({"weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous()}, str(path), metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DecisionProbe:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
            layer = int(metadata["layer"])
            options = json.loads(metadata.get("options", "null"))
            details = json.loads(metadata.get("details", "{}"))
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ProbeError(f"{path} is not a decision probe ({type(exc).__name__}: {exc})") from exc
        if options != list(ANSWER_OPTIONS) or weight.ndim != 2 or weight.shape[0] != len(ANSWER_OPTIONS) or bias.shape != (len(ANSWER_OPTIONS),):
            raise ProbeError(f"{path}: expected a {len(ANSWER_OPTIONS)}-option probe for {', '.join(ANSWER_OPTIONS)}")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ProbeError(f"{path}: the probe's weights are not finite")
        return cls(layer, weight.float(), bias.float(), details)

    def check(self, model: Any) -> None:
        """Refuse a probe fitted for another model shape (layer count or hidden size)."""
        layers = decoder_layers(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if not 1 <= self.layer < len(layers) or self.weight.shape[1] != hidden:
            raise ProbeError(
                f"the probe reads layer {self.layer} with {self.weight.shape[1]} features; this model has "
                f"{len(layers)} layers of {hidden}"
            )


def load_probe(adapter_source: str) -> DecisionProbe | None:
    """The probe shipped with an adapter (a folder or a Hub repo), or None when it has none or it is unusable —
    decisions then come from the adapter's own option logits, which is logged."""
    local = Path(adapter_source).expanduser()
    try:
        if local.is_dir():
            path = local / PROBE_FILE
            return DecisionProbe.load(path) if path.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return DecisionProbe.load(hf_hub_download(adapter_source, PROBE_FILE))
        except EntryNotFoundError:
            return None
    except Exception as exc:  # noqa: BLE001 - a missing or broken probe must never stop the adapter
        logger.warning("Ignoring the adapter's decision probe: %s", exc)
        return None


class ProbeReader:
    """While active (``with``), keeps a probe's features of every forward pass of ``model``: the output of decoder
    layer ``layer - 1``, averaged over each row's real tokens (the attention mask, so left padding is left out).
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
            self.pooled.append(hidden.mean(dim=1))
            return
        mask = self._mask[:, -hidden.shape[1] :].to(hidden.dtype).unsqueeze(-1)  # the new positions' mask
        self.pooled.append((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))


def replace_option_scores(scores: torch.Tensor, columns: Sequence[int], probe_logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``scores`` with the option columns of the selected rows replaced by the probe's distribution, scaled to the
    options' total probability there (so every other token keeps its probability)."""
    options = scores[:, columns].float()
    replaced = torch.logsumexp(options, dim=1, keepdim=True) + torch.log_softmax(probe_logits.float(), dim=1)
    out = scores.clone()
    out[:, columns] = torch.where(rows.unsqueeze(1), replaced.to(scores.dtype), scores[:, columns])
    return out


class FirstStepProbeDecision:
    """A ``generate`` logits processor: at the first step, the fine-tuned rows' answer options take the probe's
    distribution (see :func:`replace_option_scores`); later steps pass through."""

    def __init__(self, probe: DecisionProbe, reader: ProbeReader, options: list[list[int]], rows: Sequence[bool]):
        self.probe, self.reader, self.columns, self.rows = probe, reader, [ids[0] for ids in options], list(rows)
        self.done = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.done:
            return scores
        self.done = True
        rows = torch.tensor(self.rows, device=scores.device)
        if not self.reader.pooled:
            raise RuntimeError("the model made no forward pass for the decision probe to read")
        return replace_option_scores(scores, self.columns, self.probe.logits(self.reader.pooled[0]), rows)


def probe_summary(probe: DecisionProbe) -> str:
    """One line for the UI's status: what decides the fine-tuned variant's answers."""
    cv = probe.details.get("cross_validated") or {}
    auc = cv.get("pairwise_auc")
    quality = f", cross-validated pairwise AUC {auc:.3f}" if isinstance(auc, float) and math.isfinite(auc) else ""
    return f"decision probe on layer {probe.layer}{quality}"
