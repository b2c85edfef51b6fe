"""The decision probe: the fine-tuned variant's yes/no/maybe read off the base model's own hidden states.

Why: tuned on 450 questions, a small model's yes/no/maybe logits barely rank unseen questions (Gemma 3 270M: pairwise
AUC about 0.51 on test), while a regularised logistic regression on its middle layers' hidden states does better.
The probe is that regression. Training puts LoRA only on the decoder layers above the probe's depth (``python -m
scripts.train --probe_depth``), so the hidden states the probe reads are the base model's for every row of a
batch, base or fine-tuned: no training label has shaped them, which lets the probe be cross-validated honestly on
all 500 non-test questions (see ``scripts/decision_probe.py``), and it costs no extra pass, the answer's own
forward pass computes them.

How an engine applies it is the decision policy's (``policy.py``); this module is the probe itself and its file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pubmedqa.adapter import PROBE_FILE, Adapter
from pubmedqa.decisions.policy_files import engine_file
from pubmedqa.prompts import ANSWER_OPTIONS

logger = logging.getLogger(__name__)


#: What a probe reads of its layer's output over the prompt: the mean over the tokens, or that mean followed by the
#: prompt's last token (chosen by nested cross-validation on the non-test questions; see ``scripts/decision_probe.py``).
#: Every engine hands over both, as one row of ``[mean | last]`` (:func:`pooled_features`); the probe takes its part.
POOLINGS = ("mean", "mean+last")


def pooled_features(mean: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """An engine's probe features (rows x 2 * hidden size): each row's mean hidden state, then its last token's."""
    return torch.cat([mean.float(), last.float()], dim=-1)


def pooled_part(features: Any, pooling: str) -> Any:
    """The columns of engine features (``[mean | last]``, a tensor or an array) that a ``pooling`` probe reads."""
    return features if pooling == "mean+last" else features[:, : features.shape[1] // 2]


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


@dataclass
class DecisionProbe:
    layer: int  # the probe reads the output of decoder layer ``layer - 1`` over the prompt's tokens (``pooling``)
    weight: torch.Tensor  # options x features (the hidden size, twice for mean+last)
    bias: torch.Tensor  # options
    details: dict[str, Any] = field(default_factory=dict)  # how it was fitted (L2, cross-validated metrics)
    pooling: str = "mean"  # one of POOLINGS

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Option logits (rows x options, float32) of an engine's features (rows x 2 * hidden size, see
        :func:`pooled_features`)."""
        used = pooled_part(features, self.pooling)
        return used.float() @ self.weight.T.to(used.device) + self.bias.to(used.device)

    def save(self, directory: str | Path, engine: str | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / engine_file(PROBE_FILE, engine)
        metadata = {
            "layer": str(self.layer), "pooling": self.pooling, "options": json.dumps(ANSWER_OPTIONS),
            "details": json.dumps(self.details),
        }
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
            pooling = metadata.get("pooling", "mean")  # probes saved before there was a choice
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ProbeError(f"{path} is not a decision probe ({type(exc).__name__}: {exc})") from exc
        if options != list(ANSWER_OPTIONS) or weight.ndim != 2 or weight.shape[0] != len(ANSWER_OPTIONS) or bias.shape != (len(ANSWER_OPTIONS),):
            raise ProbeError(f"{path}: expected a {len(ANSWER_OPTIONS)}-option probe for {', '.join(ANSWER_OPTIONS)}")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ProbeError(f"{path}: the probe's weights are not finite")
        if pooling not in POOLINGS:
            raise ProbeError(f"{path}: unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        return cls(layer, weight.float(), bias.float(), details, pooling)

    def check(self, num_layers: int, hidden_size: int) -> None:
        """Refuse a probe fitted for another model shape (layer count or hidden size)."""
        parts = len(self.pooling.split("+"))
        if not 1 <= self.layer < num_layers or self.weight.shape[1] != parts * hidden_size:
            raise ProbeError(
                f"the probe reads layer {self.layer} with {self.weight.shape[1]} features ({self.pooling}); this model "
                f"has {num_layers} layers of {hidden_size}"
            )


def load_probe(adapter: Adapter, engine: str | None = None) -> DecisionProbe | None:
    """The probe shipped with ``adapter`` for ``engine`` (None: the shared one; see
    ``policy_files.py``), or None when it has none or it is unusable — decisions then come from the adapter's own
    option logits, which is logged."""
    try:
        path = adapter.file(engine_file(PROBE_FILE, engine))
        return DecisionProbe.load(path) if path is not None else None
    except Exception as exc:  # noqa: BLE001 - a missing or broken probe must never stop the adapter
        logger.warning("Ignoring the adapter's decision probe: %s", exc)
        return None
