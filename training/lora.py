"""Where LoRA goes: the decoder layers it trains (those above the decision probe's layer, so the probe reads hidden
states no training label has shaped) and their linear projections, as the PEFT config both phases share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pubmedqa.decisions.probe import probe_layer
from pubmedqa.engines.transformers_passes import decoder_layers
from pubmedqa.model_loading import BaseModel
from training.arguments import TrainArguments

if TYPE_CHECKING:
    from peft import LoraConfig


def is_qlora(base: BaseModel) -> bool:
    return base.quantization in ("4bit", "8bit")


def trainable_base(base: BaseModel) -> Any:
    """The base model ready for LoRA: QLoRA needs its quantized weights prepared (norms in float32, input grads)."""
    from peft import prepare_model_for_kbit_training

    if is_qlora(base):
        return prepare_model_for_kbit_training(base.model, use_gradient_checkpointing=torch.cuda.is_available())
    return base.model


def lora_layers(model: Any, probe_depth: float) -> list[int] | None:
    """The decoder layers LoRA trains: those above the probe (all of them without one)."""
    layers = len(decoder_layers(model))
    below = probe_layer(layers, probe_depth)
    return None if below is None else list(range(below, layers))


def lora_targets(model: Any, targets: str, layers: list[int] | None) -> str | list[str]:
    """--lora_target_modules as PEFT takes it. PEFT restricts "all-linear" to some layers only as a list of names:
    there, the linear projections of one decoder layer."""
    if targets != "all-linear":
        return [t.strip() for t in targets.split(",") if t.strip()]
    if layers is None:
        return targets
    block = decoder_layers(model)[0]
    return sorted({name.rsplit(".", 1)[-1] for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)})


def lora_config(args: TrainArguments, model: Any) -> LoraConfig:
    from peft import LoraConfig

    layers = lora_layers(model, args.probe_depth)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_targets(model, args.lora_target_modules, layers),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def first_lora_layer(config: LoraConfig) -> int | None:
    """The decision probe's layer: the first one LoRA trains (None when it trains them all: no probe)."""
    layers = config.layers_to_transform
    return layers[0] if layers else None
