"""Multi-process training with `accelerate launch` (DDP over gloo on CPU processes), on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pubmedqa.config import ModelSettings
from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.transformers_engine import TransformersEngine
from pubmedqa.prompts import PromptInput
from pubmedqa.variants import Variant
from tests.conftest import REPO_ROOT, free_port


def test_accelerate_launch_trains_with_two_processes_and_the_main_one_writes_the_adapter(tiny_model_dir, pubmedqa_dir, tmp_path):
    out = tmp_path / "adapter"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "training/accelerate/ddp.yaml",
        "--num_processes", "2", "--main_process_port", str(free_port()),
        "-m", "scripts.train", "--base_model", str(tiny_model_dir), "--data", str(pubmedqa_dir),
        "--output_dir", str(out), "--limit_train", "16", "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--max_length", "768",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    info = json.loads((out / "training_args.json").read_text())
    assert info["processes"] == 2
    # 16 questions, 2 per process and step, 2 processes: one epoch is 4 steps, so the data really was shared out.
    assert info["train_result"]["epoch"] == 1.5
    losses = [h["loss"] for h in json.loads((out / "dev_metrics.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert run.stderr.count("Adapter written to") == 1  # only the main process writes (and says so)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("checkpoint-")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "decision_calibration.json",
        "decision_probe.safetensors", "dev_metrics.json", "pubmedqa_adapter.json", "training_args.json",
    ]
    engine = TransformersEngine(ModelSettings(base_model=str(tiny_model_dir), adapter=str(out), quantization="none"))
    settings = GenerationSettings(max_new_tokens=4)
    assert engine.generate(engine.prepare(PromptInput("Does aspirin help?"), settings), Variant.TUNED, settings) is not None
