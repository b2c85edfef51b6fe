"""``python -m scripts.export`` on the real embedded Gemma 3 270M and the shipped adapter: each format exported once
(module fixtures) and checked against what the project itself runs — the merged checkpoint against base + adapter in
transformers, the GGUF LoRA against the app's llama.cpp engine, the quantised GGUF's decisions against the adapter's
on 50 dev questions — plus bad input, interrupted exports, the Hub upload and the Ollama Modelfile's template."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from pubmedqa.adapter import CONFIG_FILE, GGUF_FILE, WEIGHTS_FILE, Adapter
from pubmedqa.config import SHIPPED_ADAPTER_DIR, BaseModelSettings, ModelSettings
from pubmedqa.gguf.lora import cached_gguf_lora
from pubmedqa.gguf.source import gguf_file
from pubmedqa.prompts import STOP_SEQUENCES, PromptInput, Turn, cut_at_stop, encode_prompt, render_prompt
from scripts import export as export_cli
from training.llama_cpp_tools import ExportError, find_converter

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
    "Is aspirin effective in preventing a first myocardial infarction in elderly women?",
    "Does vitamin D supplementation reduce the risk of falls in older adults?",
]
NEW_TOKENS = 16


def _export(*args: str) -> int:
    return export_cli.main(["--adapter", str(SHIPPED_ADAPTER_DIR), *args])


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _finished_looking(folder: Path) -> list[str]:
    """Files a user could take for a finished export (anything not hidden)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ the exports
