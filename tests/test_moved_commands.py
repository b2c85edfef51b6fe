"""The commands live in scripts/; their former spellings (``python -m training.evaluate``, ``tools.gpu_check``) run
the same command for one more release and say where it went."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOVED = [(f"training.{name}", f"scripts.{name}") for name in (
    "train", "evaluate", "export", "push", "deploy", "calibrate", "decision_probe", "baseline", "convert_lora",
    "model_card")] + [("tools.gpu_check", "scripts.gpu_check"), ("tools.fetch_gpu_wheels", "scripts.fetch_gpu_wheels")]


@pytest.mark.parametrize("old,new", [MOVED[1], MOVED[-1], MOVED[-3]], ids=lambda v: v)
def test_a_former_spelling_runs_the_command_and_names_the_new_one(old, new):
    moved = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    current = subprocess.run([sys.executable, "-m", new, "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert moved.returncode == current.returncode == 0, moved.stderr[-2000:]
    assert moved.stdout == current.stdout and "usage:" in current.stdout
    assert moved.stderr.count("is now") == 1 and f"`python -m {old}` is now `python -m {new}`" in moved.stderr


def test_every_moved_command_has_its_former_spelling():
    for old, new in MOVED:
        assert (ROOT / (old.replace(".", "/") + ".py")).is_file() and (ROOT / (new.replace(".", "/") + ".py")).is_file()
        assert f'runpy.run_module("{new}", run_name="__main__"' in (ROOT / (old.replace(".", "/") + ".py")).read_text()
