"""GPU check: the CUDA path end to end, through the project's own code, on a tiny random-weight Llama built here
(no download). One line per step with its time and what it found, then the verdict; exit code 1 if any step failed.

  model    - a Llama (hidden 256, 4 layers) and a byte-level BPE tokenizer trained on the PubMedQA texts, saved.
  train    - `scripts.train.train` on it: QLoRA (bitsandbytes NF4, bf16 compute, prepare_model_for_kbit_training,
             TRL on CUDA, device_map="auto"), 30 steps; the loss must go down.
  compare  - the adapter loaded back by the app's TransformersEngine (4-bit, CUDA): it lowers the answer loss of
             training pairs, and the Compare tab's mixed-adapter batch (base row + fine-tuned row, PEFT
             adapter_names) gives the same greedy tokens as each row generated alone.
  evaluate - `pubmedqa.evaluation.runner.evaluate` on 20 test questions through that engine; a results folder.
  memory   - peak GPU memory (torch.cuda.max_memory_allocated) and the mixed batch's tokens/s.

On the GPU machine (no network; PyTorch, transformers, PEFT and accelerate installed), after fetching the missing
wheels and a copy of the data on a machine with network (`python -m scripts.fetch_gpu_wheels`):

    python -m scripts.gpu_check --wheels gpu_wheels          # data: gpu_wheels/pubmedqa, results: outputs/gpu_check

`--dry_run` runs the same steps on a CPU (2 training steps, full precision, no bitsandbytes kernels): the test suite
does, so the check cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# Only the standard library above: the wheels must be on sys.path before transformers records which packages exist.

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WHEELS = PROJECT_ROOT / "gpu_wheels"
DEFAULT_OUTPUT = PROJECT_ROOT / "outputs" / "gpu_check"
VERSIONS = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
# A numerical difference between batch and alone up to this fraction of the adapter's own effect on the logits is
# bf16 noise; a row given the wrong adapter differs by about the whole effect.
ROUTING_TOLERANCE = 0.25


# ------------------------------------------------------------------------------------------------------ wheels
def canonical_name(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    name, ver = wheel.name.split("-")[:2]
    return canonical_name(name), ver


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def wheels_to_install(folder: Path) -> list[Path]:
    """The wheels in ``folder`` whose package is missing here or installed at another version."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {folder}: run `python -m scripts.fetch_gpu_wheels` where there is network")
    names = [wheel_name_version(w)[0] for w in wheels]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise RuntimeError(f"{folder} holds several versions of {', '.join(doubled)}: keep one of each")
    return [w for w in wheels if installed_version(wheel_name_version(w)[0]) != wheel_name_version(w)[1]]


def unmet_requirements(names: Sequence[str]) -> list[str]:
    """Requirements of the packages ``names`` that what is importable now does not satisfy (say, a pyarrow older
    than datasets needs): the wheel folder would need those too."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    unmet = []
    for name in names:
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            found = installed_version(req.name)
            if found is None or not req.specifier.contains(found, prereleases=True):
                unmet.append(f"{name} needs {req.name}{req.specifier} (found {found or 'none'})")
    return unmet


def install_wheels(folder: Path, target: Path) -> str:
    """Install the wheels this environment lacks into ``target`` (not into the environment itself) and put it first
    on sys.path; returns what was installed."""
    wheels = wheels_to_install(folder)
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(folder), "--no-deps",
             "--upgrade", "--target", str(target), *map(str, wheels)],
            check=True,
        )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    names = [wheel_name_version(w)[0] for w in wheels]
    unmet = unmet_requirements(names)
    done = ", ".join(f"{n} {installed_version(n)}" for n in names) or "nothing (all present)"
    return f"installed {done} from {folder} into {target}" + (f"; UNMET: {'; '.join(unmet)}" if unmet else "")


def versions_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    libs = ", ".join(f"{n} {installed_version(n) or 'missing'}" for n in VERSIONS)
    return f"python {sys.version.split()[0]}, CUDA {torch.version.cuda or 'none'}, GPU {gpu}; {libs}"


# ------------------------------------------------------------------------------------------------------- steps
@dataclass
class Check:
    """What the steps hand each other."""

    dry_run: bool
    data: Path
    output_dir: Path
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    train_args: Any = None
    engine: Any = None
    batch_speed: str = ""
    peaks: dict[str, float] = field(default_factory=dict)

    @property
    def quantization(self) -> str:
        return "none" if self.dry_run else "4bit"


def _corpus(data: Path) -> list[str]:
    from pubmedqa.data import load_local
    from pubmedqa.prompts import ANSWER_OPTIONS

    # The options must come out as one token each, as with Gemma or Llama, so the decision comes from the
    # generation's own first step (the path the app takes).
    options = " ".join(f"Answer: {o}." for o in ANSWER_OPTIONS)
    records = load_local(data).values()
    texts = [f"Question: {r.question}\nAnswer: {r.reference_answer}\n{r.context[:600]}" for r in records]
    return texts + [options] * 200


def build_tokenizer(data: Path, vocab_size: int = 1024) -> Any:
    """A byte-level BPE like tests/conftest.py's, trained on the PubMedQA texts so prompts stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(data), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def step_model(check: Check) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pubmedqa.decisions.options import single_token_options

    if not check.dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to PyTorch (on a CPU, run with --dry_run)")
    tokenizer = build_tokenizer(check.data)
    torch.manual_seed(0)
    # The dry run only has to take every code path, and the test suite's CPU time is precious.
    width, layers = (64, 2) if check.dry_run else (256, 4)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    check.model_dir = check.output_dir / "model"
    model.save_pretrained(check.model_dir)
    tokenizer.save_pretrained(check.model_dir)
    single = "one token each" if single_token_options(tokenizer) else "SEVERAL tokens (two-pass decisions)"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"Llama {params:.1f}M params, vocab {len(tokenizer)}, options {single} -> {check.model_dir}"


