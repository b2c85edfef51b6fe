"""The adapter's model card (README.md with Hub metadata), written next to the adapter weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from app.calibration import DecisionCalibration

_TEMPLATE = """---
{{ card_data }}
---

# PubMedQA LoRA adapter for {{ base_model }}

A {{ method }} adapter that makes **{{ base_model }}** answer biomedical research questions from
[PubMedQA](https://pubmedqa.github.io) with a decision (**yes / no / maybe**) followed by a short explanation.
Trained with the PubMedQA chatbot project's `python -m training.train` (the same prompt format serves it in the
project's Gradio app).

> ⚠️ Research artefact, **not medical advice**. Do not use it for diagnosis or treatment decisions.

## Data and split
- PubMedQA PQA-L (1,000 expert-labelled questions, MIT licence), source: {{ data_source }}.
- The **official 500-question test set is excluded** from training and from checkpoint selection.
- The other 500 are split, stratified by label (seed {{ split_seed }}), into {{ n_train }} train and {{ n_dev }} dev
  questions (train ids sha256/16 `{{ train_hash }}`, test ids sha256/16 `{{ test_hash }}`).
- Target: `"<decision>. <the abstract's conclusion>"` after the project's shared prompt format; the loss is on the
  answer only; long abstracts are shortened, never the question or the answer.

## Recipe
| setting | value |
|---|---|
{% for key, value in recipe.items() %}| {{ key }} | {{ value }} |
{% endfor %}
## Results (dev set, {{ n_dev }} questions, decision by option likelihood)
| | accuracy | macro-F1 |
|---|---|---|
| base model | {{ "%.3f"|format(before.accuracy) }} | {{ "%.3f"|format(before.macro_f1) }} |
| with this adapter | {{ "%.3f"|format(after.accuracy) }} | {{ "%.3f"|format(after.macro_f1) }} |
{% if calibration %}| with this adapter, calibrated | {{ "%.3f"|format(calibration.details.after.accuracy) }} | {{ "%.3f"|format(calibration.details.after.macro_f1) }} |

The adapter ships `decision_calibration.json`: log-probability offsets per option ({{ calibration.log_offsets }}),
fitted on the dev questions ({{ calibration.fitted_on }}), which the project's app and evaluation add before picking
the decision. The calibrated dev row is in-sample (fitted on those same questions); the test set says how it holds.
{% endif %}
Test-set results come from `python -m training.evaluate` (see the project's Evaluation tab).

## Use
```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this folder or repo>")
```
or serve it in the app: `PUBMEDQA_ADAPTER=<this folder or repo> python app.py`.

## Intended use and limits
Research and teaching about fine-tuning for biomedical QA. The model can be confidently wrong, has seen only 450
training questions, and its explanations may not be supported by the abstract.
"""


def write_model_card(
    output_dir: Path,
    run: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    calibration: DecisionCalibration | None = None,
) -> Path:
    args = run["train_arguments"]
    card_data = ModelCardData(
        base_model=run["base_model_canonical"] if not Path(run["base_model_canonical"]).exists() else None,
        library_name="peft",
        datasets=["qiaojin/PubMedQA"],
        license="mit",
        language=["en"],
        pipeline_tag="text-generation",
        tags=["lora", "peft", "pubmedqa", "biomedical", "question-answering"],
        metrics=["accuracy", "f1"],
    )
    recipe = {
        "method": run["method"],
        "base quantization": run["quantization"],
        "LoRA r / alpha / dropout": f"{args['lora_r']} / {args['lora_alpha']} / {args['lora_dropout']}",
        "target modules": args["lora_target_modules"],
        "learning rate": args["learning_rate"],
        "epochs (max steps)": f"{args['num_train_epochs']} ({args['max_steps']})",
        "batch size x grad. accumulation": f"{args['per_device_train_batch_size']} x {args['gradient_accumulation_steps']}",
        "max length": args["max_length"],
        "seed": args["seed"],
        "optimizer steps": run["train_result"]["global_step"],
    }
    card = ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        base_model=run["base_model_canonical"],
        method=run["method"],
        data_source=run["data_source"],
        split_seed=args["split_seed"],
        n_train=run["split"]["train"],
        n_dev=run["split"]["dev"],
        train_hash=run["split"]["train_ids_sha256_16"],
        test_hash=run["split"]["test_ids_sha256_16"],
        recipe=recipe,
        before=before,
        after=after,
        calibration=calibration,
    )
    path = output_dir / "README.md"
    card.save(path)
    return path
