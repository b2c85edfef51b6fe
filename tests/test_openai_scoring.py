"""What the field's evaluation tools need of the served model: ``/v1/completions`` with ``echo`` + ``logprobs``
aligned as OpenAI-style servers align them (token-id and text prompts, ``max_tokens: 0``), the tokenizer endpoints,
and lm-evaluation-harness's ``local-completions`` model run against the app with the shipped PubMedQA task."""

from __future__ import annotations

import httpx
import pytest
import torch

from app.openai_api import ADAPTER_MODEL_NAME, BASE_MODEL_NAME
from pubmedqa.engines.transformers_engine import ADAPTER_NAME, BASE_ADAPTER_NAME
from pubmedqa.engines.transformers_passes import _forward
from pubmedqa.variants import Variant
from tests.conftest import REPO_ROOT
from tests.test_openai_api import LIMITS, _engine, _error, app_server

MODELS = {BASE_MODEL_NAME: Variant.BASE, ADAPTER_MODEL_NAME: Variant.TUNED}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir):
    engine = _engine(tiny_model_dir, tiny_adapter_dir)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def root(engine):
    with app_server(engine) as (root, _):
        yield root


def _by_hand(engine, ids: list[int], variant: Variant) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward pass of the model (no chunks, no top-k)."""
    model = engine.load().model
    names = [ADAPTER_NAME if variant is Variant.TUNED else BASE_ADAPTER_NAME]
    with torch.inference_mode():
        logits = _forward(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), len(ids), names)[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _complete(root: str, **body) -> dict:
    response = httpx.post(f"{root}/v1/completions", json={"temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", list(MODELS))
def test_echoed_logprobs_are_aligned_as_the_harness_reads_them(engine, root, model):
    tokenizer = engine.load().tokenizer
    context, continuation = "Question: Does aspirin help?\nAnswer:", " yes"
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctxlen = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    want = _by_hand(engine, ids, MODELS[model])
    body = _complete(root, model=model, prompt=ids, max_tokens=1, echo=True, logprobs=1)
    lp = body["choices"][0]["logprobs"]
    # One entry per prompt token as sent (no BOS added), then the generated token.
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:-1] == pytest.approx(want, abs=1e-4)
    harness = sum(lp["token_logprobs"][ctxlen:-1])  # lm-evaluation-harness's own reading
    assert harness == pytest.approx(sum(want[ctxlen - 1:]), abs=1e-3)
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert value in top.values() and max(top.values()) >= value  # the token itself, and the most likely one
    assert lp["text_offset"] == sorted(lp["text_offset"]) and body["choices"][0]["text"].startswith(
        "".join(lp["tokens"][:-1]))
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}

    # max_tokens 0: the prompt scored, nothing generated; a batch of token-id prompts, one choice each.
    scored = _complete(root, model=model, prompt=[ids, ids[:5]], max_tokens=0, echo=True, logprobs=2)
    first, second = (c["logprobs"] for c in sorted(scored["choices"], key=lambda c: c["index"]))
    assert first["token_logprobs"][1:] == pytest.approx(want, abs=1e-4) and len(second["tokens"]) == 5
    assert all(len(top) >= 2 for top in first["top_logprobs"][1:]) and scored["usage"]["completion_tokens"] == 0


def test_a_text_prompt_is_read_with_its_bos_but_echoed_as_sent(engine, root):
    tokenizer = engine.load().tokenizer
    prompt = "Question: Is ultrasound as accurate as X-ray?\nAnswer: no"
    read = tokenizer(prompt)["input_ids"]  # with the BOS in front, as vLLM reads a text
    want = _by_hand(engine, read, Variant.BASE)
    lp = _complete(root, model=BASE_MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)["choices"][0][
        "logprobs"]
    added = len(read) - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert len(lp["tokens"]) == len(read) - added and "".join(lp["tokens"]) == prompt and lp["text_offset"][0] == 0
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == pytest.approx(want[added:], abs=1e-4)


@pytest.mark.parametrize("body, message", [
    ({"prompt": [1, "2"]}, "must be a string, a list of strings, a list of token ids"),
    ({"prompt": [1.5, 2]}, "list of token ids"),
    ({"prompt": [True, 2]}, "list of token ids"),
    ({"prompt": [10**9]}, "outside the vocabulary"),
    ({"prompt": [-1, 2]}, "is negative"),
    ({"prompt": [5] * 100_000}, "token ids long; the limit is"),
    ({"prompt": []}, "empty"),
    ({"prompt": [[]]}, "empty"),
    ({"prompt": [[1, 2], []]}, "empty"),
    ({"prompt": [1, 2], "echo": True, "logprobs": 21}, "'logprobs' must be between 0 and 20"),
    ({"prompt": [1, 2], "echo": True, "max_tokens": 0}, "needs 'logprobs'"),
    ({"prompt": [1, 2], "max_tokens": 0}, "1 to 64"),
])
def test_bad_token_prompts_get_400_with_a_clear_message(root, body, message):
    response = httpx.post(f"{root}/v1/completions", json={"model": BASE_MODEL_NAME, "max_tokens": 1, **body},
                          timeout=60)
    assert message in _error(response, 400)["message"]


def test_the_tokenizer_endpoints_answer_as_vllm_and_llama_cpp_do(engine, root, monkeypatch):
    tokenizer = engine.load().tokenizer
    text = "Does aspirin help?"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    got = httpx.post(f"{root}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert got["tokens"] == plain and got["count"] == len(plain) and got["max_model_len"] > 0
    assert httpx.post(f"{root}/tokenize", json={"content": text}).json()["tokens"] == plain  # llama.cpp's keys
    assert httpx.post(f"{root}/tokenize", json={"prompt": text}).json()["tokens"] == tokenizer(text)["input_ids"]
    pieces = httpx.post(f"{root}/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == text
    back = httpx.post(f"{root}/detokenize", json={"tokens": plain}).json()
    assert back["prompt"] == back["content"] == tokenizer.decode(plain, skip_special_tokens=False)
    info = httpx.get(f"{root}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["vocab_size"] == len(tokenizer)
    for path, body, message in [
        ("/tokenize", {"prompt": 5}, "must be a string"),
        ("/tokenize", {"prompt": "x" * 200_001}, "the limit is 200,000"),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, "not tokenized here"),
        ("/detokenize", {"tokens": ["a"]}, "list of token ids"),
        ("/detokenize", {"tokens": [len(tokenizer)]}, "outside the vocabulary"),
    ]:
        assert message in _error(httpx.post(f"{root}{path}", json=body), 400)["message"]


def test_the_tokenizer_endpoints_need_the_api_key_when_one_is_set(engine, monkeypatch):
    monkeypatch.setenv("PUBMEDQA_API_KEY", "s3cret")
    with app_server(engine) as (root, _):
        assert _error(httpx.get(f"{root}/tokenizer_info"), 401)["code"] == "invalid_api_key"
        assert _error(httpx.post(f"{root}/tokenize", json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
        ok = httpx.post(f"{root}/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_eval_scores_the_shipped_pubmedqa_task_through_the_app_as_the_engine_does(
    engine, root, pubmedqa_dir, tokenized
):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tokenizer = engine.load().tokenizer
    tasks = TaskManager(include_path=str(REPO_ROOT / "lm_eval_tasks"), metadata={"data": str(pubmedqa_dir)})
    for model, variant in MODELS.items():
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=["pubmedqa_test"], limit=20, task_manager=tasks, log_samples=True,
            model_args={"base_url": f"{root}/v1/completions", "model": model, "tokenized_requests": tokenized,
                        "max_length": LIMITS.max_context_chars, "num_concurrent": 1, "max_retries": 1},
        )
        samples = results["samples"]["pubmedqa_test"]
        assert len(samples) == 20 and 0 <= results["results"]["pubmedqa_test"]["acc,none"] <= 1
        for sample in samples[:4]:  # each choice's log-likelihood, as the engine itself gives it
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
                whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
                n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
                read = whole if tokenized else tokenizer(context + continuation)["input_ids"]  # with its BOS
                skip = len(read) - len(whole)
                want = sum(_by_hand(engine, read, variant)[skip + n_context - 1:])
                assert resp[0][0] == pytest.approx(want, abs=1e-3)