def step_train(check: Check) -> str:
    import json

    from pubmedqa.config import BaseModelSettings
    from scripts.train import train
    from training.arguments import TrainArguments

    check.adapter_dir = check.output_dir / "adapter"
    size: dict[str, int] = (
        {"limit_train": 8, "dev_size": 10, "max_steps": 2, "gradient_accumulation_steps": 1}
        if check.dry_run
        else {"limit_train": 240, "max_steps": 30, "gradient_accumulation_steps": 2}  # 30 steps = one epoch
    )
    args = TrainArguments(
        data=str(check.data), output_dir=str(check.adapter_dir), eval_steps=size["max_steps"], logging_steps=1,
        per_device_train_batch_size=4, max_length=768, lora_r=8, overwrite=True, **size,
        learning_rate=1e-3,  # a random model learns little in 30 steps at the usual 2e-4
    )
    check.train_args = args
    train(BaseModelSettings(base_model=str(check.model_dir), quantization=check.quantization), args)
    info = json.loads((check.adapter_dir / "training_args.json").read_text())
    history = json.loads((check.adapter_dir / "dev_metrics.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    if info["quantization"].split()[0] != check.quantization:  # load_base_model falls back to bf16 rather than fail
        raise RuntimeError(f"trained on a base loaded as {info['quantization']!r}, not {check.quantization!r}")
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    # Two steps on different batches say nothing about the trend; the compare step measures the adapter's effect.
    if not check.dry_run and not last < first:
        raise RuntimeError(f"training loss did not go down: {first:.3f} -> {last:.3f} ({losses})")
    return (
        f"{info['method']} on {info['quantization']}, {info['train_result']['global_step']} steps, "
        f"loss {first:.3f} -> {last:.3f} (mean of first/last {third} logged"
        + ("; the trend is checked in the GPU run only)" if check.dry_run else ")")
    )


def _answer_loss(model: Any, tokenizer: Any, examples: list[dict[str, str]]) -> float:
    """The training loss (answer tokens only) of ``examples`` under ``model`` as it is."""
    import torch

    from pubmedqa.prompts import encode_prompt
    from training.trainer import answer_only_loss

    rows = []
    for e in examples:
        prompt = encode_prompt(e["prompt"], tokenizer)
        answer = tokenizer(e["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows], device=device)
    with torch.no_grad():
        loss, _ = answer_only_loss(model, ids, mask, labels)
    return float(loss)


@contextlib.contextmanager
def recorded_generations(model: Any) -> Iterator[list[Any]]:
    """Keep what each ``generate`` call of ``model`` returns, with its per-step scores; the engine drops it."""
    calls: list[Any] = []
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        calls.append(out)
        return out

    model.generate = generate
    try:
        yield calls
    finally:
        del model.generate


def _max_diff(a: Any, b: Any) -> float:
    import torch

    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b).abs()[finite].max()) if finite.any() else 0.0


def compare_rows(batch: Any, alone: Sequence[Any], options: Sequence[int]) -> tuple[bool, str]:
    """Whether each row of the mixed ``batch`` generation is its ``alone`` generation (base, then fine-tuned): their
    logits agree within bf16 noise, far closer than the adapter moves them, as long as their tokens do. Greedy
    tokens can then part only at a near tie (a gap within twice that noise), which is reported."""
    prompt = alone[0].sequences.shape[1] - len(alone[0].scores)
    keep = [c for c in range(alone[0].scores[0].shape[-1]) if c not in set(options)]  # the policy sets the options
    effect = _max_diff(alone[0].scores[0][0, keep], alone[1].scores[0][0, keep])
    ok, notes = effect > 0, [f"adapter effect on the logits {effect:.3g}"]
    for row, single in enumerate(alone):
        mine, theirs = single.sequences[0, prompt:].tolist(), batch.sequences[row, prompt:].tolist()
        part = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        steps = range(len(single.scores) if part is None else part + 1)
        drift = max(_max_diff(batch.scores[i][row], single.scores[i][0]) for i in steps)
        ok &= drift <= ROUTING_TOLERANCE * effect
        if part is None:
            notes.append(f"row {row}: same {len(mine)} tokens, logits within {drift:.3g}")
        else:
            gap = float(single.scores[part][0][mine[part]] - single.scores[part][0][theirs[part]])
            notes.append(f"row {row}: PARTS at token {part} at a near tie (gap {gap:.3g}), logits within {drift:.3g}")
    return ok, "; ".join(notes)


def _load_engine(check: Check, adapter: Path | None) -> tuple[Any, str]:
    """The app's engine on the tiny model, and how its base weights were really loaded."""
    import torch

    from pubmedqa.config import ModelSettings
    from pubmedqa.engines.transformers_engine import TransformersEngine

    settings = ModelSettings(
        base_model=str(check.model_dir), adapter=str(adapter) if adapter else "none",
        quantization=check.quantization, engine="transformers",
    )
    engine = TransformersEngine(settings)
    loaded = engine.load()
    device = loaded.model.get_input_embeddings().weight.device
    if check.dry_run:
        return engine, f"{loaded.quantization} on {device}"
    import bitsandbytes as bnb

    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    kinds = {(m.weight.quant_type, m.compute_dtype, m.weight.device.type) for m in layers}
    if loaded.quantization != "4bit" or kinds != {("nf4", torch.bfloat16, "cuda")}:
        raise RuntimeError(f"the engine loaded {loaded.quantization!r}: {len(layers)} 4-bit layers of kinds {kinds}")
    return engine, f"{len(layers)} layers NF4 with bf16 compute on {device}"


def step_compare(check: Check) -> str:
    import torch

    from pubmedqa.decisions.options import single_token_options
    from pubmedqa.engines.base import GenerationSettings
    from pubmedqa.variants import Variant
    from training.sft_data import build_examples

    engine, weights = _load_engine(check, check.adapter_dir)
    check.engine = engine
    loaded = engine.load()
    if not loaded.adapter_loaded:
        raise RuntimeError(f"adapter not loaded: {engine.adapter_unavailable_reason()}")
    records = check.train_args.load_split().train[:8]  # pairs the adapter was trained on
    examples = build_examples(records, loaded.tokenizer, 768)
    with loaded.model.disable_adapter():
        base_loss = _answer_loss(loaded.model, loaded.tokenizer, examples)
    tuned_loss = _answer_loss(loaded.model, loaded.tokenizer, examples)
    if not tuned_loss < base_loss:
        raise RuntimeError(f"the adapter does not lower its training pairs' loss: {base_loss:.3f} -> {tuned_loss:.3f}")

    settings = GenerationSettings(max_new_tokens=16)
    prompt = engine.prepare(records[0].prompt_input(), settings)
    variants = [Variant.BASE, Variant.TUNED]
    with recorded_generations(loaded.model) as calls:
        alone_texts = [engine.generate(prompt, v, settings) for v in variants]  # also the warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch_texts = engine.generate_batch([prompt, prompt], variants, settings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    alone, batch = calls[:2], calls[2]
    steps = len(batch.scores)
    check.batch_speed = f"mixed batch 2 rows x {steps} tokens in {seconds:.3f} s = {2 * steps / seconds:.0f} tokens/s"
    options = [ids[0] for ids in single_token_options(loaded.tokenizer) or []]
    same, detail = compare_rows(batch, alone, options)
    texts = "texts identical" if batch_texts == alone_texts else "TEXTS DIFFER"
    if not same:
        raise RuntimeError(f"mixed batch != rows alone: {texts}; {detail}")
    return f"{weights}; answer loss base {base_loss:.3f} -> adapter {tuned_loss:.3f}; batch vs alone: {texts}; {detail}"


def step_evaluate(check: Check) -> str:
    from pubmedqa.adapter import CONFIG_FILE
    from pubmedqa.evaluation.results import load_results
    from pubmedqa.evaluation.runner import EvalArguments, evaluate

    # Without a trained adapter the base model alone still goes through the evaluation.
    adapter = check.adapter_dir if check.adapter_dir and (check.adapter_dir / CONFIG_FILE).is_file() else None
    engine = check.engine or _load_engine(check, adapter)[0]
    args = EvalArguments(
        data=str(check.data), limit=20, output_dir=str(check.output_dir / "eval"), bertscore_model="none",
        max_new_tokens=16,
    )
    run_dir = evaluate(engine.settings, args, engine=engine)
    results = load_results(run_dir)
    n, models = results.results["run"]["n"], results.results["models"]
    expected = ["base", "tuned"] if adapter else ["base"]
    if n != 20 or results.model_keys != expected:
        raise RuntimeError(f"{run_dir}: {n} questions, models {results.model_keys}, expected 20 and {expected}")
    scores = ", ".join(f"{k} accuracy {models[k]['accuracy']:.2f}" for k in results.model_keys)
    return f"{n} questions, {scores} -> {run_dir}"


def step_memory(check: Check) -> str:
    import torch

    speed = check.batch_speed or "tokens/s: n/a (the compare step did not run)"
    if torch.cuda.is_available():
        peaks = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in check.peaks.items())
        return f"peak GPU memory {max(check.peaks.values(), default=0) / 2**30:.2f} GiB ({peaks}); {speed}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return f"peak process memory {rss:.2f} GiB (no GPU: dry run); {speed}"


STEPS: dict[str, tuple[Callable[[Check], str], str | None]] = {
    # name: (step, the step whose output it needs)
    "model": (step_model, None),
    "train": (step_train, "model"),
    "compare": (step_compare, "train"),
    "evaluate": (step_evaluate, "model"),
    "memory": (step_memory, None),
}


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:600]


