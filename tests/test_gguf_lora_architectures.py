"""The GGUF LoRA conversion (pubmedqa/gguf/lora.py) for Llama, Qwen2 and Gemma 3 bases, end to end on tiny
random models built here (offline, no download), and the llama.cpp engine serving the result.

For each architecture: a tiny random transformers model (Llama with 4 query heads and 2 KV heads, so the grouped K
permutation is exercised; Qwen2 with its q/k/v biases; Gemma 3 text) is saved with a tiny tokenizer (Llama, Gemma 3:
SentencePiece, and the same vocabulary as a transformers tokenizer; Qwen2: a byte-level BPE in Qwen2's own pipeline,
the only kind of tokenizer transformers 5 builds for Qwen2), turned into an f32 GGUF by llama.cpp's own
``convert_hf_to_gguf.py`` (the converter the export uses, ``training.llama_cpp_tools``; for Qwen2 through a wrapper
that names the tiny BPE's pre-tokenizer "qwen2", which llama.cpp's table of known vocabularies cannot recognise, see
``qwen2_converter``), given a random PEFT LoRA on every linear layer (B nonzero), and the adapter converted by the
project's ``cached_gguf_lora`` (what the llama.cpp engine loads). The random LoRA's factors are rounded to f16 values
before the adapter is saved, since the GGUF LoRA stores them as f16: the comparison then measures the conversion, not
that rounding.

Trained adapters: for each architecture a second adapter is trained by the project's own run
(``scripts.train.train`` with ``--base_model <the .gguf> --train_base_model <its transformers folder>``) for three
optimizer steps on 12 PubMedQA-like questions written here (2 more are the "official test" ones it leaves out):
Gemma 3 and Qwen2 at the default probe depth (LoRA on layer 1, a decision probe and offsets fitted), Llama with
``--probe_depth 0`` (LoRA on both layers). A trained adapter must move the output by ``MIN_EFFECT`` before it is
compared (measured 0.20 llama, 0.27 qwen2, 0.15 gemma3), and every LoRA B factor must have left zero. Then the
llama.cpp engine (``LlamaCppEngine``, ``--engine llama.cpp``) serves it: the GGUF's tokenizer splits a training
example into the token ids transformers trained on, a Compare pair (base and fine-tuned side by side on two contexts)
gives each variant's own greedy answer, the two differ, and the base answer is that of an engine without an adapter;
the answer options are one token each on every architecture (the tiny SentencePiece vocabularies add a word boundary
in front of a text, as Llama 2's does; the byte-level BPE has " yes", " no", " maybe" as tokens, as Qwen2.5's has),
and the decisions are scored alike in one pass and two, the base's equal to an engine's without an adapter.

Tolerance: llama.cpp's last-position log-softmax over the vocabulary matches transformers (+ PEFT) on the same token
ids to ``TOLERANCE``, 2e-3 max abs difference, with the LoRA off and on; switched off, the adapter leaves the base's
output exactly as it was without one. Measured (2 threads): base 4.3e-5 (llama), 3.0e-5 (qwen2), 3.1e-4 (gemma3:
ggml's CPU GELU reads an f16 lookup table); with the random LoRA 7.9e-4, 1.5e-4, 5.1e-4 (the GGUF LoRA's factors are
f16, and ggml multiplies an f16 weight by activations rounded to f16), against a LoRA effect of 0.63 to 0.83; with the
trained one 5.7e-5 (llama), 5.2e-5 (qwen2) and 2.3e-4 (gemma3). For Llama, the random adapter converted without the
Q/K row permutation misses by 0.36, so the permutation is what makes it right. The probe's features (``l_out-0``)
match transformers' ``hidden_states[1]`` to 1e-4 (measured 4.8e-6 llama, 1.9e-5 qwen2) and for Gemma 3 to 5e-3 (the
GELU table again; measured 2.5e-3). The whole module takes about 22 s on 2 cores (46 s with another busy run on
them), the three training runs a few seconds of it.
Skipped only where llama-cpp-python is not installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app import model_status
from pubmedqa.adapter import Adapter
from pubmedqa.config import ModelSettings
from pubmedqa.gguf import lora as gguf_lora
from pubmedqa.gguf.lora import LoraConversionError, cached_gguf_lora, convert_adapter, read_base_gguf
from training.llama_cpp_tools import find_converter, run_converter

llama_cpp = pytest.importorskip("llama_cpp")

logger = logging.getLogger(__name__)

TOLERANCE = 2e-3  # max abs difference of the last position's log-softmax (f32 GGUF vs transformers f32)
# The least LoRA effect (max abs change of that log-softmax) each kind of adapter must have for the comparison to mean
# something: a random LoRA (A and B random) moves it by about 0.6-0.8, a LoRA trained three steps by 0.15-0.27.
MIN_EFFECT = {"random": 100 * TOLERANCE, "trained": 25 * TOLERANCE}
# Max abs difference of the probe's features; ggml's CPU GELU (Gemma) is an f16 table, SiLU (Llama, Qwen2) is not.
FEATURE_TOLERANCE = {"llama": 1e-4, "qwen2": 1e-4, "gemma3": 5e-3}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # SentencePiece's <unk>, <s>, </s>
CORPUS = [
    "Answer the biomedical research question with yes, no or maybe, then explain the answer.",
    "Question: Does aspirin reduce the risk of myocardial infarction? Answer: yes. Aspirin lowers the risk.",
    "Context: We studied 120 patients with diabetes and hypertension in a randomized controlled trial.",
    "Is ultrasound equal to X-ray in pediatric fracture diagnosis? maybe. The results were inconclusive.",
    "no. The treatment did not improve survival in elderly patients with heart failure.",
]
PROMPT = "Question: Does aspirin reduce the risk of myocardial infarction in patients with diabetes? Answer:"
# PubMedQA-like questions (pubid, question, context, conclusion, decision) in the layout of ``ori_pqal.json``; the
# last two are the "official test" ones, which training must leave out.
RECORDS = [
    ("9000001", "Does aspirin reduce the risk of myocardial infarction?",
     "We studied 120 patients in a randomized trial.", "Aspirin lowers the risk of infarction.", "yes"),
    ("9000002", "Does metformin improve survival in patients with diabetes?", "A cohort of 300 patients with diabetes.",
     "Metformin improved survival.", "yes"),
    ("9000003", "Is exercise associated with lower blood pressure?", "Hypertension was measured in 80 adults.",
     "Exercise lowered the pressure.", "yes"),
    ("9000004", "Do statins reduce mortality after stroke?", "We followed 200 patients after a stroke.",
     "Statins reduced mortality.", "yes"),
    ("9000005", "Does the treatment improve survival in elderly patients with heart failure?",
     "A randomized controlled trial in elderly patients.", "The treatment did not improve survival.", "no"),
    ("9000006", "Is vitamin C effective against the common cold?", "We studied 150 healthy adults.",
     "Vitamin C had no effect.", "no"),
    ("9000007", "Does coffee cause hypertension?", "A study of 500 patients with hypertension.",
     "Coffee did not raise the risk.", "no"),
    ("9000008", "Is the new test better than X-ray in fracture diagnosis?", "Children with a fracture were studied.",
     "The test was not better.", "no"),
    ("9000009", "Is ultrasound equal to X-ray in pediatric fracture diagnosis?", "We studied 90 children.",
     "The results were inconclusive.", "maybe"),
    ("9000010", "Does diet reduce the risk of diabetes in elderly patients?", "A trial in 60 elderly patients.",
     "The effect remains unclear.", "maybe"),
    ("9000011", "Do patients with diabetes benefit from early treatment?", "We studied 40 patients with diabetes.",
     "More trials are needed.", "maybe"),
    ("9000012", "Is aspirin safe in patients with heart failure?", "A cohort of 250 patients with heart failure.",
     "Aspirin was safe.", "yes"),
    ("9000013", "Does the drug lower the risk of stroke?", "We studied 70 patients.", "The drug lowered the risk.",
     "yes"),
    ("9000014", "Is surgery better than treatment with drugs?", "A randomized trial in 45 patients.",
     "Surgery was not better.", "no"),
]
TEST_IDS = ["9000013", "9000014"]
# Architectures whose adapter is trained here by ``scripts.train`` (on its transformers twin of the GGUF): all three.
TRAINED = ["gemma3", "llama", "qwen2"]
# The texts the tiny Qwen2's byte-level BPE is trained on, the answer options among them as words of their own.
BPE_TEXTS = CORPUS * 20 + [" ".join(record[1:]) for record in RECORDS] * 5 + [" yes no maybe"] * 50


# ------------------------------------------------------------------------------------------------ tiny models
def sentencepiece_model() -> bytes:
    """A tiny SentencePiece model (Llama's and Gemma 3's tokenizer; the converter reads ``tokenizer.model``).
    With byte pieces, as real SentencePiece vocabularies have: llama.cpp's tokenizer aborts the whole process on a
    character (a newline of the prompt) that has neither a piece nor a byte piece. No normalisation, as llama.cpp's
    tokenizer has none, so SentencePiece, transformers and llama.cpp split any text alike."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        hard_vocab_limit=False, minloglevel=2, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    return model.getvalue()


