"""The model registry: the one owner of the model in the process, shared by every tab and every user.

It loads the base model once (lazily, or in a background thread), puts the LoRA adapter on top with PEFT, and
selects base or fine-tuned *per call* (PEFT ``adapter_names``), so no request can flip a switch under another one
and a single batch can mix base and adapter rows. There is exactly one copy of the base weights.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from app.calibration import DecisionCalibration, load_calibration
from app.config import ModelSettings
from app.model_loading import ModelLoadError, check_base_source, load_base_model, looks_like_path
from app.prompts import (
    STOP_SEQUENCES,
    FittedPrompt,
    PromptInput,
    cut_at_stop,
    encode_prompt,
    fit_prompt,
    stable_prefix,
    uses_chat_template,
)
from app.scoring import left_pad, score_options

logger = logging.getLogger(__name__)

ADAPTER_NAME = "tuned"
BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


class Variant(str, Enum):
    BASE = "base"
    TUNED = "fine-tuned"


class AdapterUnavailableError(RuntimeError):
    """The fine-tuned variant was asked for but no adapter is loaded; the message says why."""


class LoadState(str, Enum):
    NOT_LOADED = "not loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings of one request. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0

    def validated(self, max_new_tokens_limit: int) -> GenerationSettings:
        """These settings, or a ValueError saying which one is out of range."""
        problems = []
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            problems.append(f"max new tokens must be between 1 and {max_new_tokens_limit}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            problems.append("temperature must be between 0 and 2")
        if not 0.0 < float(self.top_p) <= 1.0:
            problems.append("top-p must be greater than 0 and at most 1")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            problems.append("seed must be an integer between 0 and 4294967295")
        if problems:
            raise ValueError("Invalid generation settings: " + "; ".join(problems) + ".")
        return self


@dataclass
class LoadedModel:
    model: Any  # a transformers model, wrapped in a PeftModel when an adapter is loaded
    tokenizer: Any
    description: str
    quantization: str
    context_window: int
    adapter_loaded: bool
    load_seconds: float
    calibration: DecisionCalibration | None = None  # the adapter's dev-fitted decision offsets, if it ships them


class ModelRegistry:
    """Loads and owns the model; generates for any tab, for base or fine-tuned, safely across threads."""

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._state = LoadState.NOT_LOADED
        self._error: str | None = None
        self._adapter_error: str | None = None
        self._load_lock = threading.Lock()
        # PEFT's per-call adapter selection works through forward hooks registered on the shared LoRA layers,
        # and sampling seeds the global RNG: one generation at a time keeps requests from crossing.
        self._generate_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- loading
    def check_sources(self) -> None:
        """Fail fast, before any loading, on local paths that do not exist."""
        check_base_source(self.settings)
        adapter = self.settings.adapter_source
        if adapter and looks_like_path(adapter) and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"Adapter directory {adapter} has no adapter_config.json. Set --adapter / PUBMEDQA_ADAPTER to a "
                "LoRA adapter folder, a Hub repo id, or 'none'."
            )

    @property
    def state(self) -> LoadState:
        return self._state

    def status_message(self) -> str:
        if self._state is LoadState.READY and self._loaded is not None:
            loaded = self._loaded
            adapter = "LoRA adapter loaded" if loaded.adapter_loaded else f"no adapter ({self.adapter_unavailable_reason()})"
            if loaded.calibration is not None:
                adapter += ", decisions calibrated on dev"
            return f"Ready: {loaded.description}, {loaded.quantization}; {adapter}."
        if self._state is LoadState.FAILED:
            return f"Model failed to load: {self._error}"
        if self._state is LoadState.LOADING:
            return "Loading the model… (the first start converts the embedded model, about a minute)"
        return "The model loads on first use."

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_quietly, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load_quietly(self) -> None:
        try:
            self.load()
        except ModelLoadError:
            pass  # recorded in the state and logged; the UI shows it

    def load(self) -> LoadedModel:
        """The loaded model, loading it first if needed (once per process, whatever the number of callers)."""
        if self._loaded is not None:
            return self._loaded
        with self._load_lock:
            if self._loaded is not None:
                return self._loaded
            if self._state is LoadState.FAILED:
                raise ModelLoadError(self._error)
            self._state = LoadState.LOADING
            try:
                self._loaded = self._load()
            except ModelLoadError as exc:
                self._fail(str(exc))
                raise
            except Exception as exc:  # any library error becomes one readable message
                self._fail(f"{type(exc).__name__}: {exc}")
                raise ModelLoadError(self._error) from exc
            self._state = LoadState.READY
            return self._loaded

    def _fail(self, message: str) -> None:
        self._state = LoadState.FAILED
        self._error = message
        logger.error("Model load failed: %s", message)

    def _load(self) -> LoadedModel:
        started = time.perf_counter()
        base = load_base_model(self.settings)
        model = base.model.eval()
        adapter_loaded, calibration = False, None
        if self.settings.adapter_source:
            model, adapter_loaded = self._attach_adapter(model, self.settings.adapter_source)
            calibration = load_calibration(self.settings.adapter_source) if adapter_loaded else None
        tokenizer = base.tokenizer
        window = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 2048)
        seconds = time.perf_counter() - started
        logger.info("Model ready in %.1f s (%s, %s, adapter: %s)", seconds, base.description, base.quantization, adapter_loaded)
        return LoadedModel(
            model, tokenizer, base.description, base.quantization, window, adapter_loaded, seconds, calibration
        )

    def _attach_adapter(self, model: Any, adapter: str) -> tuple[Any, bool]:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter, adapter_name=ADAPTER_NAME, is_trainable=False)
        except Exception as exc:  # the base model stays usable; the fine-tuned variant says why it is off
            self._adapter_error = (
                f"the adapter {adapter!r} could not be loaded ({type(exc).__name__}: {exc}); "
                "fix --adapter / PUBMEDQA_ADAPTER"
            )
            logger.error("Serving the base model only: %s", self._adapter_error)
            return model, False
        model.eval()
        logger.info("LoRA adapter loaded from %s", adapter)
        return model, True

    # ------------------------------------------------------------------------------------------ queries
    def adapter_unavailable_reason(self) -> str | None:
        """Why the fine-tuned variant cannot be used, or None when it can (or may, once loading finishes)."""
        if self._adapter_error:
            return self._adapter_error
        if not self.settings.adapter_source:
            return "no adapter configured: train one with `python -m training.train` or set PUBMEDQA_ADAPTER"
        return None

    def prompt_budget(self, max_new_tokens: int) -> int:
        loaded = self.load()
        return max(1, min(self.settings.max_input_tokens, loaded.context_window - max_new_tokens))

    def prepare(self, inp: PromptInput, settings: GenerationSettings) -> FittedPrompt:
        """Render ``inp`` in the shared prompt format, fitted to the model's window (see :func:`fit_prompt`)."""
        loaded = self.load()
        return fit_prompt(inp, loaded.tokenizer, self.prompt_budget(settings.max_new_tokens))

    def _adapter_names(self, variants: Sequence[Variant]) -> list[str] | None:
        loaded = self.load()
        if Variant.TUNED in variants and not loaded.adapter_loaded:
            raise AdapterUnavailableError(f"The fine-tuned model is not available: {self.adapter_unavailable_reason()}.")
        if not loaded.adapter_loaded:
            return None
        return [ADAPTER_NAME if v is Variant.TUNED else BASE_ADAPTER_NAME for v in variants]

    # ---------------------------------------------------------------------------------------- generation
    def score_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        batch_size: int = 8,
        calibrated: bool = True,
    ) -> list[dict[str, float]]:
        """yes/no/maybe probabilities of each prompt (option likelihood), each row with its own variant. Fine-tuned
        rows get the adapter's decision calibration when it ships one (``calibrated=False``: raw likelihoods)."""
        loaded = self.load()
        names = self._adapter_names(list(variants))
        with self._generate_lock:
            scores = score_options(loaded.model, loaded.tokenizer, [p.text for p in prompts], batch_size, names)
        if calibrated and loaded.calibration is not None:
            scores = [loaded.calibration.apply(s) if v is Variant.TUNED else s for s, v in zip(scores, variants)]
        return scores

    def stream(
        self,
        prompt: FittedPrompt,
        variant: Variant,
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the answer so far as it is generated. Setting ``cancel`` (or closing the iterator) stops the
        generation within one token."""
        for texts in self.stream_batch([prompt], [variant], settings, cancel):
            yield texts[0]

    def generate(self, prompt: FittedPrompt, variant: Variant, settings: GenerationSettings) -> str:
        """The whole answer at once (the last value of :meth:`stream`)."""
        return self.generate_batch([prompt], [variant], settings)[0]

    def generate_batch(
        self, prompts: Sequence[FittedPrompt], variants: Sequence[Variant], settings: GenerationSettings
    ) -> list[str]:
        """Answers for several prompts in one batched ``generate`` call; each row may use base or fine-tuned."""
        texts: list[str] = []
        for texts in self.stream_batch(prompts, variants, settings):
            pass
        return texts

    def stream_batch(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[str]]:
        """Generate for several prompts in ONE batched call (left padding), each row with base or fine-tuned
        weights (PEFT ``adapter_names``), and yield every row's answer so far after each token. A row ends at EOS
        or a stop sequence; ``cancel`` (or closing the iterator) ends them all within one token."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        loaded = self.load()
        tokenizer = loaded.tokenizer
        stops = self._stops(loaded)
        adapter_names = self._adapter_names(list(variants))
        cancel = cancel or threading.Event()
        ids, mask = left_pad(tokenizer, [encode_prompt(p.text, tokenizer) for p in prompts], self._input_device(loaded))
        streamer = _BatchStreamer(tokenizer, len(prompts), stops)

        class _RowDone(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                done = [cancel.is_set() or stopped for stopped in streamer.stopped]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        kwargs = self._generate_kwargs(loaded, settings, ids, adapter_names)
        kwargs.update(attention_mask=mask, streamer=streamer, stopping_criteria=StoppingCriteriaList([_RowDone()]))
        failure: list[BaseException] = []

        def run() -> None:
            try:
                # Wait for our turn, but give up as soon as the request is cancelled (Stop while queued).
                while not self._generate_lock.acquire(timeout=0.1):
                    if cancel.is_set():
                        return
                try:
                    if not cancel.is_set():
                        torch.manual_seed(settings.seed)
                        with torch.inference_mode():
                            loaded.model.generate(**kwargs)
                finally:
                    self._generate_lock.release()
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
            finally:
                streamer.end()

        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        texts = [""] * len(prompts)
        try:
            while (update := streamer.queue.get()) is not None:
                texts = update
                yield [stable_prefix(cut_at_stop(t, stops)[0], stops).strip() for t in texts]
        finally:
            cancel.set()  # also reached when the consumer closes the stream (Stop button, user left)
            worker.join(timeout=5)  # the worker notices within one token; don't leave it running behind us
        if failure:
            raise failure[0]
        yield [cut_at_stop(t, stops)[0].strip() for t in texts]

    def _stops(self, loaded: LoadedModel) -> tuple[str, ...]:
        # Chat templates end a turn with an end-of-turn token, which generation already stops on.
        return () if uses_chat_template(loaded.tokenizer) else STOP_SEQUENCES

    @staticmethod
    def _input_device(loaded: LoadedModel) -> torch.device:
        return loaded.model.get_input_embeddings().weight.device

    def _generate_kwargs(
        self, loaded: LoadedModel, settings: GenerationSettings, input_ids: torch.Tensor, adapter_names: list[str] | None
    ) -> dict[str, Any]:
        tokenizer = loaded.tokenizer
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(settings.temperature), top_p=float(settings.top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names * input_ids.shape[0] if len(adapter_names) == 1 else adapter_names
        return kwargs


class _BatchStreamer:
    """Collects the tokens ``generate`` produces for every row and queues the decoded texts after each step;
    ``stopped`` tells the stopping criterion which rows have reached a stop sequence."""

    def __init__(self, tokenizer: Any, rows: int, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.stopped = [False] * rows
        self.queue: queue.Queue[list[str] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.tokens), -1)[:, -1].tolist()):
            if not self.stopped[row]:
                self.tokens[row].append(token)
        texts = self.tokenizer.batch_decode(self.tokens, skip_special_tokens=True)
        self.stopped = [done or cut_at_stop(text, self.stops)[1] for done, text in zip(self.stopped, texts)]
        self.queue.put(texts)

    def end(self) -> None:
        self.queue.put(None)
