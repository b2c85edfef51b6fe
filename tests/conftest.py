"""Shared fixtures: a tiny random-weight Gemma 3 model with its own tokenizer and a LoRA adapter, built in the test
session (no download), and helpers to serve the app on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from pubmedqa.adapter_metadata import AdapterMetadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The product reads PubMedQA from the Hub by default; the tests read the local copy, named by the product's own
# variables (CI sets PUBMEDQA_DATA; a developer's checkout beside ../shared needs nothing).
DATA_DIR = Path(os.environ.get("PUBMEDQA_DATA") or REPO_ROOT.parent / "shared" / "data" / "pubmedqa")
os.environ["PUBMEDQA_DATA"] = str(DATA_DIR)
os.environ.setdefault("PUBMEDQA_EVIDENCE_LOCAL_DATA", str(DATA_DIR))

_CORPUS = [
    "Answer the biomedical research question with yes, no or maybe, then explain the answer.",
    "Question: Does aspirin reduce the risk of myocardial infarction? Answer: yes. Aspirin lowers the risk.",
    "Context: We studied 120 patients with diabetes and hypertension in a randomized controlled trial.",
    "Is ultrasound equal to X-ray in pediatric fracture diagnosis? maybe. The results were inconclusive.",
    "no. The treatment did not improve survival in elderly patients with heart failure.",
]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # every projection a multiple of 64 rows, as bitsandbytes' CPU 4-bit kernels need
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero random weights, so the fine-tuned variant really differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-adapter")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)
    # As `scripts.train` records an adapter on every layer: no layer left for a decision probe.
    AdapterMetadata(probe_layer=None, prompt_budget=2048, base_quantization="none").save(path)
    return path


@pytest.fixture
def tiny_settings(tiny_model_dir, tiny_adapter_dir):
    from pubmedqa.config import ModelSettings

    return ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none")


@pytest.fixture
def tiny_engine(tiny_settings):
    from pubmedqa.engines.transformers_engine import TransformersEngine

    return TransformersEngine(tiny_settings)


def embedded_llama_engine():
    """The llama.cpp engine on the real embedded GGUF with the shipped adapter (no tiny GGUF exists; this one is
    small and fast); skips where llama-cpp-python is not installed."""
    pytest.importorskip("llama_cpp")
    from pubmedqa.config import SHIPPED_ADAPTER_DIR, ModelSettings
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine

    return LlamaCppEngine(ModelSettings(adapter=str(SHIPPED_ADAPTER_DIR), engine="llama.cpp"))


@pytest.fixture(params=["transformers", "llama.cpp"])
def each_engine(request, tiny_settings):
    """Both in-process engines, for the tests of what users and API callers see: transformers on the tiny random
    model, llama.cpp on the embedded GGUF."""
    from pubmedqa.engines.transformers_engine import TransformersEngine

    return TransformersEngine(tiny_settings) if request.param == "transformers" else embedded_llama_engine()


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet http.server handler with a JSON reply helper, for small fake servers in tests."""

    def reply(self, payload) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first: what the timeout tests want

    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(demo) -> Iterator[str]:
    """Serve a built app on a free localhost port for the duration of the block; yields its URL."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, str, dict]]:
    """``huggingface_hub.HfApi`` replaced by a recorder: each ``create_repo`` / ``upload_folder`` call, as
    (method, repo id, keyword arguments), in order. Nothing reaches the Hub."""
    calls: list[tuple[str, str, dict]] = []

    class RecordingHubApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHubApi)
    return calls


@pytest.fixture(scope="session")
def pubmedqa_dir() -> Path:
    if not (DATA_DIR / "ori_pqal.json").is_file():
        pytest.skip(f"PubMedQA data not found in {DATA_DIR} (set PUBMEDQA_DATA)")
    return DATA_DIR