def transformers_tokenizer(processor: Any, space_prefix: bool) -> Any:
    """The same vocabulary as a transformers tokenizer (what ``scripts.train`` loads with the model): BPE with byte
    fallback on SentencePiece's pieces and merges, built without protobuf (which reading ``tokenizer.model`` would
    need). ``space_prefix``: whether a text starts with a word boundary, as llama.cpp's Llama and Qwen2 tokenizers
    add one and its Gemma one does not."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    pieces = [processor.id_to_piece(i) for i in range(processor.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: processor.get_score(i) for i, piece in enumerate(pieces)})
    return LlamaTokenizer(
        vocab=vocab, merges=merges, add_prefix_space=space_prefix, legacy=False, add_bos_token=True,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
    )


def qwen2_tokenizer() -> Any:
    """A tiny byte-level BPE in Qwen2's own pipeline (NFC, its pre-tokenizer regex, GPT-2 byte-level pieces: what
    transformers 5 builds any Qwen2 tokenizer as), trained on ``BPE_TEXTS``: all 256 byte pieces, so any text has a
    tokenization (llama.cpp aborts on a byte without a piece), and " yes", " no", " maybe" one token each, as in
    Qwen2.5's real vocabulary. Special tokens ``<unk>``, ``<s>``, ``</s>`` at ``SPECIAL_IDS``; no BOS is added to a
    text, as Qwen2's tokenizer adds none."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(BPE_TEXTS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]],
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
    )
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == list(SPECIAL_IDS.values())
    assert all(len(tokenizer(" " + option)["input_ids"]) == 1 for option in ("yes", "no", "maybe"))
    return tokenizer


