"""The decision probe: a logistic regression on the base model's mid-layer hidden states that decides the fine-tuned
variant's yes/no/maybe. It must learn what it is shown, read exactly the features it was fitted on (padding left
out), decide the fine-tuned rows in scoring and in generation alike while the base rows stay untouched, and be
refused or ignored, with a message, where it cannot apply."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from app import model_status
from pubmedqa.adapter import PROBE_FILE, Adapter
from pubmedqa.adapter_metadata import AdapterMetadata
from pubmedqa.config import ModelSettings
from pubmedqa.decisions.calibration import load_calibration
from pubmedqa.decisions.fitting import ProbeFitError, fit_probe
from pubmedqa.decisions.probe import DecisionProbe, ProbeError, load_probe, probe_layer
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.engines.transformers_passes import ProbeReader, left_pad
from pubmedqa.prompts import ANSWER_OPTIONS, PromptInput, fit_prompt
from pubmedqa.variants import Variant
from scripts import calibrate, decision_probe
from training.decision_features import collect_features

QUESTIONS = [
    "Does aspirin reduce fever in children?", "Is ultrasound equal to X-ray in fracture diagnosis?",
    "Do statins prevent stroke?", "Is coffee linked to heart failure?", "Does exercise improve survival?",
    "Are antibiotics useful for viral infections?",
]


@pytest.fixture(scope="module")
def upper_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model's upper layer only, as `scripts.train` makes them (--probe_depth)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("upper-adapter")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                        init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(path)
    AdapterMetadata(probe_layer=1, prompt_budget=2048, base_quantization="none").save(path)
    return path


@pytest.fixture
def adapter_copy(upper_adapter_dir, tmp_path):
    return shutil.copytree(upper_adapter_dir, tmp_path / "adapter")


def _engine(tiny_model_dir, adapter) -> TransformersEngine:
    return TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(adapter), quantization="none"))


def test_probe_depth_maps_to_a_layer_strictly_inside_the_model():
    assert probe_layer(18, 0.55) == 10 and probe_layer(2, 0.55) == 1 and probe_layer(40, 0.55) == 22
    assert probe_layer(18, 0.01) == 1 and probe_layer(18, 0.99) == 17 and probe_layer(18, 0) is None
    with pytest.raises(ValueError):
        probe_layer(18, 1.0)


def test_the_probe_learns_a_planted_direction_and_cross_validates_it():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)) * 5 + 3  # not standardised: the probe must fold its scaling back
    gold = [ANSWER_OPTIONS[i] for i in np.argmax(features[:, :3], axis=1)]
    probe, calibration = fit_probe(features, gold, layer=1, fitted_on="synthetic")
    assert probe.details["cross_validated"]["accuracy"] > 0.85 and probe.details["cross_validated"]["pairwise_auc"] > 0.9
    assert set(probe.details["cv_auc_by_l2"]) == {"0.1", "0.3", "1", "3"}
    held_out = rng.normal(size=(200, 16)) * 5 + 3
    predicted = probe.logits(torch.from_numpy(held_out)).argmax(dim=1).numpy()
    assert np.mean(predicted == np.argmax(held_out[:, :3], axis=1)) > 0.85
    assert calibration.fitted_on == "synthetic, out of fold" and calibration.log_offsets["yes"] == 0.0

    # Two labels only: the third is never predicted.
    two = ["yes" if g == "yes" else "no" for g in gold]
    probe, _ = fit_probe(features, two, layer=1, fitted_on="synthetic")
    assert set(probe.logits(torch.from_numpy(held_out)).argmax(dim=1).tolist()) <= {0, 1}
    with pytest.raises(ProbeFitError, match="two different decisions"):
        fit_probe(features, ["yes"] * 300, layer=1, fitted_on="synthetic")


def test_a_mean_probe_reads_the_first_half_of_the_features_and_a_mean_and_last_probe_all_of_them(tmp_path):
    """Engines hand over [mean | last]; the signal planted in the last-token half is lost to a "mean" probe only."""
    rng = np.random.default_rng(2)
    mean, last = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    gold = [ANSWER_OPTIONS[i] for i in np.argmax(last[:, :3], axis=1)]
    features = np.concatenate([mean, last], axis=1)
    both, _ = fit_probe(features, gold, layer=1, fitted_on="synthetic", pooling="mean+last")
    mean_only, _ = fit_probe(features, gold, layer=1, fitted_on="synthetic", pooling="mean")
    assert both.weight.shape == (3, 16) and mean_only.weight.shape == (3, 8)
    assert both.details["cross_validated"]["accuracy"] > 0.85 > 0.5 > mean_only.details["cross_validated"]["accuracy"]
    assert both.details["pooling"] == "mean+last"

    both.save(tmp_path)  # the pooling travels with the file, and decides which features the loaded probe reads
    loaded = DecisionProbe.load(tmp_path / PROBE_FILE)
    assert loaded.pooling == "mean+last"
    torch.testing.assert_close(loaded.logits(torch.from_numpy(features)), both.logits(torch.from_numpy(features)))
    loaded.check(num_layers=2, hidden_size=8)
    with pytest.raises(ProbeError, match="this model has 2 layers of 16"):
        loaded.check(num_layers=2, hidden_size=16)  # a mean probe's width on a model twice as wide
    with pytest.raises(ProbeFitError, match="unknown pooling"):
        fit_probe(features, gold, layer=1, fitted_on="synthetic", pooling="max")


def test_a_probe_file_without_a_pooling_reads_the_mean_and_an_unknown_pooling_is_refused(tmp_path):
    from safetensors.torch import save_file

    tensors = {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}
    options = '["yes", "no", "maybe"]'
    save_file(tensors, str(tmp_path / "old.safetensors"), {"layer": "1", "options": options})
    old = DecisionProbe.load(tmp_path / "old.safetensors")
    assert old.pooling == "mean"
    torch.testing.assert_close(old.logits(torch.cat([torch.ones(1, 4), torch.full((1, 4), 100.0)], dim=1)),
                               torch.full((1, 3), 4.0))  # the last-token half is not read
    save_file(tensors, str(tmp_path / "odd.safetensors"), {"layer": "1", "options": options, "pooling": "max"})
    with pytest.raises(ProbeError, match="unknown pooling 'max'"):
        DecisionProbe.load(tmp_path / "odd.safetensors")


def test_the_reader_averages_the_layer_over_real_tokens_only_and_keeps_the_last_one(tiny_model_dir, upper_adapter_dir):
    loaded = _engine(tiny_model_dir, upper_adapter_dir).load()
    model, tokenizer = loaded.model, loaded.tokenizer
    short, long = tokenizer("Does aspirin help?")["input_ids"], tokenizer("Is coffee linked to heart failure in adults?")["input_ids"]
    ids, mask = left_pad(tokenizer, [short, long], torch.device("cpu"))
    with torch.inference_mode(), ProbeReader(model, 1) as reader:
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long), logits_to_keep=1)
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([short]), output_hidden_states=True).hidden_states[1][0].float()
    batched, single = reader.pooled
    torch.testing.assert_close(batched[0], single[0], atol=1e-5, rtol=1e-4)  # the left padding is not averaged in
    torch.testing.assert_close(single[0], torch.cat([hidden.mean(dim=0), hidden[-1]]), atol=1e-5, rtol=1e-4)

    # Padded on the right, the last real token is still the one kept.
    ids, mask = left_pad(tokenizer, [short, long], torch.device("cpu"))
    right_ids = torch.stack([torch.roll(ids[0], -int((mask[0] == 0).sum())), ids[1]])
    right_mask = torch.stack([torch.roll(mask[0], -int((mask[0] == 0).sum())), mask[1]])
    with torch.inference_mode(), ProbeReader(model, 1) as reader:
        model(input_ids=right_ids, attention_mask=right_mask, logits_to_keep=1)
    torch.testing.assert_close(reader.pooled[0][0], single[0], atol=1e-4, rtol=1e-3)


def test_the_probe_decides_the_tuned_rows_in_scoring_and_generation_alike(tiny_model_dir, adapter_copy):
    engine = _engine(tiny_model_dir, adapter_copy)
    loaded = engine.load()
    prompts = [fit_prompt(PromptInput(q), loaded.tokenizer, 256) for q in QUESTIONS]
    variants = [Variant.BASE] * len(prompts) + [Variant.TUNED] * len(prompts)
    before = engine.score_decisions(prompts * 2, variants)
    features = collect_features(loaded.model, loaded.tokenizer, [p.text for p in prompts], layer=1)
    rng = np.random.default_rng(1)
    probe = DecisionProbe(
        1, torch.from_numpy(rng.normal(size=(3, features.shape[1]))).float(), torch.zeros(3), {}, "mean+last"
    )
    probe.save(adapter_copy)

    reloaded = _engine(tiny_model_dir, adapter_copy)
    assert reloaded.load().policy.probe is not None and "decision probe on layer 1" in model_status.details(reloaded)
    after = reloaded.score_decisions(prompts * 2, variants, batch_size=4)
    expected = torch.softmax(probe.logits(torch.from_numpy(features)), dim=1).numpy()
    tuned = np.array([[p[o] for o in ANSWER_OPTIONS] for p in after[len(prompts):]])
    np.testing.assert_allclose(tuned, expected, atol=1e-4)
    base_after, base_before = ([[p[o] for o in ANSWER_OPTIONS] for p in rows[: len(prompts)]] for rows in (after, before))
    np.testing.assert_allclose(base_after, base_before, atol=1e-5)  # base rows: no probe

    # One generation pass gives the same decisions, and the answers start with them.
    settings = GenerationSettings(max_new_tokens=3)
    texts, decisions = reloaded.generate_with_decisions(prompts * 2, variants, settings)
    for got, want in zip(decisions, after):
        assert [got[o] for o in ANSWER_OPTIONS] == pytest.approx([want[o] for o in ANSWER_OPTIONS], abs=1e-4)
    bias = torch.tensor([0.0, 0.0, 40.0])  # "maybe" wins whatever the features say
    DecisionProbe(1, probe.weight, bias, {}, "mean+last").save(adapter_copy)
    texts, decisions = _engine(tiny_model_dir, adapter_copy).generate_with_decisions(prompts * 2, variants, settings)
    assert all(t.startswith("maybe") for t in texts[len(prompts):])
    assert all(max(d, key=d.get) == "maybe" for d in decisions[len(prompts):])


def test_the_probe_cli_fits_on_train_and_dev_and_writes_probe_and_calibration(
    tiny_model_dir, adapter_copy, pubmedqa_dir, caplog
):
    code = decision_probe.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter",
                                str(adapter_copy), "--data", str(pubmedqa_dir), "--batch_size", "50"])
    assert code == 0
    probe = load_probe(Adapter.resolve(str(adapter_copy)))
    assert probe.layer == 1 and probe.details["questions"] == 500
    calibration = load_calibration(Adapter.resolve(str(adapter_copy)))
    assert calibration.fitted_on == "train + dev (500 questions, none (float32)), out of fold"
    engine = _engine(tiny_model_dir, adapter_copy)
    assert engine.load().adapter_loaded
    assert "decisions calibrated on train + dev (500 questions" in model_status.details(engine)

    # Dev-only offsets would replace the out-of-fold ones: the dev calibration command points to this one instead.
    assert calibrate.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter", str(adapter_copy),
                           "--data", str(pubmedqa_dir)]) == 2
    assert "decides with its decision probe" in caplog.text and load_calibration(Adapter.resolve(str(adapter_copy))) == calibration

    # --no_calibrate removes offsets that were fitted for other scores.
    assert decision_probe.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter",
                                str(adapter_copy), "--data", str(pubmedqa_dir), "--batch_size", "50", "--no_calibrate"]) == 0
    assert load_calibration(Adapter.resolve(str(adapter_copy))) is None


def test_the_cli_refuses_an_adapter_that_trains_every_layer(tiny_model_dir, tiny_adapter_dir, pubmedqa_dir, caplog):
    assert decision_probe.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter",
                                str(tiny_adapter_dir), "--data", str(pubmedqa_dir)]) == 2
    assert "trains every decoder layer" in caplog.text and "--probe_depth" in caplog.text
    assert not (tiny_adapter_dir / PROBE_FILE).exists()
    assert decision_probe.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter", "none"]) == 2
    assert "local adapter folder" in caplog.text


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(b"not a safetensors file"), "is not a decision probe"),
    (lambda path: DecisionProbe(1, torch.zeros(3, 7), torch.zeros(3)).save(path.parent), "this model has 2 layers of 64"),
    (lambda path: DecisionProbe(5, torch.zeros(3, 64), torch.zeros(3)).save(path.parent), "reads layer 5"),
])
def test_an_unusable_probe_is_ignored_with_a_warning_and_the_adapter_still_serves(
    tiny_model_dir, adapter_copy, caplog, write, message
):
    write(adapter_copy / PROBE_FILE)
    engine = _engine(tiny_model_dir, adapter_copy)
    loaded = engine.load()
    assert loaded.adapter_loaded and loaded.policy.probe is None
    assert message in caplog.text and "Ignoring the adapter's decision probe" in caplog.text
    prompt = fit_prompt(PromptInput(QUESTIONS[0]), loaded.tokenizer, 256)
    assert isinstance(engine.generate(prompt, Variant.TUNED, GenerationSettings(max_new_tokens=2)), str)


def _small_pqa_l(pubmedqa_dir, folder, n):
    """The first ``n`` non-test PQA-L questions plus the official test list (whose questions are absent): a data
    folder the split reads as it reads the real one."""
    import json

    raw = json.loads((pubmedqa_dir / "ori_pqal.json").read_text())
    test_ids = json.loads((pubmedqa_dir / "test_ground_truth.json").read_text())
    kept = dict([item for item in raw.items() if item[0] not in test_ids][:n])
    folder.mkdir()
    (folder / "ori_pqal.json").write_text(json.dumps(kept))
    (folder / "test_ground_truth.json").write_text(json.dumps({}))
    return folder


@pytest.mark.e2e
def test_the_cli_fits_a_probe_on_llama_cpp_features_which_that_engine_alone_prefers(pubmedqa_dir, tmp_path, caplog):
    pytest.importorskip("llama_cpp")
    from pubmedqa.config import SHIPPED_ADAPTER_DIR
    from pubmedqa.decisions.policy import DecisionPolicy
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine

    adapter = tmp_path / "adapter"
    shutil.copytree(SHIPPED_ADAPTER_DIR, adapter)
    for name in ("decision_probe.llama-cpp.safetensors", "decision_calibration.llama-cpp.json"):
        (adapter / name).unlink(missing_ok=True)
    shared = (adapter / PROBE_FILE).read_bytes()
    data = _small_pqa_l(pubmedqa_dir, tmp_path / "data", 40)

    code = decision_probe.main(["--adapter", str(adapter), "--data", str(data), "--dev_size", "10", "--engine", "llama.cpp"])
    assert code == 0, caplog.text
    own = load_probe(Adapter.resolve(str(adapter)), "llama.cpp")
    assert own is not None and own.layer == 10 and own.details["questions"] == 40
    assert own.details["fitted_on"] == "train + dev (40 questions, Q4_K_M GGUF, llama.cpp)"
    assert (adapter / PROBE_FILE).read_bytes() == shared  # the training engine's pair is left as it was

    # llama.cpp serves with its own pair; the transformers engine keeps the shared one.
    engine = LlamaCppEngine(ModelSettings(adapter=str(adapter), engine="llama.cpp"))
    policy = engine.load().policy
    assert torch.equal(policy.probe.weight, own.weight)
    assert policy.calibration == load_calibration(Adapter.resolve(str(adapter)), "llama.cpp")
    assert "(40 questions, Q4_K_M GGUF, llama.cpp)" in policy.calibration.fitted_on
    shared = Adapter.resolve(str(adapter))
    assert torch.equal(DecisionPolicy.from_adapter(shared, "transformers").probe.weight, load_probe(shared).weight)

    # It is what decides the engine's fine-tuned rows: a planted llama.cpp probe that always says "maybe" does.
    assert own.pooling == "mean+last" and own.weight.shape == (3, 2 * 640)
    planted_probe = DecisionProbe(10, torch.zeros(3, 2 * 640), torch.tensor([0.0, 0.0, 30.0]), pooling="mean+last")
    planted_probe.save(adapter, "llama.cpp")
    (adapter / "decision_calibration.llama-cpp.json").unlink()
    planted = LlamaCppEngine(ModelSettings(adapter=str(adapter), engine="llama.cpp"))
    prompt = planted.prepare(PromptInput(QUESTIONS[2]), GenerationSettings(max_new_tokens=4))
    decided = planted.score_decisions([prompt], [Variant.TUNED])[0]
    assert max(decided, key=decided.get) == "maybe" and planted.load().policy.calibration is None
