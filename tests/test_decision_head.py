"""The decision head: a logistic-regression correction of the option rows, shipped as a rank-3 LoRA on the output
layer. It must learn what the model's own logits miss, load back through the registry with exactly the fitted
scores, leave the base model and every other token alone, and refit rather than stack."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from app.backend import Variant
from app.calibration import load_calibration
from app.config import ModelSettings
from app.prompts import PromptInput, fit_prompt
from app.registry import ModelRegistry
from app.scoring import single_token_options
from training import decision_head
from training.decision_head import DecisionFeatures, DecisionHeadError

QUESTIONS = [
    "Does aspirin reduce fever in children?", "Is ultrasound equal to X-ray in fracture diagnosis?",
    "Do statins prevent stroke?", "Is coffee linked to heart failure?", "Does exercise improve survival?",
    "Are antibiotics useful for viral infections?", "Does sleep affect memory?", "Is surgery better than therapy?",
]
GOLD = ["yes", "no", "maybe", "yes", "no", "maybe", "yes", "no"]


def test_the_head_learns_a_direction_the_model_logits_miss():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(300, 16))
    gold = [("yes", "no", "maybe")[i] for i in np.argmax(hidden[:, :3], axis=1)]
    uninformative = DecisionFeatures(hidden, np.zeros((300, 3)))
    head = decision_head.fit_head(DecisionFeatures(hidden[:200], np.zeros((200, 3))), gold[:200], l2=1e-3)
    held_out = DecisionFeatures(hidden[200:], np.zeros((100, 3)))
    predicted = [max(p, key=p.get) for p in head.probabilities(held_out)]
    assert np.mean([p == g for p, g in zip(predicted, gold[200:])]) > 0.9
    assert head.bias[0] == 0.0  # intercepts relative to "yes", as the calibration stores them
    chosen = decision_head.choose_head(uninformative, gold, uninformative, gold)
    assert set(chosen.dev_auc_by_l2) == {"0.001", "0.01", "0.1", "1"}


@pytest.fixture
def adapter_copy(tiny_adapter_dir, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, path)
    return path


def _registry(tiny_model_dir, adapter):
    return ModelRegistry(ModelSettings(base_model=str(tiny_model_dir), adapter=str(adapter), quantization="none"))


def test_an_attached_head_scores_exactly_as_fitted_and_leaves_the_base_alone(tiny_model_dir, adapter_copy):
    registry = _registry(tiny_model_dir, adapter_copy)
    loaded = registry.load()
    prompts = [fit_prompt(PromptInput(q), loaded.tokenizer, 256) for q in QUESTIONS]
    variants = [Variant.BASE] * len(prompts) + [Variant.TUNED] * len(prompts)
    before = registry.score_decisions(prompts * 2, variants, calibrated=False)
    features = decision_head.collect_features(loaded.model, loaded.tokenizer, [p.text for p in prompts])
    head = decision_head.fit_head(features, GOLD, l2=1e-4)
    option_ids = [ids[0] for ids in single_token_options(loaded.tokenizer)]
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    decision_head.attach_head(adapter_copy, head, option_ids, decision_head.output_layer_name(loaded.model), vocab)

    reloaded = _registry(tiny_model_dir, adapter_copy)
    after = reloaded.score_decisions(prompts * 2, variants, calibrated=False)
    expected = torch.softmax(torch.from_numpy(head.option_logits(features)), dim=1).numpy()
    tuned = np.array([[p[o] for o in ("yes", "no", "maybe")] for p in after[len(prompts):]])
    np.testing.assert_allclose(tuned, expected, atol=1e-4)
    assert after[: len(prompts)] == pytest.approx(before[: len(prompts)], abs=1e-6)  # base rows: no head
    assert not np.allclose(tuned, [[p[o] for o in ("yes", "no", "maybe")] for p in before[len(prompts):]], atol=1e-3)

    # Refitting replaces the head instead of stacking on it: features are read as if it were not there.
    again = decision_head.collect_features(reloaded.load().model, loaded.tokenizer, [p.text for p in prompts])
    np.testing.assert_allclose(again.option_logits, features.option_logits, atol=1e-4)
    decision_head.attach_head(adapter_copy, head, option_ids, "lm_head", vocab)
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    assert config["target_modules"].count("lm_head") == 1 and config["rank_pattern"]["lm_head"] == 3

    # For vLLM / TGI: the same adapter without its head scores exactly as before the head was attached.
    plain = decision_head.export_without_head(adapter_copy, adapter_copy.parent / "plain")
    without = _registry(tiny_model_dir, plain).score_decisions(prompts * 2, variants, calibrated=False)
    assert without == pytest.approx(before, abs=1e-6)
    assert "lm_head" not in json.loads((plain / "adapter_config.json").read_text())["target_modules"]
    with pytest.raises(DecisionHeadError, match="not empty"):
        decision_head.export_without_head(adapter_copy, plain)


def test_head_cli_fits_on_train_picks_on_dev_and_writes_the_calibration(tiny_model_dir, adapter_copy, pubmedqa_dir):
    code = decision_head.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter",
                               str(adapter_copy), "--data", str(pubmedqa_dir), "--batch_size", "50"])
    assert code == 0
    calibration = load_calibration(str(adapter_copy))
    assert calibration.fitted_on.startswith("dev (50 questions")
    head = calibration.details["decision_head"]
    assert head["l2"] in (1e-3, 1e-2, 1e-1, 1.0) and len(head["dev_auc_by_l2"]) == 4
    # The calibration is the head's intercepts plus dev offsets from the calibration grid ("yes" fixed).
    extra = {o: calibration.log_offsets[o] - head["intercepts"][o] for o in ("yes", "no", "maybe")}
    assert extra["yes"] == 0.0 and all(abs(v) <= 4 and abs(4 * v - round(4 * v)) < 1e-9 for v in extra.values())
    registry = _registry(tiny_model_dir, adapter_copy)
    assert registry.load().adapter_loaded
    assert "decision head fitted on train, decisions calibrated on dev" in registry.status_message()


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "not a saved LoRA adapter"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True})), "plain LoRA"),
])
def test_a_head_is_refused_for_what_it_cannot_extend(adapter_copy, change, message):
    change(adapter_copy)
    head = decision_head.DecisionHead(np.zeros((3, 64)), np.zeros(3), 0.1)
    with pytest.raises(DecisionHeadError, match=message):
        decision_head.attach_head(adapter_copy, head, [5, 6, 7], "lm_head", 400)


def test_head_cli_needs_a_local_adapter_folder(tiny_model_dir, caplog):
    assert decision_head.main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter", "none"]) == 2
    assert "local adapter folder" in caplog.text