def qwen2_converter(converter: Path, folder: Path) -> Path:
    """``converter`` run through a wrapper script (in ``folder``) that names the tiny byte-level BPE's pre-tokenizer
    "qwen2" where llama.cpp's check leaves it unrecognised. That check (``TextModel.get_vocab_base_pre`` in the
    converter's ``conversion`` package) hashes how the tokenizer splits a fixed text and knows only the hashes of
    published vocabularies; a tiny trained BPE has Qwen2's pre-tokenizer and normaliser (``qwen2_tokenizer``) but its
    own merges, hence its own hash. What this module tests is the project's LoRA conversion on the GGUF the converter
    writes, not llama.cpp's hash table; that llama.cpp then splits a text as transformers does is checked by the
    Compare test (on a training example) and by the options being the same single tokens."""
    script = folder / "convert_tiny_qwen2.py"
    script.write_text(textwrap.dedent(f"""
        import sys

        sys.path.insert(0, {str(converter.parent)!r})
        import {converter.stem} as converter  # puts the gguf-py next to it on the path, as when run as a script
        from conversion.base import TextModel

        recognised = TextModel.get_vocab_base_pre


        def get_vocab_base_pre(self, tokenizer):
            try:
                return recognised(self, tokenizer)
            except NotImplementedError:  # a hash llama.cpp does not know: the tiny BPE
                return "qwen2"


        TextModel.get_vocab_base_pre = get_vocab_base_pre
        converter.main()
    """))
    return script


def llama_model(vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,  # grouped KV heads: K is permuted with n_head_kv
        max_position_embeddings=256, **SPECIAL_IDS,
    )
    return LlamaForCausalLM(config)


def qwen2_model(vocab_size: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **SPECIAL_IDS,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases, so a layout mistake in them would show (transformers starts them at 0)
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0.0, 0.5)
    return model


def gemma3_model(vocab_size: int) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        # llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim) (as Gemma 3 270M's 256 = head_dim does)
        query_pre_attn_scalar=32, max_position_embeddings=256, sliding_window=64, **SPECIAL_IDS,
    )
    return Gemma3ForCausalLM(config)


BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "llama": llama_model, "qwen2": qwen2_model, "gemma3": gemma3_model,
}


@dataclass
class TinyBase:
    """A tiny model of one architecture: its transformers folder, its GGUF file, a PEFT adapter for it, and what
    transformers computes for ``ids``."""

    architecture: str
    hf_dir: Path
    gguf: Path
    adapter_dir: Path
    ids: list[int]
    base_logprobs: np.ndarray
    tuned_logprobs: np.ndarray
    hidden_states: tuple[torch.Tensor, ...]  # the base's, as transformers numbers them (0: the embeddings)


def save_hf_model(architecture: str, folder: Path) -> list[int]:
    """The tiny model and its tokenizer (Llama, Gemma 3: SentencePiece's ``tokenizer.model``, which the converter
    reads, and the same vocabulary as transformers' ``tokenizer.json``, which training reads; Qwen2: a byte-level
    BPE ``tokenizer.json``, which both read) into ``folder``; the prompt's token ids."""
    import sentencepiece

    if architecture == "qwen2":
        tokenizer = qwen2_tokenizer()
        torch.manual_seed(0)
        BUILDERS[architecture](len(tokenizer)).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return tokenizer(PROMPT)["input_ids"]
    spm = sentencepiece_model()
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm)
    torch.manual_seed(0)
    BUILDERS[architecture](processor.vocab_size()).eval().save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm)
    transformers_tokenizer(processor, space_prefix=architecture != "gemma3").save_pretrained(folder)
    return [SPECIAL_IDS["bos_token_id"], *processor.encode(PROMPT)]


