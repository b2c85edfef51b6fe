"""The README.md model card of each export folder (``python -m training.export``): what the files are (format,
quantisation, base model, adapter), the prompt format they expect, and how to run them."""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub import ModelCardData

from pubmedqa.prompts import STOP_SEQUENCES, PromptInput, render_prompt
from training.ollama import DISCLAIMER

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
    tags = ["pubmedqa", "biomedical", "question-answering", "lora"]
    tags += {"merged": ["merged"], "gguf-lora": ["gguf", "llama.cpp"], "gguf": ["gguf", "llama.cpp", "ollama"]}[
        info.format]
    data = ModelCardData(
        base_model=info.base_hub_id,
        datasets=["qiaojin/PubMedQA"],
        language=["en"],
        library_name={"merged": "transformers", "gguf-lora": "gguf", "gguf": "gguf"}[info.format],
        # An adapter on its own is the project's (MIT); merged weights carry the base model's licence.
        license="mit" if info.format == "gguf-lora" else "other",
        pipeline_tag="text-generation",
        tags=tags,
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
Exported with `python -m training.export --format {info.format}`.

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
