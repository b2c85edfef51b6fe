"""A linear decision head on top of a LoRA adapter, shipped inside the adapter as a rank-3 LoRA on the output layer.

    python -m training.decision_head --adapter outputs/adapter     # (re)fit the head of an existing adapter

Why: tuned on 450 questions, a small model's own yes/no/maybe logits barely rank unseen questions (Gemma 3 270M:
pairwise AUC about 0.53 on test), yet the hidden state those logits are read from holds more: a regularised
logistic regression on it does clearly better. So after supervised fine-tuning the answer options' output rows get
a logistic-regression correction fitted on the training questions:

    option logit_k = (output row_k + a_k) . h

``a_k`` are the rows of the LoRA A matrix of the output layer and B is one-hot on the three option tokens, so every
other token's logit, the long answers after the first token and the base model are untouched; PEFT loads, mixes
(``adapter_names``) and pushes it like any adapter. The regression's intercepts go into the decision calibration
(``decision_calibration.json``), fitted on dev after the head.

The L2 strength is chosen by dev pairwise AUC, not by cross-validation on train: the adapter has seen the training
labels, so on training questions its own logits look more reliable than they are, and cross-validation there
always prefers the weakest head.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from app.calibration import DecisionCalibration
from app.config import ModelSettings, parse_settings
from app.model_loading import ModelLoadError
from app.prompts import ANSWER_OPTIONS, encode_prompt, fit_prompt
from app.pubmedqa import DataFormatError, PubMedQARecord, SplitSettings
from app.registry import ModelRegistry
from app.scoring import left_pad, option_probabilities, single_token_options
from training.calibrate import fit_calibration
from training.metrics import pairwise_auc

logger = logging.getLogger("training.decision_head")

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # on standardised features, per mean cross-entropy
HEAD_RANK = len(ANSWER_OPTIONS)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class DecisionHeadError(ValueError):
    """The decision head cannot be fitted or attached."""


@dataclass
class DecisionFeatures:
    hidden: np.ndarray  # examples x hidden size: the output layer's input at each prompt's last position
    option_logits: np.ndarray  # examples x options: the model's own logits of the answer options there


@dataclass
class DecisionHead:
    weight: np.ndarray  # options x hidden size, applied to the raw hidden state
    bias: np.ndarray  # options; goes into the decision calibration
    l2: float
    dev_auc_by_l2: dict[str, float] = field(default_factory=dict)

    def option_logits(self, features: DecisionFeatures) -> np.ndarray:
        """The answer options' logits with the head, as the model will produce them once it is attached."""
        return features.option_logits + features.hidden @ self.weight.T

    def probabilities(self, features: DecisionFeatures) -> list[dict[str, float]]:
        """Option probabilities with the head and its intercepts."""
        return option_probabilities(torch.from_numpy(self.option_logits(features) + self.bias))


def output_layer_name(model: Any) -> str:
    """The module path of the output layer (``lm_head`` for Gemma and Llama) inside a transformers model."""
    layer = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is layer:
            return name.removeprefix("base_model.model.")
    raise DecisionHeadError("the model has no output layer to attach a decision head to")


@contextlib.contextmanager
def _without_existing_head(model: Any) -> Iterator[None]:
    """Collect features as if the adapter had no head yet (a refit replaces it, it does not stack on it)."""
    layer = model.get_output_embeddings()
    scaling = getattr(layer, "scaling", None)
    saved = dict(scaling) if isinstance(scaling, dict) else None
    if saved is not None:
        for name in scaling:
            scaling[name] = 0.0
    try:
        yield
    finally:
        if saved is not None:
            scaling.update(saved)


@torch.inference_mode()
def collect_features(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 8, description: str = "features"
) -> DecisionFeatures:
    """The output layer's input and the options' logits at the last position of each prompt (adapter on)."""
    options = single_token_options(tokenizer)
    if options is None:
        raise DecisionHeadError("a decision head needs answer options of one token each in this tokenizer")
    option_ids = [ids[0] for ids in options]
    layer = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0][:, -1].float()))
    device = model.get_input_embeddings().weight.device
    # Similar lengths together: less padding per batch.
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    hidden: list[np.ndarray | None] = [None] * len(prompts)
    logits: list[np.ndarray | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with _without_existing_head(model):
            for start in tqdm(range(0, len(order), batch_size), desc=description, unit="batch"):
                rows = order[start : start + batch_size]
                ids, mask = left_pad(tokenizer, [encoded[i] for i in rows], device)
                captured.clear()
                out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, option_ids].float()
                for j, i in enumerate(rows):
                    hidden[i] = captured[-1][j].cpu().numpy().astype(np.float64)
                    logits[i] = out[j].cpu().numpy().astype(np.float64)
    finally:
        hook.remove()
        if was_training:
            model.train()
    return DecisionFeatures(np.stack(hidden), np.stack(logits))