def save_random_adapter(hf_dir: Path, folder: Path) -> None:
    """A LoRA on every linear layer with random nonzero A and B (PEFT's ``init_lora_weights=False``), its factors
    rounded to f16 values (what the GGUF LoRA stores)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(param.half().float())
    model.save_pretrained(folder)


def transformers_outputs(hf_dir: Path, adapter_dir: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The last position's log-softmax without and with the adapter, and the base's hidden states."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        plain = base(inputs, output_hidden_states=True)
        tuned = PeftModel.from_pretrained(base, adapter_dir).eval()(inputs).logits
    return (
        plain.logits[0, -1].log_softmax(-1).numpy(), tuned[0, -1].log_softmax(-1).numpy(),
        tuple(h[0] for h in plain.hidden_states),
    )


def build_tiny_base(architecture: str, converter: Path, root: Path) -> TinyBase:
    hf_dir, adapter_dir = root / "model", root / "adapter"
    ids = save_hf_model(architecture, hf_dir)
    if architecture == "qwen2":  # llama.cpp's hash table cannot know the tiny BPE: named "qwen2" by a wrapper
        converter = qwen2_converter(converter, root)
    gguf_path = run_converter(converter, hf_dir, root / "model-f32.gguf", "f32")
    save_random_adapter(hf_dir, adapter_dir)
    base_logprobs, tuned_logprobs, hidden = transformers_outputs(hf_dir, adapter_dir, ids)
    return TinyBase(architecture, hf_dir, gguf_path, adapter_dir, ids, base_logprobs, tuned_logprobs, hidden)


def write_pubmedqa_like_data(folder: Path) -> Path:
    """``RECORDS`` as a PubMedQA data folder: ``ori_pqal.json`` and ``test_ground_truth.json`` (the test ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = {
        pubid: {"QUESTION": question, "CONTEXTS": [context], "LABELS": ["METHODS"], "LONG_ANSWER": answer,
                "final_decision": decision}
        for pubid, question, context, answer, decision in RECORDS
    }
    (folder / "ori_pqal.json").write_text(json.dumps(records))
    test_labels = {pubid: records[pubid]["final_decision"] for pubid in TEST_IDS}
    (folder / "test_ground_truth.json").write_text(json.dumps(test_labels))
    return folder


@dataclass
class TrainedLora:
    """An adapter trained by ``scripts.train`` on a tiny base's transformers twin, and what transformers + PEFT
    compute with it for the tiny base's ``ids``."""

    adapter_dir: Path
    tuned_logprobs: np.ndarray


def train_lora(tiny: TinyBase, data: Path, folder: Path) -> TrainedLora:
    """Three optimizer steps of the project's training run, as ``python -m scripts.train --base_model <the .gguf>
    --train_base_model <its transformers folder>`` does them: LoRA on every linear layer of the decoder layers above
    the probe's (Gemma 3 and Qwen2: the default probe depth, so the layer-1 LoRA and a decision probe; Llama:
    ``--probe_depth 0``, LoRA on both layers and no probe), lr 1e-2 (its first step is the cosine schedule's warm-up
    at lr 0). Dev is evaluated at the last step only, so the run's best checkpoint is the trained one: a checkpoint
    after the warm-up step, its LoRA B still zero, could win a tie on three dev questions."""
    from pubmedqa.config import BaseModelSettings
    from scripts.train import train
    from training.arguments import TrainArguments

    args = TrainArguments(
        data=str(data), output_dir=str(folder), train_base_model=str(tiny.hf_dir), dev_size=3, max_steps=3,
        eval_steps=3, logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=256,
        lora_r=4, lora_alpha=8, learning_rate=1e-2, probe_depth=0.0 if tiny.architecture == "llama" else None,
    )
    adapter_dir = train(BaseModelSettings(base_model=str(tiny.gguf), quantization="none"), args)
    _, tuned_logprobs, _ = transformers_outputs(tiny.hf_dir, adapter_dir, tiny.ids)
    return TrainedLora(adapter_dir, tuned_logprobs)


@pytest.fixture(scope="module")
def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py of the installed llama-cpp-python, found as the export finds it."""
    return find_converter("", ModelSettings().cache_dir)


@pytest.fixture(scope="module")
def tiny_base(converter: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyBase]:
    """The tiny base of an architecture, built once per module on first use."""
    built: dict[str, TinyBase] = {}

    def get(architecture: str) -> TinyBase:
        if architecture not in built:
            built[architecture] = build_tiny_base(architecture, converter, tmp_path_factory.mktemp(architecture))
        return built[architecture]

    return get


@pytest.fixture(scope="module")
def trained_lora(
    tiny_base: Callable[[str], TinyBase], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], TrainedLora]:
    """The trained adapter of an architecture's tiny base, trained once per module on first use."""
    trained: dict[str, TrainedLora] = {}
    data = write_pubmedqa_like_data(tmp_path_factory.mktemp("pubmedqa"))

    def get(architecture: str) -> TrainedLora:
        if architecture not in trained:
            root = tmp_path_factory.mktemp(f"{architecture}-trained")
            trained[architecture] = train_lora(tiny_base(architecture), data, root / "adapter")
        return trained[architecture]

    return get


# ------------------------------------------------------------------------------------------------ llama.cpp side
@dataclass
class LlamaCppRun:
    """A tiny GGUF on llama.cpp with a GGUF LoRA loaded beside it, switched on and off as the engine switches it."""

    llm: llama_cpp.Llama
    lora: object

    def set_lora(self, on: bool) -> None:
        if on:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.lora)
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        else:
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """The last position's log-softmax, the prompt decoded from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy())
        return logits.log_softmax(-1).numpy()


@contextlib.contextmanager
def on_llama_cpp(gguf_path: Path, lora_path: Path) -> Iterator[LlamaCppRun]:
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_threads=2, logits_all=False, verbose=False)
    try:
        lora = llama_cpp.llama_adapter_lora_init(llm.model, str(lora_path).encode())
        assert lora, f"llama.cpp refused the GGUF LoRA {lora_path}"
        yield LlamaCppRun(llm, lora)
    finally:
        llm.close()  # the adapter is freed with its model


def adapter_of(tiny: TinyBase, lora: str, trained_lora: Callable[[str], TrainedLora]) -> tuple[Path, np.ndarray]:
    """The ``lora`` ("random" or "trained") adapter of a tiny base, and the last position's log-softmax that
    transformers + PEFT compute with it for the base's ``ids``."""
    if lora == "random":
        return tiny.adapter_dir, tiny.tuned_logprobs
    trained = trained_lora(tiny.architecture)
    return trained.adapter_dir, trained.tuned_logprobs


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("architecture", "lora"), [(a, "random") for a in sorted(BUILDERS)] + [(a, "trained") for a in TRAINED]
)
def test_the_lora_on_llama_cpp_gives_what_peft_gives(
    architecture: str, lora: str, tiny_base: Callable[[str], TinyBase], trained_lora: Callable[[str], TrainedLora],
    tmp_path: Path,
) -> None:
    tiny = tiny_base(architecture)
    adapter_dir, tuned_logprobs = adapter_of(tiny, lora, trained_lora)
    lora_path = cached_gguf_lora(Adapter.resolve(str(adapter_dir)), tiny.gguf, tmp_path)  # the engine's call
    with on_llama_cpp(tiny.gguf, lora_path) as run:
        plain = run.logprobs(tiny.ids)  # no adapter set on the context yet
        run.set_lora(True)
        tuned = run.logprobs(tiny.ids)
        run.set_lora(False)
        base = run.logprobs(tiny.ids)

    effect = max_diff(tuned_logprobs, tiny.base_logprobs)
    base_diff, tuned_diff = max_diff(base, tiny.base_logprobs), max_diff(tuned, tuned_logprobs)
    report = f"{architecture}, {lora} LoRA: effect {effect:.3g}, base diff {base_diff:.3g}, tuned diff {tuned_diff:.3g}"
    logger.info("%s", report)
    assert effect > MIN_EFFECT[lora], report  # the adapter moves the output far beyond the tolerance
    assert np.array_equal(base, plain), report  # switched off, the adapter leaves the base exactly as it was
    assert base_diff < TOLERANCE and tuned_diff < TOLERANCE, report


