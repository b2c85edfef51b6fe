"""Fine-tuning on the tiny model: leak-free split, answer-only loss, outputs the app can load, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from pubmedqa.adapter import Adapter
from pubmedqa.config import BaseModelSettings, ModelSettings
from pubmedqa.data import load_local, load_test_ids, official_split
from pubmedqa.decisions.calibration import load_calibration
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.prompts import encode_prompt, first_sentence, format_answer
from pubmedqa.variants import Variant
from scripts import train as train_cli
from tests.conftest import build_tiny_tokenizer
from training import trainer as sft_trainer
from training.arguments import TrainArguments
from training.run_record import ids_hash
from training.sft_data import build_examples
from training.trainer import TrainingInterrupted


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, pubmedqa_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "adapter"
    args = TrainArguments(
        data=str(pubmedqa_dir), output_dir=str(out), limit_train=8, max_steps=2, eval_steps=1,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=768, dev_size=10, lora_r=4,
        balance_decisions=True, decision_loss_weight=2.0,
    )
    train_cli.train(BaseModelSettings(base_model=str(tiny_model_dir), quantization="none"), args)
    return out


def test_test_ids_never_reach_training(pubmedqa_dir, trained_adapter):
    records = load_local(pubmedqa_dir)
    test_ids = set(load_test_ids(pubmedqa_dir))
    split = official_split(records, sorted(test_ids), dev_size=10)
    examples = build_examples(split.train, build_tiny_tokenizer(), 768)
    assert len(examples) == len(split.train) and not {e["pubid"] for e in examples} & test_ids
    info = json.loads((trained_adapter / "training_args.json").read_text())
    assert info["split"]["train_ids_sha256_16"] == ids_hash(split.train[:8])
    assert info["split"]["test_excluded"] == 500
    assert not set(info["split"]["dev_ids"]) & test_ids


def test_training_examples_keep_question_and_answer_and_shorten_the_context(pubmedqa_dir):
    tokenizer = build_tiny_tokenizer()
    several_sentences = [r for r in load_local(pubmedqa_dir).values() if first_sentence(r.long_answer) != r.long_answer]
    record = max(several_sentences, key=lambda r: len(r.context))
    (example,) = build_examples([record], tokenizer, 768, "conclusion")
    assert example["completion"] == " " + record.reference_answer
    assert f"Question: {record.question}\nAnswer:" in example["prompt"] and "[...]" in example["prompt"]
    n_completion = len(tokenizer(example["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    assert len(encode_prompt(example["prompt"], tokenizer)) + n_completion <= 768
    # The default target: the decision and the conclusion's first sentence; the shorter answer leaves more context.
    (short,) = build_examples([record], tokenizer, 768)
    assert short["completion"] == " " + format_answer(record.final_decision, first_sentence(record.long_answer))
    assert len(short["completion"]) < len(example["completion"]) and len(short["prompt"]) > len(example["prompt"])


def test_trainer_masks_the_prompt_and_trains_on_the_answer_only(tiny_model_dir, pubmedqa_dir, monkeypatch):
    captured = {}
    original = sft_trainer.make_trainer_class

    def spy():
        cls = original()

        class Spy(cls):
            def train(self, *args, **kwargs):
                captured["row"] = self.train_dataset[0]
                raise KeyboardInterrupt  # stop before training: only the data is under test

        return Spy

    monkeypatch.setattr(sft_trainer, "make_trainer_class", spy)
    args = TrainArguments(data=str(pubmedqa_dir), limit_train=2, max_length=768, dev_size=10, output_dir="unused")
    with pytest.raises(KeyboardInterrupt):
        train_cli.train(BaseModelSettings(base_model=str(tiny_model_dir), quantization="none"), args)
    row = captured["row"]
    tokenizer = build_tiny_tokenizer()
    records = load_local(pubmedqa_dir)
    split = official_split(records, load_test_ids(pubmedqa_dir), dev_size=10)
    (example,) = build_examples(split.train[:1], tokenizer, 768)
    prompt_ids = encode_prompt(example["prompt"], tokenizer)
    # Byte-for-byte the shared prompt, then the answer and EOS; only the answer (and EOS) is trained on.
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(row["input_ids"][len(prompt_ids):], skip_special_tokens=True) == example["completion"]
    labels = row["labels"]
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids):] == row["input_ids"][len(prompt_ids):]


def test_trained_adapter_folder_is_complete_and_loads_in_the_app(trained_adapter, tiny_model_dir):
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_args.json", "dev_metrics.json",
                 "decision_calibration.json"):
        assert (trained_adapter / name).is_file(), name
    assert not list(trained_adapter.glob("**/*test_ground_truth*"))
    card = (trained_adapter / "README.md").read_text()
    assert "library_name: peft" in card and "qiaojin/PubMedQA" in card and "not medical advice" in card
    assert "official 500-question test set is excluded" in card
    # LoRA trains only the layers above the probe, whose file and card section ship with the adapter.
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and "q_proj" in config["target_modules"]
    assert (trained_adapter / "decision_probe.safetensors").is_file() and "Decision probe" in card
    assert load_calibration(Adapter.resolve(str(trained_adapter))).fitted_on.endswith("out of fold")
    metrics = json.loads((trained_adapter / "dev_metrics.json").read_text())
    assert 0.0 <= metrics["after_training"]["accuracy"] <= 1.0
    evaluated_steps = [entry["step"] for entry in metrics["log_history"] if "eval_selection_score" in entry]
    assert evaluated_steps[-1] == metrics["log_history"][-1]["step"]  # the finished model competes for "best"

    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(trained_adapter), quantization="none"))
    from pubmedqa.engines.base import GenerationSettings
    from pubmedqa.prompts import PromptInput

    settings = GenerationSettings(max_new_tokens=8)
    prompt = engine.prepare(PromptInput("Does aspirin help?"), settings)
    assert engine.load().adapter_loaded
    assert isinstance(engine.generate(prompt, Variant.TUNED, settings), str)
    assert metrics["log_history"][-1]["train_loss"] > 0


def test_train_cli_reports_a_missing_data_folder_in_one_line(tmp_path, caplog):
    code = train_cli.main(["--data", str(tmp_path / "nowhere"), "--base_model", str(tmp_path / "no-model"),
                           "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert any("neither a folder" in r.getMessage() or "does not exist" in r.getMessage() for r in caplog.records)


def test_train_cli_refuses_a_probe_depth_outside_the_model(tmp_path, caplog):
    assert train_cli.main(["--probe_depth", "1", "--output_dir", str(tmp_path / "out")]) == 2
    assert "--probe_depth must be at least 0 and below 1" in caplog.text and not (tmp_path / "out").exists()


def test_push_without_network_fails_in_one_line_without_the_token(tiny_adapter_dir, monkeypatch, capsys, caplog):
    from scripts import push

    monkeypatch.setenv("HF_TOKEN", "hf_FAKE_SECRET_do_not_print")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push.main([str(tiny_adapter_dir), "someone/pubmedqa-lora"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "could not reach the Hugging Face Hub" in errors[0]
    out = capsys.readouterr()
    assert "hf_FAKE_SECRET" not in out.out + out.err + caplog.text
    assert push.main([str(tiny_adapter_dir.parent), "someone/pubmedqa-lora"]) == 1  # not an adapter folder


def _tiny_args(data, out, **overrides):
    base = dict(
        data=str(data), output_dir=str(out), limit_train=8, max_steps=3, eval_steps=2,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=768, dev_size=10, lora_r=4,
    )
    return TrainArguments(**{**base, **overrides})


def test_existing_output_dir_is_refused_unless_overwrite_or_resume(trained_adapter, tiny_model_dir, pubmedqa_dir):
    with pytest.raises(ValueError, match="already exists"):
        train_cli.train(BaseModelSettings(base_model=str(tiny_model_dir), quantization="none"), _tiny_args(pubmedqa_dir, trained_adapter))


def _interrupting_trainer_class(original):
    """The project's trainer class, with Ctrl-C pressed as step 2 begins."""
    import os
    import signal

    from transformers import TrainerCallback

    class InterruptAtFirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    def with_interrupt():
        cls = original()

        class Interrupted(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(InterruptAtFirstStep())

        return Interrupted

    return with_interrupt


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tiny_model_dir, pubmedqa_dir, tmp_path, monkeypatch):
    original = sft_trainer.make_trainer_class
    with_interrupt = _interrupting_trainer_class(original)
    settings = BaseModelSettings(base_model=str(tiny_model_dir), quantization="none")
    out = tmp_path / "run"
    monkeypatch.setattr(sft_trainer, "make_trainer_class", with_interrupt)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train_cli.train(settings, _tiny_args(pubmedqa_dir, out, eval_steps=10))  # no scheduled save before step 3
    assert (out / "checkpoint-2").is_dir()
    monkeypatch.setattr(sft_trainer, "make_trainer_class", original)
    train_cli.train(settings, _tiny_args(pubmedqa_dir, out, eval_steps=10, resume=True))
    info = json.loads((out / "training_args.json").read_text())
    assert info["train_result"]["global_step"] == 3 and (out / "adapter_model.safetensors").is_file()


