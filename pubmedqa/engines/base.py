"""The one interface every tab, the API and the evaluation use to reach a model, whatever engine runs it.

Implementations live beside it, one per engine (``--engine``): ``llama_cpp_engine.py`` (``llama.cpp``: the GGUF file
in this process, the CPU default), ``transformers_engine.py`` (``transformers``: PEFT in this process, the GPU/QLoRA
path) and ``openai_engine.py`` (``openai``: an OpenAI-compatible server such as vLLM or TGI); ``factory.py`` picks one and
this module knows none of them. It holds what they share: the request types, the load-once state machine, prompt
fitting and the single-prompt conveniences built on ``stream_batch``. How a fine-tuned decision is made is the
adapter's decision policy's, held in ``LoadedModel``; how the page describes the model's state, :mod:`app.model_status`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, Sequence

from pubmedqa.adapter import Adapter, AdapterError
from pubmedqa.config import ModelSettings
from pubmedqa.decisions.policy import DecisionPolicy
from pubmedqa.engines.model_lock import ModelLock
from pubmedqa.engines.precision import precision_mismatch
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import (
    STOP_SEQUENCES,
    FittedPrompt,
    PromptInput,
    fit_prompt,
    uses_chat_template,
)
from pubmedqa.variants import Variant

logger = logging.getLogger(__name__)


#: Chosen on the dev questions (see docs/results.md, "Readable answers"); 1 = off.
DEFAULT_REPETITION_PENALTY = 1.2
#: No end of sequence before this many answer tokens, so an answer explains its decision instead of stopping at
#: "yes." (its decision word and period are two tokens); chosen on the dev questions (docs/results.md, "Readable answers").
DEFAULT_MIN_NEW_TOKENS = 3


class AdapterUnavailableError(RuntimeError):
    """The fine-tuned variant was asked for but no adapter is loaded; the message says why."""


class EngineError(RuntimeError):
    """The model server failed a request (unreachable, refused, timed out); the message says what to check."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status of a refused request


class LoadState(str, Enum):
    NOT_LOADED = "not loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings of one request. ``temperature == 0`` means greedy decoding.

    ``repetition_penalty`` (CTRL's: a token the answer already contains has its positive logit divided by it, its
    negative one multiplied; 1 = off) counts the answer's own tokens only, never the prompt's, so the first token,
    from which a decision is read, stays the model's own on every engine. ``min_new_tokens`` forbids the end of
    sequence before that many answer tokens (stop sequences still end an answer)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS

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
        if not 1.0 <= float(self.repetition_penalty) <= 2.0:
            problems.append("repetition penalty must be between 1 (off) and 2")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= max_new_tokens_limit:
            problems.append(f"min new tokens must be between 0 and {max_new_tokens_limit}")
        if problems:
            raise ValueError("Invalid generation settings: " + "; ".join(problems) + ".")
        return self


@dataclass
class LoadedModel:
    model: Any  # a transformers model (a PeftModel when an adapter is loaded); None for a remote server
    tokenizer: Any  # always local: prompts are fitted and tokens counted here
    description: str
    quantization: str
    context_window: int
    adapter_loaded: bool
    load_seconds: float
    policy: DecisionPolicy = field(default_factory=DecisionPolicy)  # how the fine-tuned variant decides