def test_without_the_qk_permutation_a_llama_lora_misses(
    tiny_base: Callable[[str], TinyBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf

    tiny = tiny_base("llama")
    adapter = Adapter.resolve(str(tiny.adapter_dir))
    right = convert_adapter(adapter, tiny.gguf, tmp_path / "permuted.gguf")
    monkeypatch.setattr(gguf_lora, "llama_permute", lambda weights, n_head, n_head_kv: weights)
    wrong = convert_adapter(adapter, tiny.gguf, tmp_path / "unpermuted.gguf")

    # The two files differ exactly in the B factors of the Q and K projections; A is never permuted.
    right_tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(right).tensors}
    wrong_tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(wrong).tensors}
    differing = sorted(name for name in right_tensors if not np.array_equal(right_tensors[name], wrong_tensors[name]))
    assert differing == sorted(f"blk.{i}.attn_{qk}.weight.lora_b" for i in range(2) for qk in "qk")

    with on_llama_cpp(tiny.gguf, wrong) as run:
        run.set_lora(True)
        miss = max_diff(run.logprobs(tiny.ids), tiny.tuned_logprobs)
    logger.info("llama without the Q/K permutation: tuned diff %.3g", miss)
    assert miss > 25 * TOLERANCE


def test_llama_permute_is_llama_cpps_own_permutation(converter: Path, tmp_path: Path) -> None:
    """The numpy port equals ``LlamaModel.permute`` of the installed llama.cpp's converter, run in its own process
    (its gguf-py must not replace the installed one here), on Q (n_head, n_head) and grouped K (n_head, n_head_kv)
    weights; and permuting B alone permutes the LoRA's product B A as the converter permutes the base weight."""
    n_head, n_head_kv, head_dim, hidden, rank = 8, 2, 16, 96, 4
    rng = np.random.default_rng(0)
    cases = {"q": (n_head * head_dim, n_head), "k": (n_head_kv * head_dim, n_head_kv)}
    lora = {name: (rng.standard_normal((rank, hidden)).astype(np.float32),
                   rng.standard_normal((rows, rank)).astype(np.float32)) for name, (rows, _) in cases.items()}
    np.savez(tmp_path / "in.npz", **{f"{name}_w": b @ a for name, (a, b) in lora.items()})
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, torch
        sys.path.insert(1, "gguf-py")
        from conversion.llama import LlamaModel
        data = np.load({str(tmp_path / "in.npz")!r})
        out = {{name: LlamaModel.permute(torch.from_numpy(data[name + "_w"]), {n_head}, kv).numpy()
               for name, kv in (("q", {n_head}), ("k", {n_head_kv}))}}
        np.savez({str(tmp_path / "out.npz")!r}, **out)
    """)
    subprocess.run([sys.executable, "-c", script], cwd=converter.parent, check=True, capture_output=True, timeout=120)
    reference = np.load(tmp_path / "out.npz")
    for name, (_, kv) in cases.items():
        a, b = lora[name]
        assert np.array_equal(gguf_lora.llama_permute(b @ a, n_head, kv), reference[name])
        assert np.allclose(gguf_lora.llama_permute(b, n_head, kv) @ a, reference[name], atol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_the_llama_cpp_engine_loads_the_adapter(
    architecture: str, tiny_base: Callable[[str], TinyBase], tmp_path: Path
) -> None:
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine

    tiny = tiny_base(architecture)
    settings = ModelSettings(
        base_model=str(tiny.gguf), adapter=str(tiny.adapter_dir), engine="llama.cpp", cache_dir=str(tmp_path)
    )
    assert LlamaCppEngine(settings).load().adapter_loaded


@pytest.mark.parametrize("architecture", sorted(BUILDERS))
def test_probe_features_are_read_from_the_graph(architecture: str, tiny_base: Callable[[str], TinyBase]) -> None:
    """The decision probe's reader finds ``l_out-0`` (decoder layer 0's output) in each architecture's graph."""
    from pubmedqa.engines.llama_cpp_features import open_llama, prompt_features

    tiny = tiny_base(architecture)
    llm, reader = open_llama(str(tiny.gguf), n_ctx=64, n_threads=2, feature_layer=1)
    try:
        assert reader is not None
        got = prompt_features(llm, reader, tiny.ids)
    finally:
        llm.close()
    layer_output = tiny.hidden_states[1]
    expected = torch.cat([layer_output.mean(dim=0), layer_output[-1]]).unsqueeze(0)
    diff = float((got - expected).abs().max())
    logger.info("%s: probe features diff %.3g", architecture, diff)
    assert diff < FEATURE_TOLERANCE[architecture]