def fit_head(features: DecisionFeatures, gold: Sequence[str], l2: float) -> DecisionHead:
    """Multinomial logistic regression with the model's option logits as a fixed offset, L2-penalised, on
    standardised hidden states (folded back into raw-space weights and intercepts)."""
    mean, std = features.hidden.mean(axis=0), features.hidden.std(axis=0) + 1e-6
    x = torch.from_numpy((features.hidden - mean) / std)
    offset = torch.from_numpy(features.option_logits)
    target = torch.tensor([ANSWER_OPTIONS.index(g) for g in gold])
    weight = torch.zeros(len(ANSWER_OPTIONS), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(ANSWER_OPTIONS), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(offset + x @ weight.T + bias, target) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    raw_weight = weight.detach().numpy() / std
    raw_bias = bias.detach().numpy() - raw_weight @ mean
    return DecisionHead(raw_weight, raw_bias - raw_bias[0], l2)  # relative to "yes", like the calibration


def choose_head(
    train: DecisionFeatures, train_gold: Sequence[str], dev: DecisionFeatures, dev_gold: Sequence[str],
    grid: Sequence[float] = L2_GRID,
) -> DecisionHead:
    """Fit one head per L2 strength on train and keep the one with the best dev pairwise AUC (ties: the
    stronger penalty)."""
    if len(set(train_gold)) < 2:
        raise DecisionHeadError("the training questions need at least two different decisions to fit a head")
    heads = [fit_head(train, train_gold, l2) for l2 in grid]
    aucs = [pairwise_auc(head.probabilities(dev), list(dev_gold)) for head in heads]
    best = max(range(len(heads)), key=lambda i: (aucs[i], grid[i]))
    head = heads[best]
    head.dev_auc_by_l2 = {f"{l2:g}": round(auc, 4) for l2, auc in zip(grid, aucs)}
    own = pairwise_auc(option_probabilities(torch.from_numpy(dev.option_logits)), list(dev_gold))
    logger.info("Decision head: dev pairwise AUC %.3f without, %s with (by L2); keeping L2 = %g",
                own, head.dev_auc_by_l2, head.l2)
    return head


def calibrate_with_head(
    head: DecisionHead, dev: DecisionFeatures, dev_gold: Sequence[str], fitted_on: str, dev_offsets: bool = True
) -> DecisionCalibration:
    """The head's intercepts plus, with ``dev_offsets``, offsets fitted on dev on top of them: one calibration."""
    calibration = fit_calibration(head.probabilities(dev), dev_gold, fitted_on)
    if not dev_offsets:  # the intercepts alone
        before = calibration.details["before"]
        calibration = DecisionCalibration(dict.fromkeys(ANSWER_OPTIONS, 0.0), fitted_on, {"before": before, "after": before})
    offsets = {o: float(head.bias[k]) + calibration.log_offsets[o] for k, o in enumerate(ANSWER_OPTIONS)}
    details = {**calibration.details, "decision_head": head_summary(head)}
    return DecisionCalibration(offsets, fitted_on, details)


def attach_head(adapter_dir: str | Path, head: DecisionHead, option_ids: Sequence[int], layer_name: str, vocab_size: int) -> None:
    """Write the head into a saved adapter: a rank-3 LoRA on the output layer whose B matrix is one-hot on the
    option tokens, scaling 1. A head already there is replaced."""
    from safetensors.torch import load_file, save_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise DecisionHeadError(f"{adapter_dir} is not a saved LoRA adapter ({ADAPTER_WEIGHTS} + adapter_config.json)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise DecisionHeadError("a decision head can be added to a plain LoRA adapter only (not DoRA or other PEFT types)")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression: match the output layer too
        if not targets.endswith(f"|(.*\\.)?{layer_name}"):
            config["target_modules"] = f"(?:{targets})|(.*\\.)?{layer_name}"
    else:
        config["target_modules"] = sorted(set(targets) | {layer_name})
    config.setdefault("rank_pattern", {})[layer_name] = HEAD_RANK
    # scaling = alpha / r, or alpha / sqrt(r) with rsLoRA: make it 1.
    config.setdefault("alpha_pattern", {})[layer_name] = math.sqrt(HEAD_RANK) if config.get("use_rslora") else HEAD_RANK
    weights = load_file(str(weights_path))
    prefix = f"base_model.model.{layer_name}"
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    lora_b = torch.zeros(vocab_size, HEAD_RANK, dtype=dtype)
    for k, token_id in enumerate(option_ids):
        lora_b[token_id, k] = 1.0
    weights[f"{prefix}.lora_A.weight"] = torch.from_numpy(head.weight).to(dtype).contiguous()
    weights[f"{prefix}.lora_B.weight"] = lora_b
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def export_without_head(adapter_dir: str | Path, output_dir: str | Path, layer_name: str = "lm_head") -> Path:
    """A copy of the adapter without its decision head, for servers that do not load LoRA weights on the output
    layer (vLLM, TGI). Its decision calibration is left out, as it assumed the head: refit one with
    ``python -m training.calibrate --adapter OUTPUT``."""
    from safetensors.torch import load_file, save_file

    source, target = Path(adapter_dir), Path(output_dir)
    if not (source / ADAPTER_WEIGHTS).is_file():
        raise DecisionHeadError(f"{source} is not a saved LoRA adapter ({ADAPTER_WEIGHTS} + adapter_config.json)")
    if target.exists() and any(target.iterdir()):
        raise DecisionHeadError(f"{target} already exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    if isinstance(targets, str):
        config["target_modules"] = targets.removesuffix(f"|(.*\\.)?{layer_name}").removeprefix("(?:").removesuffix(")")
    else:
        config["target_modules"] = [t for t in targets or [] if t != layer_name]
    for pattern in ("rank_pattern", "alpha_pattern"):
        (config.get(pattern) or {}).pop(layer_name, None)
    prefix = f"base_model.model.{layer_name}."
    weights = {k: v for k, v in load_file(str(source / ADAPTER_WEIGHTS)).items() if not k.startswith(prefix)}
    save_file(weights, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("README.md", "training_args.json", "dev_metrics.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def head_summary(head: DecisionHead) -> dict[str, Any]:
    return {"l2": head.l2, "dev_auc_by_l2": head.dev_auc_by_l2, "intercepts": dict(zip(ANSWER_OPTIONS, head.bias.tolist()))}


def fit_and_attach(
    model: Any, tokenizer: Any, adapter_dir: str | Path, train: tuple[list[str], list[str]],
    dev: tuple[list[str], list[str]], fitted_on: str, batch_size: int = 8, dev_offsets: bool = True,
) -> tuple[DecisionCalibration, list[dict[str, float]]]:
    """Fit the head on the training prompts (with their gold decisions), pick its L2 on dev, write it into the
    saved adapter in ``adapter_dir`` with the calibration that goes with it (see :func:`calibrate_with_head`).
    Returns that calibration and the dev option probabilities with the head, before the dev offsets."""
    train_features = collect_features(model, tokenizer, train[0], batch_size, "decision head: train features")
    dev_features = collect_features(model, tokenizer, dev[0], batch_size, "decision head: dev features")
    head = choose_head(train_features, train[1], dev_features, dev[1])
    option_ids = [ids[0] for ids in single_token_options(tokenizer)]
    vocab_size = model.get_output_embeddings().weight.shape[0]
    attach_head(adapter_dir, head, option_ids, output_layer_name(model), vocab_size)
    calibration = calibrate_with_head(head, dev_features, dev[1], fitted_on, dev_offsets)
    calibration.save(adapter_dir)
    return calibration, head.probabilities(dev_features)


@dataclass
class HeadArguments(SplitSettings):
    batch_size: int = field(default=8, metadata={"help": "Questions per forward pass."})
    export_without_head: str = field(
        default="",
        metadata={"help": "Instead of fitting, copy --adapter without its head into this folder (for vLLM or TGI, "
                  "which do not load LoRA weights on the output layer)."},
    )


def fit_head_for_adapter(model_settings: ModelSettings, args: HeadArguments) -> DecisionCalibration:
    """The CLI: load base + adapter as the app does (same quantization), fit, attach, calibrate."""
    adapter_dir = Path(model_settings.adapter_source or "").expanduser()
    if not model_settings.adapter_source or not adapter_dir.is_dir():
        raise ValueError("--adapter must be a local adapter folder (the head is written into it)")
    split = args.load_split()
    registry = ModelRegistry(model_settings)
    loaded = registry.load()
    if not loaded.adapter_loaded:
        raise ModelLoadError(f"No head can be fitted: {registry.adapter_unavailable_reason()}")
    budget = registry.prompt_budget(1)

    def prompts(questions: Sequence[PubMedQARecord]) -> tuple[list[str], list[str]]:
        return [fit_prompt(r.prompt_input(), loaded.tokenizer, budget).text for r in questions], [r.final_decision for r in questions]

    calibration, _ = fit_and_attach(
        loaded.model, loaded.tokenizer, adapter_dir, prompts(split.train), prompts(split.dev),
        f"dev ({len(split.dev)} questions, {loaded.quantization})", args.batch_size,
    )
    return calibration


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_settings, args = parse_settings([ModelSettings, HeadArguments], argv)
        if args.export_without_head:
            path = export_without_head(model_settings.adapter_source, args.export_without_head)
            logger.info("Adapter without its decision head written to %s; fit its calibration with "
                        "`python -m training.calibrate --adapter %s`", path, path)
            return 0
        calibration = fit_head_for_adapter(model_settings, args)
    except (DataFormatError, ModelLoadError, DecisionHeadError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("Decision head and calibration written to %s (offsets %s); rewrite its card with "
                "`python -m training.model_card %s`", model_settings.adapter_source, calibration.log_offsets,
                model_settings.adapter_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