@dataclass(frozen=True)
class TokenScores:
    """A token sequence as the model scores it (what ``/v1/completions`` echoes with ``logprobs``): ``logprobs[i]``
    is the log-probability of token ``i + 1`` given the tokens before it, ``top[i]`` the ``top`` most likely
    (token id, log-probability) after the first ``i + 1`` tokens, the last entry after all of them (the next token,
    most likely first)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


def score_rows(rows: Any, targets: Sequence[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of ``targets`` (one per row of logits ``rows``, a tensor n x vocab; the last row may have
    none) and each row's ``top`` (at least one) most likely tokens: one log-sum-exp and one partial top-k per row,
    never a sort of a whole row."""
    import torch

    rows = rows.float()
    normaliser = torch.logsumexp(rows, dim=-1, keepdim=True)
    picked = rows[torch.arange(len(targets)), torch.as_tensor(list(targets), dtype=torch.long)] if targets else None
    values, indices = torch.topk(rows, max(1, top), dim=-1)
    values = values - normaliser
    logprobs = (picked - normaliser[: len(targets), 0]).tolist() if picked is not None else []
    return logprobs, [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


class Engine(ABC):
    """Loads once (lazily or in a background thread), then answers several prompts per call, each row with its own
    variant (base or fine-tuned). A Compare pair is one call with a base row and a fine-tuned row, both streaming at
    once: the transformers engine decodes them as one batch whose rows select their adapter (PEFT ``adapter_names``),
    the llama.cpp engine side by side on two contexts over the same weights (LoRA off / on, one token of each in
    turn), the ``openai`` engine as two concurrent requests. The transformers engine generates for one request at a
    time; background work (an evaluation in the app) calls :meth:`give_way` between its batches so that visitors go
    first. The llama.cpp engine decodes the rows of every request together, and an evaluation's rows give way to
    visitors' inside its scheduler (``llama_cpp_scheduler.py``)."""

    #: How Compare produces its pair (see above), shown in the tab's info line.
    pair_mode: str = ""
    #: The engine's name, as ``--engine`` spells it.
    name: str = ""
    #: Whether this process sees the weights the adapter is served on (not a remote server's).
    serves_weights_here: bool = True
    #: Whether the rows of one call are computed together (a batch); if not, they run one after another and a larger
    #: call gains nothing, so background work can hand the model back after every row.
    batches_rows: bool = True

    @property
    def concurrent_requests(self) -> int:
        """Requests this engine answers at once (the app's ``concurrency_limit`` 0): one here, where generation is
        one request at a time; the llama.cpp engine batches every request's rows."""
        return 1

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._state = LoadState.NOT_LOADED
        self._error: str | None = None
        self._adapter_error: str | None = None
        self.adapter: Adapter | None = None  # the fine-tuned variant's adapter, resolved once at load
        self._load_lock = threading.Lock()
        self._model_lock = ModelLock()  # an in-process engine generates for one request at a time
        self.notice: str | None = None  # what the status line adds, e.g. why another engine runs than was asked
        self.precision_note: str | None = None  # set at load when the adapter is served on other weights than trained

    # ----------------------------------------------------------------------------------------- loading
    @abstractmethod
    def _load(self) -> LoadedModel: ...

    def check_sources(self) -> None:
        """Fail fast, before any loading, on settings that cannot work (e.g. folders that do not exist)."""

    @property
    def state(self) -> LoadState:
        return self._state

    @property
    def loaded(self) -> LoadedModel | None:
        """The loaded model, or None before loading ends (see :attr:`state`)."""
        return self._loaded

    @property
    def error(self) -> str | None:
        """Why loading failed (state FAILED), else None."""
        return self._error

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
            if self._loaded.adapter_loaded and self.serves_weights_here and self.adapter is not None:
                self.precision_note = precision_mismatch(
                    self.settings, self.adapter, self._loaded.quantization, self.name
                )
                if self.precision_note:
                    logger.warning("Note: %s", self.precision_note)
            self._state = LoadState.READY
            return self._loaded

    def _fail(self, message: str) -> None:
        self._state = LoadState.FAILED
        self._error = message
        logger.error("Model load failed: %s", message)

    def resolve_adapter(self) -> Adapter | None:
        """The adapter the settings name, resolved once (a folder, or a Hub snapshot) for the engine to load; None
        without one, or when it cannot be resolved: the base keeps serving and the fine-tuned variant says why."""
        source = self.settings.adapter_source
        if source is None:
            return None
        try:
            self.adapter = Adapter.resolve(source)
        except AdapterError as exc:
            self._adapter_error = f"{exc}; fix --adapter / PUBMEDQA_ADAPTER"
            logger.error("Serving the base model only: %s", self._adapter_error)
        return self.adapter

    # ------------------------------------------------------------------------------------------ queries
    def adapter_unavailable_reason(self) -> str | None:
        """Why the fine-tuned variant cannot be used, or None when it can (or may, once loading finishes)."""
        if self._adapter_error:
            return self._adapter_error
        if not self.settings.adapter_source:
            return "no adapter configured: train one with `python -m scripts.train` or set PUBMEDQA_ADAPTER"
        return None

    def prompt_budget(self, max_new_tokens: int) -> int:
        loaded = self.load()
        return max(1, min(self.settings.max_input_tokens, loaded.context_window - max_new_tokens))

    def prepare(self, inp: PromptInput, settings: GenerationSettings) -> FittedPrompt:
        """Render ``inp`` in the shared prompt format, fitted to the model's window (see :func:`fit_prompt`)."""
        loaded = self.load()
        return fit_prompt(inp, loaded.tokenizer, self.prompt_budget(settings.max_new_tokens))

    def stop_sequences(self) -> tuple[str, ...]:
        # Chat templates end a turn with an end-of-turn token, which generation already stops on.
        return () if uses_chat_template(self.load().tokenizer) else STOP_SEQUENCES

    def count_tokens(self, text: str) -> int:
        return len(self.load().tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _require_adapter(self, variants: Sequence[Variant]) -> bool:
        """Whether the adapter is loaded; AdapterUnavailableError if a fine-tuned row is asked for without it."""
        loaded = self.load()
        if Variant.TUNED in variants and not loaded.adapter_loaded:
            raise AdapterUnavailableError(f"The fine-tuned model is not available: {self.adapter_unavailable_reason()}.")
        return loaded.adapter_loaded

    # ---------------------------------------------------------------------------------------- generation
    @abstractmethod
    def score_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        """yes/no/maybe probabilities of each prompt, each row with its own variant, as the adapter's decision policy
        decides them (:meth:`DecisionPolicy.without_offsets` gives the fine-tuned rows' without its offsets)."""

    @abstractmethod
    def stream_batch(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[str]]:
        """Generate for several prompts at once, each row with base or fine-tuned, and yield every row's answer so
        far as it grows; the last value is final. ``cancel`` (or closing the iterator) stops them all."""

    def stream_decided(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        decisions: list[dict[str, float]] | None = None,
    ) -> Iterator[list[str]]:
        """:meth:`stream_batch`, and each row's yes/no/maybe probabilities (:meth:`score_decisions`) appended to
        ``decisions`` once known; none after a cancel or a failed scoring (logged). Here a second pass over the
        prompts once the answers are done; the llama.cpp engine reads them off each answer's first step, so that a
        prompt is read once."""
        yield from self.stream_batch(prompts, variants, settings, cancel)
        if decisions is None or (cancel is not None and cancel.is_set()):
            return
        try:
            decisions.extend(self.score_decisions(prompts, variants, len(prompts)))
        except Exception as exc:  # the answers stand without their scores
            logger.warning("Could not score the answers' decisions: %s", exc)

    def token_logprobs(
        self, text: str, variant: Variant, top: int = 0
    ) -> tuple[list[tuple[str, int, float | None]], dict[str, float]]:
        """Each token of ``text`` with its character offset and log-probability under ``variant`` (None where not
        scored), and the ``top`` most likely next tokens: what an OpenAI-compatible server returns for ``echo`` and
        ``logprobs`` (see :mod:`app.openai_api`). Only the in-process engines have them."""
        raise NotImplementedError(f"{type(self).__name__} does not give token log-probabilities")

    def score_tokens(self, ids: Sequence[int], variant: Variant, top: int = 0) -> TokenScores:
        """Every token of ``ids`` (used as given: no BOS added) scored under ``variant`` given the ones before it, and
        the ``top`` most likely tokens after each prefix (:class:`TokenScores`). Only the in-process engines have
        them."""
        raise NotImplementedError(f"{type(self).__name__} does not give token log-probabilities")

    def give_way(self, cancel: threading.Event | None = None) -> None:
        """Wait while other requests hold or wait for the model: what background work (an evaluation in the app) calls
        between its batches, so that visitors' requests go first."""
        self._model_lock.wait_until_idle(cancel)

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
        """Answers for several prompts at once; each row may use base or fine-tuned."""
        texts: list[str] = []
        for texts in self.stream_batch(prompts, variants, settings):
            pass
        return texts

    def generate_with_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
    ) -> tuple[list[str], list[dict[str, float]]]:
        """Answers and yes/no/maybe probabilities of several prompts (what the evaluation needs of each question).
        Here, two passes; a engine that can read the decision off the generation's own first step overrides it."""
        return self.generate_batch(prompts, variants, settings), self.score_decisions(prompts, variants, len(prompts))