def test_the_trained_adapters_are_what_training_writes(
    tiny_base: Callable[[str], TinyBase], trained_lora: Callable[[str], TrainedLora], tmp_path: Path
) -> None:
    """Each trained adapter left its zero start (every LoRA B factor moved), on the layers the run chose, and
    converts to one GGUF LoRA tensor pair per trained projection."""
    import gguf
    from safetensors.torch import load_file

    # Gemma 3 and Qwen2 at the default probe depth; Llama with --probe_depth 0
    expected_layers = {"gemma3": [1], "llama": [0, 1], "qwen2": [1]}
    for architecture in TRAINED:
        tiny, trained = tiny_base(architecture), trained_lora(architecture)
        weights = load_file(trained.adapter_dir / "adapter_model.safetensors")
        b_factors = {name: w for name, w in weights.items() if ".lora_B." in name}
        layers = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in b_factors})
        assert layers == expected_layers[architecture]
        assert len(b_factors) == len(TARGETS) * len(layers)
        assert all(w.abs().max() > 0 for w in b_factors.values()), "a LoRA B factor is still zero"
        assert (trained.adapter_dir / "decision_probe.safetensors").is_file() == (architecture != "llama")
        lora_path = cached_gguf_lora(Adapter.resolve(str(trained.adapter_dir)), tiny.gguf, tmp_path)
        assert len(gguf.GGUFReader(lora_path).tensors) == 2 * len(b_factors)


QUESTION = "Does aspirin reduce the risk of stroke in patients with diabetes?"
CONTEXT = "We studied 120 patients with diabetes and hypertension in a randomized controlled trial."