def test_push_uploads_the_adapter_folder_without_checkpoints(trained_adapter, hub_calls):
    from scripts import push

    url = push.push_adapter(trained_adapter, "someone/pubmedqa-lora", private=True)
    assert url.endswith("someone/pubmedqa-lora")
    (_, repo, create_kwargs), (_, _, upload) = hub_calls
    assert create_kwargs["private"] is True and create_kwargs["repo_type"] == "model"
    assert upload["folder_path"] == str(trained_adapter) and upload["repo_id"] == "someone/pubmedqa-lora"
    assert "checkpoint-*" in upload["ignore_patterns"]


def test_decision_weight_scales_only_the_first_answer_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.trainer import answer_only_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 7, 11, 12, -100]])
    mask = torch.ones_like(ids)
    plain, _ = answer_only_loss(model, ids, mask, labels)
    weighted, _ = answer_only_loss(model, ids, mask, labels, decision_weight=3.0)
    full = model(input_ids=ids, attention_mask=mask).logits.float()
    per_token = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="none").view(2, -1)
    assert plain.item() == pytest.approx(per_token.sum().item() / 6, rel=1e-5)  # same as full logits, answer only
    first = per_token[0, 2] + per_token[1, 1]  # each row's first answer token
    assert weighted.item() == pytest.approx((per_token.sum() + 2 * first).item() / 6, rel=1e-5)