def run_steps(check: Check, steps: dict[str, tuple[Callable[[Check], str], str | None]]) -> list[str]:
    """Run every step whose input exists, one line each; returns the names of those that did not pass."""
    import torch

    cuda = torch.cuda.is_available()
    failed: list[str] = []
    for i, (name, (step, needs)) in enumerate(steps.items(), 1):
        head = f"[{i}/{len(steps)}] {name:<8}"
        if needs in failed:
            print(f"{head} SKIP   (the {needs} step failed)", flush=True)
            failed.append(name)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs: stdout keeps the check's lines
                detail = step(check)
            verdict = "PASS"
        except Exception as exc:  # one line per failure; the steps that do not need this one still run
            detail, verdict = _one_line(exc), "FAIL"
            failed.append(name)
        seconds = time.perf_counter() - start
        if cuda:
            check.peaks[name] = torch.cuda.max_memory_allocated()
            gc.collect()
            torch.cuda.empty_cache()
        print(f"{head} {verdict} {seconds:7.1f} s  {detail}", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="On a CPU: 2 steps, full precision, no bitsandbytes.")
    parser.add_argument("--wheels", default="", help="Folder of wheels to install first (scripts.fetch_gpu_wheels).")
    parser.add_argument(
        "--data", default="",
        help="PubMedQA folder (ori_pqal.json, test_ground_truth.json). Default: <wheels>/pubmedqa, else $PUBMEDQA_DATA.",
    )
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT), help="Model, adapter, results, installed wheels.")
    parser.add_argument("--verbose", action="store_true", help="The libraries' INFO logs and progress bars too.")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network, and nothing here needs one
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    for stale in ("model", "adapter", "eval"):  # a previous run's files must not pass for this one's
        shutil.rmtree(output_dir / stale, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)

    mode = "DRY RUN on CPU (quantization none)" if args.dry_run else "GPU (bitsandbytes 4-bit NF4, bf16 compute)"
    print(f"GPU check: {mode}", flush=True)
    setup_failed = False
    if args.wheels:
        start = time.perf_counter()
        try:
            line, verdict = install_wheels(Path(args.wheels), (output_dir / "site-packages").resolve()), "PASS"
        except Exception as exc:
            line, verdict, setup_failed = _one_line(exc), "FAIL", True
        print(f"[setup]  wheels   {verdict} {time.perf_counter() - start:7.1f} s  {line}", flush=True)
    else:
        print("[setup]  wheels   none given: the installed packages run", flush=True)
    print(f"[setup]  versions {versions_line()}", flush=True)

    bundled = Path(args.wheels) / "pubmedqa" if args.wheels else None
    data = Path(args.data) if args.data else bundled if bundled and bundled.is_dir() else None
    if data is None:
        from pubmedqa.data import DATA_ENV

        data = Path(os.environ.get(DATA_ENV, "pubmedqa-data"))
    check = Check(dry_run=args.dry_run, data=data, output_dir=output_dir)
    print(f"[setup]  data     {data}; output {output_dir}", flush=True)
    failed = run_steps(check, STEPS) + (["wheels"] if setup_failed else [])
    verdict = f"FAIL ({', '.join(failed)})" if failed else f"PASS ({len(STEPS)}/{len(STEPS)} steps)"
    print(f"VERDICT: {verdict}; results in {output_dir / 'eval'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
