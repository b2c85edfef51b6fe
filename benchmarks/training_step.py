"""Benchmark: one LoRA training step (forward + backward) on the same PubMedQA examples with
(a) this project's recipe: prompt/completion pairs fitted to --max_length, dynamic padding per batch, loss and
    logits on the answer tokens only; and
(b) the original notebook's recipe: every example padded to 512 with pad = EOS, labels = input_ids (loss on the
    prompt and the padding), full-vocabulary logits at every position.
Prints both times and the speed-up (goal >= 2x).

    python -m benchmarks.training_step [--examples 8] [--batch_size 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from pubmedqa.config import BaseModelSettings
from pubmedqa.data import load_records, load_test_ids, official_split
from pubmedqa.model_loading import load_base_model
from pubmedqa.prompts import encode_prompt
from training.arguments import TrainArguments
from training.sft_data import build_examples
from training.trainer import answer_only_loss


def _step(model, input_ids, attention_mask, labels, ours: bool) -> float:
    start = time.perf_counter()
    if ours:
        loss, _ = answer_only_loss(model, input_ids, attention_mask, labels)
    else:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    data = TrainArguments().data
    split = official_split(load_records(data), load_test_ids(data))
    base = load_base_model(BaseModelSettings(quantization="none"))
    tokenizer = base.tokenizer
    model = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    examples = build_examples(split.train[: args.examples], tokenizer, TrainArguments().max_length)

    ours_batches, notebook_batches = [], []
    for start in range(0, len(examples), args.batch_size):
        chunk = examples[start : start + args.batch_size]
        # (a) dynamic padding to the longest sequence of the batch, prompt masked out of the labels
        rows = [(encode_prompt(e["prompt"], tokenizer), tokenizer(e["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for e in chunk]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        ours_batches.append((ids, mask, labels))
        # (b) the notebook: padding="max_length" to 512 with pad = eos and labels = input_ids
        enc = tokenizer([e["prompt"] + e["completion"] for e in chunk], padding="max_length", truncation=True,
                        max_length=512, return_tensors="pt")
        enc["input_ids"][enc["attention_mask"] == 0] = tokenizer.eos_token_id  # the notebook's pad = eos
        notebook_batches.append((enc["input_ids"], enc["attention_mask"], enc["input_ids"].clone()))

    _step(model, *ours_batches[0], ours=True)  # warm-up
    ours = min(sum(_step(model, *b, ours=True) for b in ours_batches) for _ in range(args.repeats))
    notebook = min(sum(_step(model, *b, ours=False) for b in notebook_batches) for _ in range(args.repeats))
    tokens_ours = sum(int(b[1].numel()) for b in ours_batches)
    print(f"examples: {len(examples)}, batch size {args.batch_size}; padded tokens: ours {tokens_ours}, notebook {len(examples) * 512}")
    print(f"ours (dynamic padding, answer-only loss and logits): {ours:7.1f} s")
    print(f"notebook (pad to 512, loss on everything):            {notebook:7.1f} s")
    print(f"speed-up: {notebook / ours:.2f}x  (goal >= 2x)")


if __name__ == "__main__":
    main()