def test_balanced_decision_weights_scale_each_label_by_its_rarity(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.trainer import answer_only_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 7, 11, 12, -100]])
    mask = torch.ones_like(ids)
    plain, _ = answer_only_loss(model, ids, mask, labels)
    weighted, _ = answer_only_loss(model, ids, mask, labels, decision_weight=2.0, class_weights={7: 3.0})
    full = model(input_ids=ids, attention_mask=mask).logits.float()
    per_token = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="none").view(2, -1)
    # Row 1 starts its answer with token 8 (weight 2), row 2 with token 7 (weight 2 x 3); later tokens keep 1.
    expected = per_token.sum() + 1 * per_token[0, 2] + 5 * per_token[1, 1]
    assert weighted.item() == pytest.approx(expected.item() / 6, rel=1e-5)
    assert plain.item() == pytest.approx(per_token.sum().item() / 6, rel=1e-5)


def test_balanced_class_weights_follow_label_frequency(pubmedqa_dir):
    from pubmedqa.data import load_records
    from pubmedqa.decisions.options import option_token_ids
    from training.sft_data import balanced_class_weights

    records = list(load_records(str(pubmedqa_dir)).values())[:200]
    tokenizer = build_tiny_tokenizer()
    weights = balanced_class_weights(records, tokenizer)
    by_label = dict(zip(("yes", "no", "maybe"), (weights[ids[0]] for ids in option_token_ids(tokenizer))))
    assert by_label["maybe"] > by_label["no"] > by_label["yes"]
    counts = {k: sum(r.final_decision == k for r in records) for k in by_label}
    assert sum(by_label[k] * counts[k] for k in counts) == pytest.approx(len(records))  # mean weight 1


