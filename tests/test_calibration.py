"""Decision calibration: fitted on dev, shipped with the adapter, applied to fine-tuned decisions only."""

import json
import shutil

import numpy as np
import pytest

from app import model_status
from pubmedqa.adapter import CALIBRATION_FILE, Adapter
from pubmedqa.config import ModelSettings
from pubmedqa.decisions.calibration import DecisionCalibration, load_calibration
from pubmedqa.decisions.fitting import fit_calibration
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.prompts import PromptInput, fit_prompt
from pubmedqa.variants import Variant


def test_offsets_move_the_decision_and_keep_a_distribution():
    calibration = DecisionCalibration({"yes": 0.0, "no": 1.0, "maybe": 0.0})
    before = {"yes": 0.6, "no": 0.3, "maybe": 0.1}
    [shifted] = calibration.apply([before])
    assert max(shifted, key=shifted.get) == "no"
    assert sum(shifted.values()) == pytest.approx(1.0)
    # Taking the offsets off again gives back the decision they were added to.
    assert calibration.apply([shifted], sign=-1)[0] == pytest.approx(before, abs=1e-6)


def test_fit_unlocks_a_label_the_raw_scores_never_pick():
    # The model always prefers "yes", but ranks "no" higher on the questions whose answer is no: an offset on "no"
    # recovers them; "maybe" cannot be helped, so its offset stays 0.
    gold = ["yes"] * 6 + ["no"] * 4
    probabilities = [{"yes": 0.7, "no": 0.2, "maybe": 0.1}] * 6 + [{"yes": 0.55, "no": 0.4, "maybe": 0.05}] * 4
    calibration = fit_calibration(probabilities, gold, "test")
    decisions = [max(p, key=p.get) for p in calibration.apply(probabilities)]
    assert decisions == gold
    assert calibration.log_offsets["maybe"] == 0.0 and calibration.log_offsets["no"] > 0
    assert calibration.details["before"]["accuracy"] == 0.6 and calibration.details["after"]["accuracy"] == 1.0


def test_fit_changes_nothing_when_the_raw_scores_are_already_best():
    gold = ["yes", "no", "maybe"]
    probabilities = [{"yes": 0.8, "no": 0.1, "maybe": 0.1}, {"yes": 0.1, "no": 0.8, "maybe": 0.1},
                     {"yes": 0.1, "no": 0.1, "maybe": 0.8}]
    assert fit_calibration(probabilities, gold, "test").log_offsets == {"yes": 0.0, "no": 0.0, "maybe": 0.0}


def test_shares_objective_keeps_the_predicted_decisions_near_the_gold_counts():
    # A weak reader: its "no" scores barely differ between the classes. Here the score objective drifts to calling
    # almost everything "yes"; the shares objective predicts about as many "no" as there are.
    rng = np.random.default_rng(0)
    gold = ["yes"] * 140 + ["no"] * 60
    no_score = np.concatenate([rng.normal(0.0, 1.0, 140), rng.normal(0.6, 1.0, 60)])
    probabilities = [
        {"yes": 1 / (1 + np.exp(s - 1)), "no": 1 - 1 / (1 + np.exp(s - 1)) - 1e-6, "maybe": 1e-6} for s in no_score
    ]
    by_score = fit_calibration(probabilities, gold, "test")
    by_shares = fit_calibration(probabilities, gold, "test", objective="shares")
    assert by_shares.details["objective"] == "shares" and by_score.details["objective"] == "score"
    assert abs(by_shares.details["after"]["predicted_counts"]["no"] - 60) <= 6
    assert by_score.details["after"]["predicted_counts"]["no"] < 30
    with pytest.raises(ValueError, match="unknown offset objective"):
        fit_calibration(probabilities, gold, "test", objective="accuracy")


@pytest.fixture
def calibrated_adapter(tiny_adapter_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    DecisionCalibration({"yes": 0.0, "no": 0.0, "maybe": 30.0}, "test").save(adapter)
    return adapter


def test_engine_calibrates_fine_tuned_rows_only(tiny_model_dir, tiny_adapter_dir, calibrated_adapter):
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(calibrated_adapter), quantization="none"))
    loaded = engine.load()
    prompt = fit_prompt(PromptInput("Does aspirin reduce fever?"), loaded.tokenizer, 512)
    base, tuned = engine.score_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED])
    raw_base, raw_tuned = loaded.policy.without_offsets([base, tuned], [False, True])
    assert raw_base == base  # a base row never had offsets
    plain = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none"))
    plain_base, plain_tuned = plain.score_decisions([prompt, prompt], [Variant.BASE, Variant.TUNED])
    assert base == pytest.approx(plain_base) and raw_tuned == pytest.approx(plain_tuned, abs=1e-5)
    assert tuned["maybe"] > 0.99 and raw_tuned["maybe"] < 0.99  # a +30 offset wins whatever the random model says
    assert "calibrated" in model_status.details(engine)


def test_fine_tuned_answers_start_with_the_calibrated_decision(tiny_model_dir, tiny_adapter_dir, calibrated_adapter):
    from pubmedqa.engines.base import GenerationSettings

    settings = GenerationSettings(max_new_tokens=4)
    calibrated = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(calibrated_adapter), quantization="none"))
    plain = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(tiny_adapter_dir), quantization="none"))
    prompt = fit_prompt(PromptInput("Does aspirin reduce fever?"), calibrated.load().tokenizer, 512)
    variants = [Variant.BASE, Variant.TUNED]
    texts, decisions = calibrated.generate_with_decisions([prompt, prompt], variants, settings)
    plain_texts, _ = plain.generate_with_decisions([prompt, prompt], variants, settings)
    # The +30 offset shows in the text (random weights: what follows the first token is noise).
    assert texts[1].startswith("maybe") and not plain_texts[1].startswith("maybe")
    assert texts[0] == plain_texts[0]  # base rows get no offsets
    # The generation's own decisions are the scored ones, offsets included.
    assert decisions == pytest.approx(calibrated.score_decisions([prompt, prompt], variants), abs=1e-5)


@pytest.mark.parametrize("content", ["not json", json.dumps({"log_offsets": {"perhaps": 1.0}}), json.dumps([1, 2])])
def test_broken_calibration_file_is_ignored_with_a_warning(calibrated_adapter, content, caplog):
    (calibrated_adapter / CALIBRATION_FILE).write_text(content)
    assert load_calibration(Adapter.resolve(str(calibrated_adapter))) is None
    assert "Ignoring the adapter's decision calibration" in caplog.text


def test_adapter_without_calibration_scores_raw(tiny_adapter_dir):
    assert load_calibration(Adapter.resolve(str(tiny_adapter_dir))) is None


def test_calibrate_cli_fits_on_the_dev_questions(tiny_model_dir, tiny_adapter_dir, pubmedqa_dir, tmp_path):
    from scripts.calibrate import main

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    code = main(["--base_model", str(tiny_model_dir), "--quantization", "none", "--adapter", str(adapter),
                 "--data", str(pubmedqa_dir), "--batch_size", "50"])
    assert code == 0
    calibration = load_calibration(Adapter.resolve(str(adapter)))
    assert calibration.fitted_on.startswith("dev (50 questions")
    assert sum(calibration.details["before"]["predicted_counts"].values()) == 50
