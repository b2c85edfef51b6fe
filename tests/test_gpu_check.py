"""The GPU check (scripts/gpu_check.py) in its CPU dry run, so the script the GPU machine runs cannot rot, and its
wheel selection and failure reporting, which only a broken GPU run would otherwise exercise."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from scripts import gpu_check
from scripts.fetch_gpu_wheels import pinned_versions


def test_dry_run_passes_every_step_and_writes_a_results_folder(pubmedqa_dir, tmp_path, capsys):
    code = gpu_check.main(["--dry_run", "--data", str(pubmedqa_dir), "--output_dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("[") and not line.startswith("[setup]")]
    assert [line.split()[1] for line in steps] == list(gpu_check.STEPS), lines
    assert all(line.split()[2] == "PASS" for line in steps), "\n".join(lines)
    assert code == 0 and lines[-1].startswith("VERDICT: PASS")
    versions = next(line for line in lines if "versions" in line)
    assert all(f"{lib} " in versions for lib in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["run"]["n"] == 20 and set(results["models"]) == {"base", "tuned"}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_failing_step_is_one_line_and_the_others_still_run(tmp_path, capsys):
    def broken(check):
        raise ValueError("boom\nsecond line")

    steps = {
        "first": (broken, None),
        "needs_first": (lambda check: "ran", "first"),
        "independent": (lambda check: "ran", None),
    }
    failed = gpu_check.run_steps(gpu_check.Check(dry_run=True, data=tmp_path, output_dir=tmp_path), steps)
    lines = capsys.readouterr().out.splitlines()
    assert failed == ["first", "needs_first"]
    assert len(lines) == 3 and "FAIL" in lines[0] and "ValueError: boom second line" in lines[0]
    assert "SKIP" in lines[1] and "PASS" in lines[2] and lines[2].endswith("ran")


def _wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    zipfile.ZipFile(path, "w").close()
    return path


def test_only_missing_or_other_versions_are_installed(tmp_path):
    torch = _wheel(tmp_path, "torch", gpu_check.installed_version("torch"))  # present at this version: kept as is
    other = _wheel(tmp_path, "pytest", "0.0.1")  # present at another version
    missing = _wheel(tmp_path, "surely_not_installed_pkg", "1.0")
    assert gpu_check.wheels_to_install(tmp_path) == sorted([other, missing])
    assert torch not in gpu_check.wheels_to_install(tmp_path)
    _wheel(tmp_path, "pytest", "0.0.2")
    with pytest.raises(RuntimeError, match="several versions of pytest"):
        gpu_check.wheels_to_install(tmp_path)


def test_the_fetched_versions_are_requirements_txt_pins():
    pins = pinned_versions()
    assert set(pins) == {"bitsandbytes", "trl", "datasets", "rouge-score", "bert-score"}
    assert pins["bitsandbytes"] == "0.50.2" and pins["trl"] == "1.16.0"
    assert gpu_check.wheel_name_version(Path("rouge_score-0.1.2-py3-none-any.whl")) == ("rouge-score", "0.1.2")


def test_wheels_install_beside_the_environment_and_unmet_needs_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gpu_check_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("gpu_check_probe/__init__.py", "ANSWER = 42\n")
        info = "gpu_check_probe-1.0.dist-info"
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_check_probe\nVersion: 1.0\n"
                     "Requires-Dist: torch>=999\nRequires-Dist: pytest\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    line = gpu_check.install_wheels(wheels, tmp_path / "site")
    assert "installed gpu-check-probe 1.0" in line and "UNMET: gpu-check-probe needs torch>=999" in line
    assert "pytest" not in line.split("UNMET")[1]
    assert __import__("gpu_check_probe").ANSWER == 42 and sys.path[0] == str(tmp_path / "site")
    with pytest.raises(RuntimeError, match="no wheels"):
        gpu_check.install_wheels(tmp_path / "site", tmp_path / "other")