def test_model_card_cli_puts_test_results_on_the_card_and_refuses_a_broken_run(trained_adapter, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    from pubmedqa.evaluation.results import SCHEMA_VERSION, write_json_atomic
    from scripts.model_card import main as card_main

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "results.json", {
        "schema_version": SCHEMA_VERSION,
        "run": {"n": 500, "quantization": "4bit", "decision_calibration": None},
        "models": {"base": {"accuracy": 0.5, "macro_f1": 0.3},
                   "tuned": {"accuracy": 0.6, "macro_f1": 0.4, "token_f1": 25.0, "rougeL": 20.0, "bertscore": {"f1": 55.0}}},
    })
    assert card_main([str(adapter), "--results", str(run)]) == 0
    card = (adapter / "README.md").read_text()
    assert "## Results on the official test set (500 questions)" in card
    assert "| with this adapter | 60.0 % | 40.0 | 25.0 | 20.0 | 55.0 |" in card
    assert ModelCard.load(adapter / "README.md").data.library_name == "peft"

    (run / "results.json").write_text("{broken")
    assert card_main([str(adapter), "--results", str(run)]) == 2
    assert (adapter / "README.md").read_text() == card  # nothing lost


def _write_pqa_a(path, pubmedqa_dir, n, extra_ids=()):
    """A tiny PQA-A file in the PubMedQA repository's format: PQA-L abstracts under new ids, plus ``extra_ids``."""
    raw = json.loads((pubmedqa_dir / "ori_pqal.json").read_text())
    items = list(raw.values())
    ids = [f"9000{i:04d}" for i in range(n)] + list(extra_ids)
    path.write_text(json.dumps({pubid: {**items[i], "final_decision": "yes" if i % 2 else "no"} for i, pubid in enumerate(ids)}))