@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    assert _export("--format", "merged", "--output_dir", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "gguf-lora"
    assert _export("--format", "gguf-lora", "--output_dir", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    try:
        find_converter("", ModelSettings().cache_dir)
    except ExportError as exc:  # no llama-cpp-python source here (offline, empty pip cache): the message says how
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("export") / "gguf"
    assert _export("--format", "gguf", "--output_dir", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def raw_adapter(tmp_path_factory) -> Path:
    """The shipped adapter without its decision probe and calibration (config, weights and its GGUF LoRA): on the
    engine its fine-tuned variant decides by the raw option logits, as an exported model does."""
    folder = tmp_path_factory.mktemp("raw") / "adapter"
    folder.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE, GGUF_FILE):
        shutil.copy(SHIPPED_ADAPTER_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tuned_engine(raw_adapter):
    pytest.importorskip("llama_cpp")
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(ModelSettings(adapter=str(raw_adapter), engine="llama.cpp"))
    loaded = engine.load()
    assert loaded.adapter_loaded
    assert loaded.policy.feature_layer is None and loaded.policy.calibration is None  # raw option logits
    return engine


def test_every_folder_has_its_files_and_a_card(merged_dir, lora_dir):
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(_finished_looking(merged_dir))
    assert _finished_looking(lora_dir) == ["Modelfile", "README.md", "pubmedqa-gemma-3-270m-lora-f16.gguf"]
    for folder, kind in ((merged_dir, "merged"), (lora_dir, "gguf-lora")):
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nbase_model: google/gemma-3-270m\n")
        assert f"| format | {kind} |" in card and "not medical advice" in card
        assert render_prompt(PromptInput("x", "y"), None).split("y")[0] in card  # the prompt format, from prompts.py
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert "| quantisation | none (float32 safetensors) |" in (merged_dir / "README.md").read_text()
    assert "--lora pubmedqa-gemma-3-270m-lora-f16.gguf" in (lora_dir / "README.md").read_text()


# ------------------------------------------------------------------------- 1. merged == base + adapter (PEFT)
def test_merged_checkpoint_generates_what_base_plus_adapter_generates(merged_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pubmedqa.model_loading import load_base_model

    base = load_base_model(BaseModelSettings(quantization="none"))
    assert base.quantization == "none (float32)"
    tuned = PeftModel.from_pretrained(base.model, str(SHIPPED_ADAPTER_DIR)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert merged.dtype == torch.float32
    for question in QUESTIONS:
        text = render_prompt(PromptInput(question), tokenizer)
        ids = encode_prompt(text, tokenizer)
        assert ids == encode_prompt(text, base.tokenizer)
        inputs = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(merged(inputs).logits[0, -1], tuned(input_ids=inputs).logits[0, -1],
                                       rtol=1e-3, atol=2e-3)
            greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            ours = merged.generate(inputs, **greedy)[0, len(ids):].tolist()
            theirs = tuned.generate(input_ids=inputs, **greedy)[0, len(ids):].tolist()
        assert ours == theirs, question
        assert len(ours) == NEW_TOKENS or ours[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------- 2. GGUF LoRA == the engine's GGUF LoRA
def test_gguf_lora_is_the_engines_own_conversion(lora_dir, tmp_path):
    import gguf

    exported = gguf.GGUFReader(lora_dir / "pubmedqa-gemma-3-270m-lora-f16.gguf")
    base = gguf_file("embedded")
    engine_file = cached_gguf_lora(Adapter.resolve(str(SHIPPED_ADAPTER_DIR)), base, tmp_path / "cache")  # what the app loads
    engine = gguf.GGUFReader(engine_file)

    def fields(reader):
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    assert fields(exported) == fields(engine)
    assert [t.name for t in exported.tensors] == [t.name for t in engine.tensors]
    for ours, theirs in zip(exported.tensors, engine.tensors):
        assert ours.tensor_type == theirs.tensor_type and list(ours.shape) == list(theirs.shape)
        assert ours.data.tobytes() == theirs.data.tobytes(), ours.name


def test_gguf_lora_on_llama_cpp_answers_as_the_engine_does(lora_dir, tuned_engine):
    llama_cpp = pytest.importorskip("llama_cpp")
    from pubmedqa.engines.base import GenerationSettings
    from pubmedqa.variants import Variant

    llm = llama_cpp.Llama(model_path=str(gguf_file("embedded")), n_ctx=1024, verbose=False,
                          lora_path=str(lora_dir / "pubmedqa-gemma-3-270m-lora-f16.gguf"))
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, repetition_penalty=1.0, min_new_tokens=0)  # plain greedy, as below
    for question in QUESTIONS:
        prompt = tuned_engine.prepare(PromptInput(question), settings)
        engine_answer = tuned_engine.generate(prompt, Variant.TUNED, settings)
        llm.reset()
        text = llm.create_completion(prompt.text, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1)["choices"][0]["text"]
        assert cut_at_stop(text)[0].strip() == engine_answer, question
        assert engine_answer.split(".")[0] in ("yes", "no", "maybe")


# --------------------------------------------------- 3. quantised merged GGUF decides as the adapter (50 dev qs)
def test_quantised_gguf_decides_as_the_adapter_on_the_dev_questions(gguf_dir, tuned_engine, pubmedqa_dir,
                                                                    record_property):
    from pubmedqa.data import SplitSettings, load_test_ids
    from pubmedqa.decisions.options import predicted_decision
    from pubmedqa.engines.base import GenerationSettings
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
    from pubmedqa.variants import Variant

    split = SplitSettings(data=str(pubmedqa_dir)).load_split()
    dev = split.dev
    assert len(dev) == 50 and not {r.pubid for r in dev} & set(load_test_ids(pubmedqa_dir))  # never a test question
    model_file = gguf_dir / "pubmedqa-gemma-3-270m-q4_k_m.gguf"
    merged = LlamaCppEngine(ModelSettings(base_model=str(model_file), adapter="none", engine="llama.cpp"))
    assert merged.load().quantization.startswith("Q4_K_M")

    settings = GenerationSettings()
    tuned_prompts = [tuned_engine.prepare(r.prompt_input(), settings) for r in dev]
    merged_prompts = [merged.prepare(r.prompt_input(), settings) for r in dev]
    assert [p.text for p in merged_prompts] == [p.text for p in tuned_prompts]  # the same tokenizer and budget
    # One decode per prompt, the last position's logits of the three options only; no generation, no probe.
    adapter = tuned_engine.load().policy.without_offsets(
        tuned_engine.score_decisions(tuned_prompts, [Variant.TUNED] * len(dev)), [True] * len(dev)
    )
    exported = merged.score_decisions(merged_prompts, [Variant.BASE] * len(dev))
    ours = [predicted_decision(p) for p in exported]
    theirs = [predicted_decision(p) for p in adapter]
    agreement = sum(a == b for a, b in zip(ours, theirs)) / len(dev)
    gold = [r.final_decision for r in dev]
    accuracy = {name: sum(d == g for d, g in zip(decisions, gold)) / len(dev)
                for name, decisions in (("exported", ours), ("adapter", theirs))}
    record_property("decision_agreement", agreement)
    print(f"\nQ4_K_M GGUF vs adapter (llama.cpp, raw option logits) on {len(dev)} dev questions: agreement "
          f"{agreement:.2f}; dev accuracy exported {accuracy['exported']:.2f}, adapter {accuracy['adapter']:.2f}")
    assert agreement >= 0.9


def test_quantised_gguf_keeps_the_base_tokenizer_and_has_a_modelfile(gguf_dir):
    llama_cpp = pytest.importorskip("llama_cpp")

    model_file = gguf_dir / "pubmedqa-gemma-3-270m-q4_k_m.gguf"
    assert _finished_looking(gguf_dir) == ["Modelfile", "README.md", model_file.name]
    ours = llama_cpp.Llama(model_path=str(model_file), vocab_only=True, verbose=False)
    base = llama_cpp.Llama(model_path=str(gguf_file("embedded")), vocab_only=True, verbose=False)
    assert ours.metadata["tokenizer.ggml.model"] == base.metadata["tokenizer.ggml.model"] == "llama"
    text = render_prompt(PromptInput(QUESTIONS[0], context="Café naïve — 5 µg/ml\n\n  tabs\there 🧬"), None)
    assert ours.tokenize(text.encode()) == base.tokenize(text.encode())
    modelfile = (gguf_dir / "Modelfile").read_text()
    assert f"FROM ./{model_file.name}\n" in modelfile and "ADAPTER" not in modelfile
    _check_modelfile(modelfile)
    assert "| quantisation | Q4_K_M (the 56 tensors the adapter changes: Q8_0) |" in (gguf_dir / "README.md").read_text()

    # llama.cpp's Q4_K_M recipe gives every tensor the type it has in the embedded GGUF, but for the 56 the adapter
    # changes (layers 10-17, seven projections each), kept at Q8_0 so the fine-tuning survives quantisation.
    import gguf

    from pubmedqa.gguf.lora import adapter_target_tensors

    changed = set(adapter_target_tensors(Adapter.resolve(str(SHIPPED_ADAPTER_DIR)), gguf_file("embedded")))
    assert len(changed) == 56
    base_types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_file("embedded")).tensors}
    for tensor in gguf.GGUFReader(model_file).tensors:
        expected = gguf.GGMLQuantizationType.Q8_0 if tensor.name in changed else base_types[tensor.name]
        assert tensor.tensor_type == expected, tensor.name


# ------------------------------------------------------------------------------------------------ 4. bad input
@pytest.mark.parametrize(("flag", "value"), [("--format", "onnx"), ("--quant", "q3_k")])
def test_unknown_format_or_quant_exits_2(tmp_path, capsys, flag, value):
    args = {"--format": "gguf", "--quant": "q4_k_m"} | {flag: value}
    with pytest.raises(SystemExit) as exit_info:
        _export(*[x for kv in args.items() for x in kv], "--output_dir", str(tmp_path / "out"))
    assert exit_info.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    cases = [
        (["--adapter", str(tmp_path / "missing"), "--format", "gguf-lora"], "is not a folder"),
        (["--adapter", str(tmp_path), "--format", "merged"], "not a LoRA adapter folder"),
        (["--adapter", str(SHIPPED_ADAPTER_DIR), "--format", "merged", "--quant", "q8_0"], "--quant applies to"),
        (["--adapter", str(SHIPPED_ADAPTER_DIR), "--format", "gguf", "--llama_cpp_dir", str(tmp_path)],
         "convert_hf_to_gguf.py"),
        (["--adapter", str(SHIPPED_ADAPTER_DIR), "--format", "gguf-lora", "--base_model", "org/not-a-gguf"],
         "org/not-a-gguf is not a GGUF file"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert export_cli.main([*argv, "--output_dir", str(out)]) == 2, argv
        (error,) = _errors(caplog)
        assert message in error and "\n" not in error, error
        assert not out.exists(), argv

    # An output folder that cannot be made (a file is in the way), and one that holds other files.
    (tmp_path / "file").write_text("x")
    caplog.clear()
    assert _export("--format", "gguf-lora", "--output_dir", str(tmp_path / "file" / "out")) == 2
    assert "Not a directory" in _errors(caplog)[0]
    (out / "keep").mkdir(parents=True)
    caplog.clear()
    assert _export("--format", "gguf-lora", "--output_dir", str(out)) == 2
    assert "is not empty" in _errors(caplog)[0] and _finished_looking(out) == ["keep"]


def test_an_adapter_of_another_base_is_refused(tiny_adapter_dir, tmp_path, caplog):
    for kind, message in (("gguf-lora", "do not match the base model"), ("merged", "does not fit the base model")):
        caplog.clear()
        out = tmp_path / kind
        assert export_cli.main(["--adapter", str(tiny_adapter_dir), "--format", kind, "--output_dir", str(out)]) == 2
        (error,) = _errors(caplog)
        assert message in error and "another base model" in error and "\n" not in error, error
        assert not out.exists()


def test_an_interrupted_export_leaves_nothing_that_looks_finished(tmp_path, caplog, monkeypatch):
    import gguf

    def disk_full(self, *args, **kwargs):
        self.fout[0].write(b"half a tensor")  # as a real failure would: part of the file is on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    out = tmp_path / "lora"
    assert _export("--format", "gguf-lora", "--output_dir", str(out)) == 2
    assert "No space left on device" in _errors(caplog)[0]
    assert not out.exists()

    def merge_then_fail(adapter, settings, target):
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"\0" * 1024)
        raise KeyboardInterrupt  # Ctrl-C while the weights are being written

    monkeypatch.setattr(export_cli, "merge_adapter", merge_then_fail)
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "README.md").write_text("an earlier export")
    with pytest.raises(KeyboardInterrupt):
        _export("--format", "merged", "--output_dir", str(previous), "--overwrite")
    # The earlier export is untouched, and nothing of the interrupted one is there, hidden or not.
    assert [p.name for p in previous.iterdir()] == ["README.md"]
    assert (previous / "README.md").read_text() == "an earlier export"


def test_push_needs_a_token_and_never_shows_it(tmp_path, caplog, capsys, monkeypatch, hub_calls):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "out"
    assert _export("--format", "gguf-lora", "--output_dir", str(out), "--push_to_hub", "user/pubmedqa-gguf") == 2
    (error,) = _errors(caplog)
    assert "needs a Hugging Face token" in error and "HF_TOKEN" in error
    assert not out.exists()  # checked before any work

    assert hub_calls == []
    secret = "hf_SECRETsecretSECRET"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: secret)
    caplog.clear()
    assert _export("--format", "gguf-lora", "--output_dir", str(out), "--push_to_hub", "user/pubmedqa-gguf",
                   "--private") == 0
    (create, upload) = hub_calls
    assert create[2]["private"] is True and create[2]["exist_ok"] is True
    assert upload[2]["folder_path"] == str(out)
    assert sorted(upload[2]["allow_patterns"]) == _finished_looking(out)
    assert secret not in caplog.text and secret not in "".join(capsys.readouterr())


# --------------------------------------------------------------------------- 5. the Modelfile renders prompts.py
def _go_template(template: str, system: str, messages: list[dict[str, str]]) -> str:
    """The part of Go's text/template the Modelfile uses (if / else if / else / range / eq, fields, strings)."""
    tokens = re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL)

    def parse(i: int) -> tuple[list, int, str | None]:
        nodes: list = []
        while i < len(tokens):
            token, i = tokens[i], i + 1
            if not token.startswith("{{"):
                nodes.append(("text", token))
                continue
            action = token[2:-2].strip()
            if action.startswith("if "):
                branches, condition = [], action[3:]
                while True:
                    body, i, end = parse(i)
                    branches.append((condition, body))
                    if end == "end":
                        break
                    condition = end[len("else if "):] if end.startswith("else if ") else None
                nodes.append(("if", branches))
            elif action.startswith("range "):
                body, i, end = parse(i)
                assert end == "end"
                nodes.append(("range", action[len("range "):], body))
            elif action in ("end", "else") or action.startswith("else if "):
                return nodes, i, action
            else:
                nodes.append(("value", action))
        return nodes, i, None

    def value(expr: str, dot: dict) -> object:
        if expr.startswith('"'):
            return json.loads(expr)
        if expr.startswith("eq "):
            left, right = expr[3:].split(" ", 1)
            return value(left, dot) == value(right, dot)
        assert expr.startswith("."), expr
        return dot[expr[1:]]

    def run(nodes: list, dot: dict) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "value":
                out.append(str(value(node[1], dot)))
            elif node[0] == "if":
                for condition, body in node[1]:
                    if condition is None or value(condition, dot):
                        out.append(run(body, dot))
                        break
            else:
                out.extend(run(node[2], item) for item in value(node[1], dot))
        return "".join(out)

    nodes, _, end = parse(0)
    assert end is None
    return run(nodes, {"System": system, "Messages": messages})


def _check_modelfile(text: str) -> None:
    """The Modelfile as Ollama's parser reads it (quoted values verbatim), rendered against pubmedqa.prompts."""
    (template,) = re.findall(r'^TEMPLATE """(.*?)"""$', text, flags=re.DOTALL | re.MULTILINE)
    stops = re.findall(r'^PARAMETER stop """(.*?)"""$', text, flags=re.DOTALL | re.MULTILINE)
    assert tuple(stops) == STOP_SEQUENCES
    assert "SYSTEM" not in text and "not medical advice" in text  # the note is a comment: a system message is context
    history = (Turn("Is the earlier question answered?", "yes. It was."),)
    cases = [
        PromptInput(QUESTIONS[0]),
        PromptInput(QUESTIONS[1], context="We studied 120 patients.\nResults: fewer events."),
        PromptInput(QUESTIONS[2], history=history),
        PromptInput(QUESTIONS[2], context="An abstract {{ with braces }}.", history=history),
    ]
    for inp in cases:
        messages = [{"Role": "system", "Content": inp.context}] if inp.context else []
        for turn in inp.history:
            messages += [{"Role": "user", "Content": turn.question}, {"Role": "assistant", "Content": turn.answer}]
        messages.append({"Role": "user", "Content": inp.question})
        assert _go_template(template, inp.context, messages) == render_prompt(inp, None), inp


def test_modelfile_template_renders_the_projects_prompt_format(lora_dir):
    text = (lora_dir / "Modelfile").read_text()
    assert "FROM ./gemma-3-270m-q4_k_m.gguf\n" in text
    assert "ADAPTER ./pubmedqa-gemma-3-270m-lora-f16.gguf\n" in text
    _check_modelfile(text)
