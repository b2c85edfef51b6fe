"""The adapter's model card (README.md with Hub metadata), written next to the adapter weights."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import ModelCard, ModelCardData

from pubmedqa.adapter import Adapter, AdapterError
from pubmedqa.decisions.calibration import DecisionCalibration, load_calibration
from pubmedqa.decisions.probe import DecisionProbe, load_probe
from pubmedqa.evaluation.results import ResultsError, load_results

logger = logging.getLogger("training.model_card")

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
{% if pqa_a %}- First phase: {{ pqa_a.questions }} PQA-A (artificial, yes/no) questions from {{ pqa_a.source }},
  {{ pqa_a.epochs }} epoch(s); PQA-L dev and test ids excluded ({{ pqa_a.dropped_pqa_l_ids }} found and dropped).
{% endif %}- Target: `"<decision>. <{{ target }}>"` after the project's shared prompt format; the loss is on the
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
{% if probe %}| with this adapter's decision probe and offsets (out of fold over all {{ probe.details.questions }} train + dev questions) | {{ "%.3f"|format(probe.details.cross_validated.accuracy) }} | {{ "%.3f"|format(probe.details.cross_validated.macro_f1) }} |
{% endif %}{% if calibration and not probe %}| with this adapter, calibrated (in-sample: fitted on {{ calibration.fitted_on }}) | {{ "%.3f"|format(calibration.details.after.accuracy) }} | {{ "%.3f"|format(calibration.details.after.macro_f1) }} |
{% endif %}{% if calibration %}
The adapter ships `decision_calibration.json`: log-probability offsets per option ({{ calibration.log_offsets }}),
fitted on {{ calibration.fitted_on }} (never on test questions), which the project's app and evaluation add before
picking the decision. The offsets are chosen on the rows they are scored on (in-sample); the test set says how they hold.
{% endif %}{% if probe %}
**Decision probe.** The fine-tuned variant's yes/no/maybe comes from `decision_probe.safetensors`: a logistic
regression on the prompt's {{ read[probe.pooling] }} after decoder layer {{ probe.layer - 1 }} (L2 {{ probe.details.l2 }}, chosen
by out-of-fold pairwise AUC {{ probe.details.cv_auc_by_l2 }} over {{ probe.details.questions }} train + dev
questions; the row above is out of fold, offsets included). The adapter trains only the layers above it, so the
probe reads the base model's own hidden states. The project's app and evaluation apply it; PEFT alone (or vLLM/TGI)
ignores the file, and the adapter's own option logits decide there.
{% endif %}{% if engine_probe %}
**On llama.cpp** (the project's CPU engine, on the GGUF's own quantised weights) a probe and offsets fitted on that
engine's features decide instead: `decision_probe.llama-cpp.safetensors` and `decision_calibration.llama-cpp.json`,
fitted on {{ engine_probe.details.fitted_on }}, reading the prompt's {{ read[engine_probe.pooling] }}{% if engine_calibration %},
with offsets {{ engine_calibration.log_offsets }} chosen out of fold {{ chosen[engine_calibration.details.objective or "score"] }}{% endif %}
(out of fold: accuracy {{ "%.3f"|format(engine_probe.details.cross_validated.accuracy) }}, macro-F1
{{ "%.3f"|format(engine_probe.details.cross_validated.macro_f1) }}).
{% endif %}
{% if test %}## Results on the official test set ({{ test.n }} questions{{ test.sample }})
`python -m training.evaluate` ({{ test.quantization }}{% if test.calibrated %}; fine-tuned decisions calibrated{% endif %}):

| | accuracy | macro-F1 | Token-F1 | ROUGE-L | BERTScore F1 |
|---|---|---|---|---|---|
{% for row in test.rows %}| {{ row.name }} | {{ row.accuracy }} | {{ row.macro_f1 }} | {{ row.token_f1 }} | {{ row.rougeL }} | {{ row.bertscore_f1 }} |
{% endfor %}
{% else %}Test-set results come from `python -m training.evaluate` (see the project's Evaluation tab).
{% endif %}
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
    test_results: dict[str, Any] | None = None,
    probe: DecisionProbe | None = None,
) -> Path:
    """Write README.md into ``output_dir``; ``test_results`` is an evaluation run's results.json, if there is one."""
    args = run["train_arguments"]
    adapter = Adapter(str(output_dir), Path(output_dir))  # the folder being written (its files may not all be there)
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
        "trained decoder layers": f"above {args['probe_depth']:.0%} of the depth" if args.get("probe_depth") else "all",
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
        probe=probe,
        engine_probe=load_probe(adapter, "llama.cpp"),
        engine_calibration=load_calibration(adapter, "llama.cpp"),
        chosen={  # by the offsets' objective (training/calibrate.py)
            "score": "for the best (accuracy + macro-F1) / 2",
            "shares": "so that each decision is predicted about as often as it is the gold one",
        },
        read={"mean": "mean hidden state", "mean+last": "mean hidden state and its last token's"},  # by pooling
        target=(
            "the first sentence of the abstract's conclusion" if args.get("answer_target") == "first_sentence"
            else "the abstract's conclusion"
        ),
        pqa_a=run.get("pqa_a_phase"),
        test=_test_summary(test_results) if test_results else None,
    )
    path = output_dir / "README.md"
    card.save(path)
    return path


def _test_summary(results: dict[str, Any]) -> dict[str, Any]:
    def number(value: Any, scale: float = 1.0) -> str:
        return f"{value * scale:.1f}" if isinstance(value, (int, float)) else ""

    rows = []
    tuned = "with this adapter and its decision probe" if results["run"].get("decision_probe") else "with this adapter"
    for key, name in (("base", "base model"), ("tuned", tuned)):
        m = results["models"].get(key)
        if m:
            rows.append({
                "name": name, "accuracy": number(m["accuracy"], 100) + " %", "macro_f1": number(m["macro_f1"], 100),
                "token_f1": number(m.get("token_f1")), "rougeL": number(m.get("rougeL")),
                "bertscore_f1": number((m.get("bertscore") or {}).get("f1")),
            })
    run = results["run"]
    return {
        "rows": rows, "n": run["n"], "sample": ", a label-stratified sample" if run["n"] < 500 else "",
        "quantization": f"base in {run['quantization']}", "calibrated": bool(run.get("decision_calibration")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite an adapter folder's card from its own files, e.g. after `training.calibrate` or an evaluation run."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("--results", type=Path, help="An evaluation run folder whose results.json goes on the card.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run = json.loads((args.adapter_dir / "training_args.json").read_text())
        dev = json.loads((args.adapter_dir / "dev_metrics.json").read_text())
        results = load_results(args.results).results if args.results else None
        adapter = Adapter.resolve(str(args.adapter_dir))
    except (OSError, json.JSONDecodeError, ResultsError, AdapterError) as exc:
        logger.error("Cannot write the card: %s", exc)
        return 2
    path = write_model_card(args.adapter_dir, run, dev["before_training"], dev["after_training"],
                            load_calibration(adapter), results, load_probe(adapter))
    logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