def test_optional_pqa_a_phase_trains_first_and_drops_pqa_l_test_ids(tiny_model_dir, pubmedqa_dir, tmp_path, caplog):
    test_id = load_test_ids(pubmedqa_dir)[0]
    _write_pqa_a(tmp_path / "ori_pqaa.json", pubmedqa_dir, 12, extra_ids=[test_id])
    out = tmp_path / "run"
    settings = BaseModelSettings(base_model=str(tiny_model_dir), quantization="none")
    with caplog.at_level("INFO", logger="scripts.train"):
        train_cli.train(settings, _tiny_args(pubmedqa_dir, out, pqa_a=str(tmp_path), pqa_a_epochs=1.0))  # the folder form
    info = json.loads((out / "training_args.json").read_text())["pqa_a_phase"]
    assert (info["questions"], info["dropped_pqa_l_ids"]) == (12, 1)
    assert info["global_step"] == 3 and info["labels"] == {"no": 6, "yes": 6}
    assert "PQA-A phase: 12 questions (1 dropped" in caplog.text
    assert any((out / "pqa_a").glob("checkpoint-*"))  # the first phase's own checkpoints, apart from PQA-L's
    assert "First phase: 12 PQA-A" in (out / "README.md").read_text()
    # After PQA-A the adapter's own decision counts: LoRA on every layer, and no probe in its place.
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] is None
    assert not (out / "decision_probe.safetensors").exists() and "No decision probe: LoRA trains every" in caplog.text
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(out), quantization="none"))
    assert engine.load().adapter_loaded

    # The second phase continued the first phase's adapter instead of starting a fresh one.
    from safetensors.torch import load_file

    first = load_file(next((out / "pqa_a").glob("checkpoint-*")) / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    fresh_b = [k for k in first if "lora_B" in k]
    assert fresh_b and any(first[k].abs().sum() > 0 for k in fresh_b)  # LoRA B starts at zero: phase 1 moved it
    first_b, final_b = (torch.cat([w[k].flatten() for k in fresh_b]) for w in (first, final))
    # A fresh adapter after 3 PQA-L steps would be nearly orthogonal to the first phase's.
    assert torch.nn.functional.cosine_similarity(first_b, final_b, dim=0) > 0.9

    # --resume continues the PQA-L phase without training on PQA-A again.
    caplog.clear()
    with caplog.at_level("INFO", logger="scripts.train"):
        train_cli.train(settings, _tiny_args(pubmedqa_dir, out, pqa_a=str(tmp_path), max_steps=4, resume=True))
    assert "the PQA-A phase is done" in caplog.text and "PQA-A phase: 12 questions" not in caplog.text
    resumed = json.loads((out / "training_args.json").read_text())
    assert resumed["pqa_a_phase"] == info and resumed["train_result"]["global_step"] == 4


def test_malformed_pqa_a_file_fails_in_one_line(tiny_model_dir, pubmedqa_dir, tmp_path, caplog):
    bad = tmp_path / "pqa_a.json"
    bad.write_text('{"1": {"QUESTION": "Q?", "CONTEXTS": "not a list"}}')
    code = train_cli.main([
        "--base_model", str(tiny_model_dir), "--quantization", "none", "--data", str(pubmedqa_dir),
        "--output_dir", str(tmp_path / "out"), "--pqa_a", str(bad), "--max_steps", "1",
    ])
    assert code == 2
    assert "'contexts' must be a list of strings" in caplog.text and "Traceback" not in caplog.text


def test_select_by_auc_keeps_the_checkpoint_with_the_best_dev_pairwise_auc(tiny_model_dir, pubmedqa_dir, tmp_path):
    out = tmp_path / "run"
    settings = BaseModelSettings(base_model=str(tiny_model_dir), quantization="none")
    train_cli.train(settings, _tiny_args(pubmedqa_dir, out, eval_steps=1, select_by="auc", learning_rate=5e-3))
    history = json.loads((out / "dev_metrics.json").read_text())["log_history"]
    aucs = [(h["step"], h["eval_pairwise_auc"]) for h in history if "eval_pairwise_auc" in h]
    assert len(aucs) == 3
    best_step = max(aucs, key=lambda item: item[1])[0]  # the first of equals, as the Trainer keeps it
    info = json.loads((out / "training_args.json").read_text())
    assert info["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert info["best_dev_selection_score"] == pytest.approx(max(a for _, a in aucs))


def test_ctrl_c_in_the_pqa_a_phase_saves_a_checkpoint_there_and_resume_finishes(
    tiny_model_dir, pubmedqa_dir, tmp_path, monkeypatch
):
    _write_pqa_a(tmp_path / "ori_pqaa.json", pubmedqa_dir, 16)  # 4 steps of 4
    settings = BaseModelSettings(base_model=str(tiny_model_dir), quantization="none")
    out = tmp_path / "run"
    original = sft_trainer.make_trainer_class
    monkeypatch.setattr(sft_trainer, "make_trainer_class", _interrupting_trainer_class(original))
    with pytest.raises(TrainingInterrupted, match="pqa_a.*--resume"):
        train_cli.train(settings, _tiny_args(pubmedqa_dir, out, pqa_a=str(tmp_path)))
    assert (out / "pqa_a" / "checkpoint-2").is_dir() and not (out / "training_args.json").exists()
    monkeypatch.setattr(sft_trainer, "make_trainer_class", original)
    train_cli.train(settings, _tiny_args(pubmedqa_dir, out, pqa_a=str(tmp_path), resume=True))
    info = json.loads((out / "training_args.json").read_text())
    assert info["pqa_a_phase"]["global_step"] == 4 and info["train_result"]["global_step"] == 3
