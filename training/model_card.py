"""The project's model cards (README.md with Hub metadata): the adapter's, written next to its weights by training,
and each export folder's (``python -m scripts.export``): what the files are, the prompt format they expect, and how
to run them. Both carry the same Hub metadata (:func:`card_metadata`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from pubmedqa import variants
from pubmedqa.adapter import Adapter
from pubmedqa.decisions.calibration import DecisionCalibration, load_calibration
from pubmedqa.decisions.probe import DecisionProbe, load_probe
from pubmedqa.prompts import STOP_SEQUENCES, PromptInput, render_prompt
from training.ollama import DISCLAIMER

logger = logging.getLogger(__name__)


def card_metadata(base_model: str | None, library_name: str, license: str, tags: list[str], **more: Any) -> ModelCardData:
    """The Hub metadata every card of the project carries, with what is particular to this one."""
    return ModelCardData(
        base_model=base_model, library_name=library_name, license=license, datasets=["qiaojin/PubMedQA"],
        language=["en"], pipeline_tag="text-generation",
        tags=["lora", *tags, "pubmedqa", "biomedical", "question-answering"], **more,
    )

_TEMPLATE = """---
{{ card_data }}
---

# PubMedQA LoRA adapter for {{ base_model }}

A {{ method }} adapter that makes **{{ base_model }}** answer biomedical research questions from
[PubMedQA](https://pubmedqa.github.io) with a decision (**yes / no / maybe**) followed by a short explanation.
Trained with the PubMedQA chatbot project's `python -m scripts.train` (the same prompt format serves it in the
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
`python -m scripts.evaluate` ({{ test.quantization }}{% if test.calibrated %}; fine-tuned decisions calibrated{% endif %}):

| | accuracy | macro-F1 | Token-F1 | ROUGE-L | BERTScore F1 |
|---|---|---|---|---|---|
{% for row in test.rows %}| {{ row.name }} | {{ row.accuracy }} | {{ row.macro_f1 }} | {{ row.token_f1 }} | {{ row.rougeL }} | {{ row.bertscore_f1 }} |
{% endfor %}
{% else %}Test-set results come from `python -m scripts.evaluate` (see the project's Evaluation tab).
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
    card_data = card_metadata(
        run["base_model_canonical"] if not Path(run["base_model_canonical"]).exists() else None,
        library_name="peft", license="mit", tags=["peft"], metrics=["accuracy", "f1"],
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
        chosen={  # by the offsets' objective (scripts/calibrate.py)
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
    for key, name in ((variants.BASE_KEY, "base model"), (variants.TUNED_KEY, tuned)):
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


# ----------------------------------------------------------------------------------------- export folders
EXAMPLE = PromptInput(
    question="Do preoperative statins reduce atrial fibrillation after coronary artery bypass grafting?",
    context="<the abstract, optional>",
)


@dataclass
class ExportInfo:
    """What an export folder holds, for its card."""

    format: str  # merged | gguf-lora | gguf
    adapter: str  # as given (folder or Hub id)
    adapter_sha256: str
    base_description: str  # e.g. "Gemma 3 270M (base, pretrained; ...)"
    base_hub_id: str | None  # the base's Hub id for the card's metadata, when there is one
    files: list[str] = field(default_factory=list)  # the files written, model file first
    quantization: str = ""  # e.g. "Q4_K_M", "F16 (LoRA factors)", "float32 safetensors"
    base_gguf_name: str = ""  # gguf-lora: the base GGUF file the LoRA applies to
    base_gguf_hint: str = ""  # gguf-lora: how to get that file
    chat_template: bool = False  # the base renders the prompt through its chat template
    decision_files: list[str] = field(default_factory=list)  # the adapter's probe/calibration, not exported


def _stops() -> str:
    return ", ".join(f"`{stop!r}`" for stop in STOP_SEQUENCES)


def _prompt_section(info: ExportInfo) -> str:
    if info.chat_template:
        return (
            "## Prompt format\n\nThe base model has a chat template: the project's prompt goes through it as one user "
            "message (the instruction, the optional context, then the question; see `pubmedqa/prompts.py`, "
            "`chat_messages`). Generation stops at the template's end-of-turn token.\n"
        )
    example = render_prompt(EXAMPLE, None)
    return (
        "## Prompt format\n\nThe model was tuned on the PubMedQA chatbot project's one prompt format "
        "(`pubmedqa/prompts.py`); ask it the same way, leaving out the `Context:` block when there is no abstract:\n\n"
        f"```text\n{example}\n```\n\n"
        "It answers with the decision first (`yes`, `no` or `maybe`), then a sentence or two. A base model runs on "
        f"into an invented next question, so cut the answer at the stop sequences {_stops()}.\n"
    )


def _decision_note(info: ExportInfo) -> str:
    if not info.decision_files:
        return ""
    return (
        f"\nThe adapter also ships {', '.join(f'`{n}`' for n in info.decision_files)}, which the project's app uses to "
        "decide yes/no/maybe; they are not part of this export, so here the model's own first token is the decision.\n"
    )


def _usage(info: ExportInfo) -> str:
    model_file = info.files[0] if info.files else ""
    stops_json = "[" + ", ".join('"' + s.replace("\n", "\\n") + '"' for s in STOP_SEQUENCES) + "]"
    if info.format == "merged":
        return f"""## How to run it

**transformers**

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
prompt = "..."  # the prompt format above
ids = tokenizer(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=128, do_sample=False, stop_strings={stops_json}, tokenizer=tokenizer)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

**vLLM** (an OpenAI-compatible server; the project's app can use it with `--engine openai`)

```bash
vllm serve PATH_OR_REPO --served-model-name pubmedqa
curl http://localhost:8000/v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "pubmedqa", "prompt": "...", "max_tokens": 128, "temperature": 0, "stop": {stops_json}}}'
```

**The project's app**: `python app.py --base_model PATH --adapter none --engine transformers --quantization none`.
"""
    if info.format == "gguf-lora":
        return f"""## How to run it

The file is a llama.cpp LoRA adapter: it is applied on top of the base model's GGUF file, `{info.base_gguf_name}`
({info.base_gguf_hint}). Use that very base: a LoRA fits the weights it was trained on.

**llama.cpp**

```bash
llama-server -m {info.base_gguf_name} --lora {model_file}
curl http://localhost:8080/completion -H 'Content-Type: application/json' \\
  -d '{{"prompt": "...", "n_predict": 128, "temperature": 0, "stop": {stops_json}}}'
```

**llama-cpp-python**

```python
from llama_cpp import Llama

llm = Llama(model_path="{info.base_gguf_name}", lora_path="{model_file}")
print(llm.create_completion(prompt, max_tokens=128, temperature=0, stop={stops_json})["choices"][0]["text"])
```

**Ollama**: put `{info.base_gguf_name}` next to the `Modelfile` (its `FROM` line), then
`ollama create pubmedqa -f Modelfile && ollama run pubmedqa "<question>"`.

**The project's app** converts the PEFT adapter itself: `python app.py --adapter {info.adapter}`.
"""
    return f"""## How to run it

**Ollama** (the `Modelfile` next to the model renders the prompt format above from the chat: each user message is a
question, a system message is the abstract)

```bash
ollama create pubmedqa -f Modelfile
ollama run pubmedqa "Do preoperative statins reduce atrial fibrillation after coronary artery bypass grafting?"
```

**llama.cpp**

```bash
llama-server -m {model_file}
curl http://localhost:8080/completion -H 'Content-Type: application/json' \\
  -d '{{"prompt": "...", "n_predict": 128, "temperature": 0, "stop": {stops_json}}}'
```

**llama-cpp-python**

```python
from llama_cpp import Llama

llm = Llama(model_path="{model_file}")
print(llm.create_completion(prompt, max_tokens=128, temperature=0, stop={stops_json})["choices"][0]["text"])
```

**The project's app** (llama.cpp engine, no adapter: it is merged in): `python app.py --base_model {model_file} --adapter none`.
"""


_TITLES = {
    "merged": "merged model (transformers, safetensors)",
    "gguf-lora": "LoRA adapter as a GGUF LoRA (llama.cpp)",
    "gguf": "merged model as a quantised GGUF (llama.cpp, Ollama)",
}


def export_card(info: ExportInfo) -> str:
    """The README.md text (Hub metadata header included) for an export folder."""
    data = card_metadata(
        info.base_hub_id,
        library_name={"merged": "transformers", "gguf-lora": "gguf", "gguf": "gguf"}[info.format],
        # An adapter on its own is the project's (MIT); merged weights carry the base model's licence.
        license="mit" if info.format == "gguf-lora" else "other",
        tags={"merged": ["merged"], "gguf-lora": ["gguf", "llama.cpp"], "gguf": ["gguf", "llama.cpp", "ollama"]}[
            info.format],
    )
    files = "\n".join(f"- `{name}`" for name in info.files)
    licence = "" if info.format == "gguf-lora" else (
        "\nThe weights are the base model's with the adapter merged in, so the base model's licence and terms of "
        "use apply to them.\n")
    return f"""---
{data.to_yaml()}
---

# PubMedQA: {_TITLES[info.format]}

The PubMedQA chatbot project's fine-tuned model: **{info.base_description}** with the LoRA adapter `{info.adapter}`,
which answers biomedical research questions with a decision (**yes / no / maybe**) and a short explanation.
Exported with `python -m scripts.export --format {info.format}`.

> ⚠️ {DISCLAIMER} Do not use it for diagnosis or treatment decisions.

| | |
|---|---|
| format | {info.format} |
| quantisation | {info.quantization} |
| base model | {info.base_description} |
| adapter | `{info.adapter}` (sha256 of its config and weights `{info.adapter_sha256[:16]}`) |

Files:
{files}
{licence}{_decision_note(info)}
{_prompt_section(info)}
{_usage(info)}"""


if __name__ == "__main__":  # the former spelling of the command, until the next release
    import runpy
    import sys

    print("`python -m training.model_card` is now `python -m scripts.model_card`; the old spelling goes in the next "
          "release.", file=sys.stderr)
    runpy.run_module("scripts.model_card", run_name="__main__", alter_sys=True)
