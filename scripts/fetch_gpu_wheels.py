"""Fetch, on a machine with network, what `scripts.gpu_check` installs on a CUDA machine without it: the wheels of
the packages a CUDA image with PyTorch, transformers, PEFT and accelerate lacks (bitsandbytes and TRL, the data and
metric libraries they and the evaluation need), for Linux x86-64 and Python 3.12, plus a copy of the PubMedQA files.

    python -m scripts.fetch_gpu_wheels                  # -> gpu_wheels/ (git-ignored), about 45 MiB
    python -m scripts.fetch_gpu_wheels --dest gpu_wheels --data ../shared/data/pubmedqa

Then, on the GPU machine: `python -m scripts.gpu_check --wheels gpu_wheels` (see its docstring).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.gpu_check import DEFAULT_WHEELS, PROJECT_ROOT, canonical_name, wheel_name_version

# Pinned in requirements.txt: read from there so that the GPU runs exactly what the CPU runs.
PINNED = ("bitsandbytes", "trl", "datasets", "rouge-score", "bert-score")
# Their own needs that the CUDA image lacks, at the versions requirements.txt resolves to on the CPU machine.
# (pyarrow, pandas, xxhash, fsspec, sacrebleu, scikit-learn, absl-py... are in the image.)
TRANSITIVE = {"dill": "0.4.1", "multiprocess": "0.70.19", "nltk": "3.10.4", "defusedxml": "0.7.1"}
TARGET = ["--python-version", "3.12", "--implementation", "cp"]
# pip matches a manylinux tag exactly, not "this glibc or older": bitsandbytes 0.50.2 is tagged manylinux_2_24.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
DATA_FILES = ("ori_pqal.json", "test_ground_truth.json")


def pinned_versions(requirements: Path = PROJECT_ROOT / "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and canonical_name(name) in PINNED:
            pins[canonical_name(name)] = version.strip()
    missing = set(PINNED) - set(pins)
    if missing:
        raise SystemExit(f"{requirements} pins none of: {', '.join(sorted(missing))}")
    return pins


def _pip(*args: str, quiet: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=quiet)


def fetch(dest: Path, wanted: dict[str, str]) -> None:
    """Download each wanted wheel into ``dest``; build the pure-python ones PyPI has only as a source archive."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in wanted.items():
        spec = f"{name}=={version}"
        if any(wheel_name_version(w) == (name, version) for w in dest.glob("*.whl")):
            continue
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        try:
            _pip("download", "--no-deps", "--only-binary=:all:", *TARGET, *platforms, "-d", str(dest), spec, quiet=True)
        except subprocess.CalledProcessError as exc:
            # rouge-score 0.1.2 is a source archive only: its wheel, built here, is pure python (py3-none-any).
            print(f"{spec}: no wheel for the GPU machine's platform on the index; building one here")
            if b"No matching distribution" not in exc.stderr:
                sys.stderr.write(exc.stderr.decode(errors="replace"))
            with tempfile.TemporaryDirectory() as tmp:
                _pip("wheel", "--quiet", "--no-deps", "-w", tmp, spec)
                (built,) = Path(tmp).glob("*.whl")
                if not built.name.endswith("-none-any.whl"):
                    raise SystemExit(f"{built.name} is not pure python: it would not install on the GPU machine")
                shutil.move(str(built), dest / built.name)
    for wheel in dest.glob("*.whl"):
        name, version = wheel_name_version(wheel)
        if wanted.get(name) != version:  # two versions of one package stop the whole install there
            print(f"removed stale {wheel.name}")
            wheel.unlink()


def copy_data(source: Path, dest: Path) -> None:
    # ../shared beside the checkout does not travel with the repository; the check reads this copy.
    dest.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        shutil.copy2(source / name, dest / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(DEFAULT_WHEELS), help="Folder for the wheels (and data/ copy).")
    parser.add_argument(
        "--data", default=os.environ.get("PUBMEDQA_DATA", ""),
        help="PubMedQA folder to copy into <dest>/pubmedqa (default: $PUBMEDQA_DATA; '' to skip).",
    )
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    wanted = pinned_versions() | TRANSITIVE
    fetch(dest, wanted)
    if args.data:
        copy_data(Path(args.data), dest / "pubmedqa")
    files = sorted(dest.glob("*.whl")) + sorted((dest / "pubmedqa").glob("*"))
    for path in files:
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.relative_to(dest)}")
    total = sum(p.stat().st_size for p in files)
    print(f"{total / 2**20:7.2f} MiB  in {dest} (it travels with the repository: keep the whole under 64 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