@pytest.mark.parametrize("architecture", TRAINED)
def test_compare_on_the_llama_cpp_engine_gives_the_base_and_the_fine_tuned_answer(
    architecture: str, tiny_base: Callable[[str], TinyBase], trained_lora: Callable[[str], TrainedLora],
    tmp_path: Path,
) -> None:
    """The trained adapter served as the app serves it (``--base_model <.gguf> --adapter <folder> --engine
    llama.cpp``): a Compare pair (base and fine-tuned side by side, on two contexts) gives each variant's own greedy
    answer, the base one that of an engine without an adapter; the adapter was trained on the very token ids llama.cpp
    reads."""
    from transformers import AutoTokenizer

    from pubmedqa.decisions.options import single_token_options
    from pubmedqa.engines.base import GenerationSettings
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine
    from pubmedqa.prompts import PromptInput
    from pubmedqa.variants import Variant

    tiny = tiny_base(architecture)
    adapter_dir = trained_lora(architecture).adapter_dir

    def served(adapter: str) -> LlamaCppEngine:
        return LlamaCppEngine(
            ModelSettings(base_model=str(tiny.gguf), adapter=adapter, engine="llama.cpp", cache_dir=str(tmp_path))
        )

    engine, plain = served(str(adapter_dir)), served("none")
    loaded = engine.load()
    assert loaded.adapter_loaded, model_status.details(engine)
    settings = GenerationSettings(max_new_tokens=12)  # greedy (temperature 0), the app's other defaults
    question = PromptInput(QUESTION, CONTEXT)
    prompt = engine.prepare(question, settings)
    assert plain.prepare(question, settings) == prompt
    example = prompt.text + " yes. Aspirin lowers the risk."  # a training example: prompt and completion
    trained_on = AutoTokenizer.from_pretrained(tiny.hf_dir)(example)["input_ids"]
    assert trained_on == loaded.tokenizer(example)["input_ids"]

    pair = list(engine.stream_batch([prompt, prompt], [Variant.BASE, Variant.TUNED], settings))[-1]
    alone = [engine.generate(prompt, variant, settings) for variant in (Variant.BASE, Variant.TUNED)]
    without_adapter = plain.generate(prompt, Variant.BASE, settings)
    logger.info("%s, trained LoRA: base %r, fine-tuned %r", architecture, *alone)
    assert all(alone) and alone[0] != alone[1]  # the adapter changes the greedy answer
    assert pair == alone
    assert alone[0] == without_adapter  # switched off, the adapter leaves the base exactly as it was
    assert engine.generate(prompt, Variant.BASE, settings) == without_adapter  # and after the fine-tuned answers

    # The options are one token each on every architecture, as the model reads them after "Answer:" (a SentencePiece
    # vocabulary that adds a word boundary in front of a text does not split " yes" into "▁" + "▁yes"; the byte-level
    # BPE reads " yes" as "Ġyes").
    example = prompt.text + " yes"
    assert single_token_options(loaded.tokenizer) == [loaded.tokenizer(example)["input_ids"][-1:]] + [
        loaded.tokenizer(prompt.text + " " + option)["input_ids"][-1:] for option in ("no", "maybe")
    ]
    if architecture != "llama":  # decided by the probe the training run fitted (default probe depth)
        assert loaded.policy.feature_layer == 1 and "decision probe on layer 1" in model_status.details(engine)
    scored = engine.score_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED])
    answers, decided = engine.generate_with_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED], settings)
    assert answers == alone
    for got, want in zip(decided, scored):
        assert got == pytest.approx(want, abs=1e-5)
    assert plain.score_decisions([prompt], [Variant.BASE]) == [scored[0]]
    assert scored[1] != pytest.approx(scored[0], abs=1e-3)


# --------------------------------------------------------------------------------------------- refusals (no llama.cpp)
def write_gguf(path: Path, architecture: str, shapes: dict[str, tuple[int, ...]], **keys: object) -> Path:
    """A GGUF model file with these tensor shapes (ggml order, zeros) and ``{architecture}.<key>`` values."""
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(2)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_architecture_without_a_known_layout_is_refused_in_one_line(
    tiny_base: Callable[[str], TinyBase], tmp_path: Path
) -> None:
    tiny = tiny_base("llama")
    base = write_gguf(tmp_path / "phi3.gguf", "phi3", read_base_gguf(tiny.gguf).tensor_shapes, head_count=4)
    with pytest.raises(LoraConversionError) as refused:
        convert_adapter(Adapter.resolve(str(tiny.adapter_dir)), base, tmp_path / "lora.gguf")
    message = str(refused.value)
    assert "'phi3' is not supported" in message and "llama, qwen2" in message and "\n" not in message


def test_a_llama_base_with_per_layer_head_counts_is_refused(
    tiny_base: Callable[[str], TinyBase], tmp_path: Path
) -> None:
    tiny = tiny_base("llama")
    real = read_base_gguf(tiny.gguf)
    assert (real.head_count, real.head_count_kv) == (4, 2)
    base = write_gguf(tmp_path / "layered.gguf", "llama", real.tensor_shapes, head_count=4, head_count_kv=[2, 2])
    assert read_base_gguf(base).head_count_kv is None  # an array is not read as its length
    with pytest.raises(LoraConversionError, match="no single attention head count"):
        convert_adapter(Adapter.resolve(str(tiny.adapter_dir)), base, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()


def test_a_graph_without_the_layer_output_is_refused_by_architecture() -> None:
    from pubmedqa.engines.llama_cpp_features import HiddenStateReader

    with pytest.raises(RuntimeError, match=r"no l_out-2 was computed .*llama.cpp's mamba graph"):
        HiddenStateReader(3, "mamba").features()
