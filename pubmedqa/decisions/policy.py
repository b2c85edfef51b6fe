"""The decision policy of an adapter: how the fine-tuned variant's yes/no/maybe is decided, whatever engine runs it.

An adapter may ship a decision probe (``probe.py``: a regression on the base model's hidden states) and a decision
calibration (``calibration.py``: per-option offsets). :class:`DecisionPolicy` is built once from the adapter folder
and is the only code that applies either. An engine hands it what it read off one forward pass over a batch of
prompts, the answer options' scores at the last position and, when the policy asks for them
(:attr:`DecisionPolicy.feature_layer`), the probe's features, and gets back:

- the decision probabilities of every row (:meth:`DecisionPolicy.decide`), base rows from their own option scores;
- for generation, one first-step logits processor (:class:`FirstStepDecision`) that opens each fine-tuned answer with
  the policy's decision and records every row's decision, so an answer and its decision need one pass, not two.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from pubmedqa.adapter import PROBE_FILE, Adapter
from pubmedqa.decisions.calibration import DecisionCalibration, load_calibration
from pubmedqa.decisions.options import option_probabilities
from pubmedqa.decisions.policy_files import engine_file
from pubmedqa.decisions.probe import DecisionProbe, ProbeError, load_probe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecisionPolicy:
    probe: DecisionProbe | None = None
    calibration: DecisionCalibration | None = None

    @classmethod
    def from_adapter(
        cls, adapter: Adapter | None, engine: str | None = None, reads_hidden_states: bool = True
    ) -> DecisionPolicy:
        """The policy ``adapter`` ships for ``engine``: the probe fitted on that engine's
        features and its offsets when the adapter has them, else the shared pair (``policy_files.py``); an empty
        policy for no adapter. A missing or broken file is logged and left out: the adapter keeps serving on its own
        option scores. An engine that cannot read hidden states (``reads_hidden_states=False``) gets neither the
        probe nor the offsets fitted for its scores."""
        if adapter is None:
            return cls()
        own_probe = load_probe(adapter, engine) if engine_file(PROBE_FILE, engine) != PROBE_FILE else None
        if own_probe is not None:
            return cls(own_probe, load_calibration(adapter, engine))
        policy = cls(load_probe(adapter), load_calibration(adapter))
        if policy.probe is not None and not reads_hidden_states:
            return policy.without_probe(
                "this engine cannot read hidden states; fit offsets for its own scores with `python -m "
                "scripts.calibrate` on a copy of the adapter without its probe"
            )
        return policy

    def without_probe(self, reason: str) -> DecisionPolicy:
        """This policy with neither its probe nor the offsets that were fitted on the probe's scores, logged."""
        logger.warning("Ignoring the adapter's decision probe and its calibration: %s", reason)
        return DecisionPolicy()

    def checked(self, num_layers: int, hidden_size: int, single_token_options: bool) -> DecisionPolicy:
        """This policy, or :meth:`without_probe` when its probe cannot run on a model of this shape."""
        if self.probe is None:
            return self
        try:
            self.probe.check(num_layers, hidden_size)
            if not single_token_options:
                raise ProbeError("the answer options are not one token each in this tokenizer")
        except ProbeError as exc:
            return self.without_probe(str(exc))
        return self

    @property
    def feature_layer(self) -> int | None:
        """The layer whose pooled output the engine must hand over for fine-tuned rows (None: no features needed)."""
        return self.probe.layer if self.probe is not None else None

    def option_logits(
        self, option_scores: torch.Tensor, tuned: Sequence[bool], features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The decision logits (rows x options): each row's option scores (log-likelihoods, or next-token logits for
        one-token options); in fine-tuned rows, the probe's distribution scaled to the options' total probability,
        then the calibration's offsets."""
        rows = torch.tensor(list(tuned), dtype=torch.bool, device=option_scores.device).unsqueeze(1)
        logits = option_scores.float()
        if self.probe is not None and bool(rows.any()):
            if features is None:
                raise RuntimeError("the decision probe needs the engine's features of this batch")
            probed = torch.logsumexp(logits, dim=1, keepdim=True) + torch.log_softmax(self.probe.logits(features), dim=1)
            logits = torch.where(rows, probed.to(logits.device), logits)
        if self.calibration is not None:
            logits = self.calibration.shift(logits, rows)
        return logits

    def decide(
        self, option_scores: torch.Tensor, tuned: Sequence[bool], features: torch.Tensor | None = None
    ) -> list[dict[str, float]]:
        """Each row's yes/no/maybe probabilities (see :meth:`option_logits`): what engines return."""
        return option_probabilities(self.option_logits(option_scores, tuned, features))

    def without_offsets(self, decisions: Sequence[dict[str, float]], tuned: Sequence[bool]) -> list[dict[str, float]]:
        """Decisions as :meth:`decide` gave them, with the calibration's offsets taken off the fine-tuned rows again:
        what the adapter decides on its own (the evaluation reports both; offsets are fitted on these)."""
        if self.calibration is None:
            return list(decisions)
        raw = self.calibration.apply(decisions, sign=-1)
        return [r if t else dict(d) for r, d, t in zip(raw, decisions, tuned)]

    def first_step(
        self, option_columns: Sequence[int], tuned: Sequence[bool], features: Callable[[], torch.Tensor] | None = None
    ) -> FirstStepDecision:
        """The logits processor of one generation over rows ``tuned``; ``features`` returns the probe's features of
        the pass over the prompts (needed when :attr:`feature_layer` is set and a row is fine-tuned)."""
        return FirstStepDecision(self, list(option_columns), list(tuned), features)

    def status(self) -> str:
        """What decides the fine-tuned answers, for the status line ('' when the adapter's own scores do)."""
        parts = []
        if self.probe is not None:
            cv = self.probe.details.get("cross_validated") or {}
            auc = cv.get("pairwise_auc")
            quality = f", cross-validated pairwise AUC {auc:.3f}" if isinstance(auc, float) and math.isfinite(auc) else ""
            parts.append("the fine-tuned yes/no/maybe is chosen by a small classifier reading the model's internal "
                         f"state (decision probe on layer {self.probe.layer}{quality})")
        if self.calibration is not None:
            parts.append(f"decisions calibrated on {self.calibration.fitted_on or 'dev'}")
        return ", ".join(parts)

    def record(self) -> dict[str, Any]:
        """How the fine-tuned decisions were made, as an evaluation run records it."""
        calibration, probe = self.calibration, self.probe
        return {
            "decision_calibration": (
                {"model": "tuned", "log_offsets": calibration.log_offsets, "fitted_on": calibration.fitted_on}
                if calibration is not None else None
            ),
            "decision_probe": (
                {"layer": probe.layer, **{k: probe.details.get(k) for k in ("fitted_on", "l2", "cross_validated")}}
                if probe is not None else None
            ),
        }


class FirstStepDecision:
    """A ``generate`` logits processor. At the first step, right after the prompt, it keeps every row's option scores
    (the decision comes out of the generation's own pass) and gives the fine-tuned rows' options the policy's decision
    logits, so each answer opens with the decision the app shows; later steps pass through. It must see the model's
    own logits at the first step: greedy decoding, no repetition penalty or token bias."""

    def __init__(
        self, policy: DecisionPolicy, columns: list[int], tuned: list[bool], features: Callable[[], torch.Tensor] | None
    ):
        self.policy, self.columns, self.tuned, self._read_features = policy, columns, tuned, features
        self.option_scores: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.option_scores is not None:
            return scores
        self.option_scores = scores[:, self.columns].detach().float().clone()
        if self.policy.feature_layer is not None and any(self.tuned) and self._read_features is not None:
            self.features = self._read_features()
        decided = self.policy.option_logits(self.option_scores, self.tuned, self.features)
        out = scores.clone()
        out[:, self.columns] = decided.to(scores.dtype)
        return out

    def decisions(self) -> list[dict[str, float]]:
        """Every row's decision probabilities, as :meth:`DecisionPolicy.decide` gives them for this pass."""
        if self.option_scores is None:
            raise RuntimeError("generation produced no step: no option scores were recorded")
        return self.policy.decide(self.option_scores, self.tuned, self.features)
