"""The local engine: the model runs in this process with transformers, the LoRA adapter with PEFT.

It loads the base model once (lazily, or in a background thread), puts the LoRA adapter on top with PEFT, and
selects base or fine-tuned *per call* (PEFT ``adapter_names``), so no request can flip a switch under another one
and a single batch can mix base and adapter rows. There is exactly one copy of the base weights. The adapter's decision
policy (``pubmedqa/decisions/policy.py``) decides the fine-tuned rows' yes/no/maybe from the option scores and the
probe's features that this engine reads in its own forward passes (``transformers_passes.py``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from pubmedqa.adapter import CONFIG_FILE, Adapter
from pubmedqa.decisions.options import single_token_options
from pubmedqa.decisions.policy import DecisionPolicy, FirstStepDecision
from pubmedqa.engines.base import Engine, GenerationSettings, LoadedModel, TokenScores
from pubmedqa.engines.transformers_passes import (
    ProbeReader,
    decoder_layers,
    first_step_logits_are_raw,
    left_pad,
    option_scores,
    score_ids,
    text_logprobs,
)
from pubmedqa.engines.worker_stream import drain
from pubmedqa.model_loading import ModelLoadError, check_base_source, load_base_model, looks_like_path
from pubmedqa.prompts import FittedPrompt, cut_at_stop, prompt_ids
from pubmedqa.variants import Variant

logger = logging.getLogger(__name__)

ADAPTER_NAME = "tuned"
BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


class TransformersEngine(Engine):
    """Loads and owns the model; generates for any tab, for base or fine-tuned, safely across threads.

    PEFT's per-call adapter selection works through forward hooks registered on the shared LoRA layers, and sampling
    seeds the global RNG: one generation at a time (the model lock) keeps requests from crossing."""

    pair_mode = "one batched generation with per-row adapters (PEFT adapter_names)"
    name = "transformers"

    def check_sources(self) -> None:
        check_base_source(self.settings)
        adapter = self.settings.adapter_source
        if adapter and looks_like_path(adapter) and not (Path(adapter).expanduser() / CONFIG_FILE).is_file():
            raise ModelLoadError(
                f"Adapter directory {adapter} has no {CONFIG_FILE}. Set --adapter / PUBMEDQA_ADAPTER to a "
                "LoRA adapter folder, a Hub repo id, or 'none'."
            )

    def _load(self) -> LoadedModel:
        started = time.perf_counter()
        base = load_base_model(self.settings)
        model = base.model.eval()
        adapter_loaded, policy = False, DecisionPolicy()
        tokenizer = base.tokenizer
        adapter = self.resolve_adapter()
        if adapter is not None:
            model, adapter_loaded = self._attach_adapter(model, adapter)
            if adapter_loaded:
                policy = DecisionPolicy.from_adapter(adapter).checked(
                    len(decoder_layers(model)), model.get_input_embeddings().weight.shape[1],
                    single_token_options(tokenizer) is not None,
                )
        window = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 2048)
        seconds = time.perf_counter() - started
        logger.info("Model ready in %.1f s (%s, %s, adapter: %s)", seconds, base.description, base.quantization, adapter_loaded)
        return LoadedModel(
            model, tokenizer, base.description, base.quantization, window, adapter_loaded, seconds, policy
        )

    def _attach_adapter(self, model: Any, adapter: Adapter) -> tuple[Any, bool]:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter.folder), adapter_name=ADAPTER_NAME, is_trainable=False)
        except Exception as exc:  # the base model stays usable; the fine-tuned variant says why it is off
            self._adapter_error = (
                f"the adapter {adapter.source!r} could not be loaded ({type(exc).__name__}: {exc}); "
                "fix --adapter / PUBMEDQA_ADAPTER"
            )
            logger.error("Serving the base model only: %s", self._adapter_error)
            return model, False
        model.eval()
        logger.info("LoRA adapter loaded from %s", adapter.source)
        return model, True

    def _adapter_names(self, variants: Sequence[Variant]) -> list[str] | None:
        if not self._require_adapter(variants):
            return None
        return [ADAPTER_NAME if v is Variant.TUNED else BASE_ADAPTER_NAME for v in variants]

    # ---------------------------------------------------------------------------------------- generation
    def score_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        loaded = self.load()
        names = self._adapter_names(list(variants))
        tuned = [v is Variant.TUNED for v in variants]
        layer = loaded.policy.feature_layer if any(tuned) else None
        with self._model_lock:
            scores, features = option_scores(
                loaded.model, loaded.tokenizer, [p.text for p in prompts], batch_size, names, layer
            )
        return loaded.policy.decide(scores, tuned, features)

    def token_logprobs(self, text: str, variant: Variant, top: int = 0) -> tuple[list[tuple[str, int, float | None]], dict[str, float]]:
        """Each token of ``text`` with its character offset and log-probability under ``variant`` (None for the
        first), and the ``top`` most likely next tokens: what an OpenAI-compatible server returns for ``echo`` and
        ``logprobs`` (see :mod:`app.openai_api`)."""
        loaded = self.load()
        names = self._adapter_names([variant])
        with self._model_lock:
            return text_logprobs(loaded.model, loaded.tokenizer, text, names, top)

    def score_tokens(self, ids: Sequence[int], variant: Variant, top: int = 0) -> TokenScores:
        loaded = self.load()
        names = self._adapter_names([variant])
        if not ids:
            return TokenScores([], [])
        with self._model_lock:
            logprobs, tops = score_ids(loaded.model, ids, names, top)
        return TokenScores(logprobs, tops)

    def stream_batch(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[str]]:
        """Generate for several prompts in ONE batched call (left padding), each row with base or fine-tuned
        weights (PEFT ``adapter_names``), and yield every row's answer so far after each token. A row ends at EOS
        or a stop sequence; ``cancel`` (or closing the iterator) ends them all within one token. Fine-tuned answers
        open with the decision the adapter's decision policy makes."""
        yield from self._generate(prompts, variants, settings, cancel)

    def generate_with_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
    ) -> tuple[list[str], list[dict[str, float]]]:
        """Answers and decisions in ONE pass over each prompt: the option scores are the logits of the greedy
        generation's first step, the very forward pass that scoring would repeat (a quarter of an evaluation's time
        on a CPU, where a pass over an abstract is compute-bound). Falls back to two passes where
        the first step's logits are not the raw ones (sampling, a repetition penalty) or an option is several
        tokens."""
        loaded = self.load()
        if (
            single_token_options(loaded.tokenizer) is None or settings.temperature > 0
            or not first_step_logits_are_raw(loaded.model.generation_config)
        ):
            return super().generate_with_decisions(prompts, variants, settings)
        decided: list[FirstStepDecision] = []
        texts: list[str] = []
        for texts in self._generate(prompts, variants, settings, None, decided.append):
            pass
        return texts, decided[0].decisions()

    def _generate(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None,
        on_decision: Callable[[FirstStepDecision], None] | None = None,
    ) -> Iterator[list[str]]:
        """:meth:`stream_batch`; ``on_decision`` receives the generation's first-step decision processor."""
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        loaded = self.load()
        tokenizer = loaded.tokenizer
        stops = self.stop_sequences()
        cancel = cancel or threading.Event()
        ids, mask = left_pad(tokenizer, [prompt_ids(p, tokenizer) for p in prompts], self._input_device(loaded))
        streamer = _BatchStreamer(tokenizer, len(prompts), stops)

        class _RowDone(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                done = [cancel.is_set() or stopped for stopped in streamer.stopped]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        kwargs = self._generate_kwargs(loaded, settings, ids, self._adapter_names(list(variants)))
        kwargs.update(attention_mask=mask, streamer=streamer, stopping_criteria=StoppingCriteriaList([_RowDone()]))
        tuned = [v is Variant.TUNED for v in variants] * (len(prompts) if len(variants) == 1 else 1)
        decision, reader = self._first_step_decision(loaded, tuned)
        processors = LogitsProcessorList()
        if decision is not None:  # first: it reads the model's own first-step logits
            processors.append(decision)
            if on_decision is not None:
                on_decision(decision)
        if settings.repetition_penalty != 1.0:  # the answer's own tokens only: the prompt is ignored
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty, prompt_ignore_length=ids.shape[1]))
        if processors:
            kwargs["logits_processor"] = processors
        failure: list[BaseException] = []
        worker = threading.Thread(
            target=self._run_generate, args=(loaded, kwargs, settings.seed, reader, cancel, streamer, failure),
            name="generate", daemon=True,
        )
        worker.start()
        yield from drain(streamer.queue, worker, cancel, failure, len(prompts), self.stop_sequences())

    @staticmethod
    def _first_step_decision(
        loaded: LoadedModel, tuned: list[bool]
    ) -> tuple[FirstStepDecision | None, ProbeReader | None]:
        """The policy's first-step processor for these rows (None when an option is several tokens), and the
        reader of the probe's features it needs, if any."""
        options = single_token_options(loaded.tokenizer)
        if options is None:
            return None, None
        layer = loaded.policy.feature_layer if any(tuned) else None
        reader = ProbeReader(loaded.model, layer) if layer is not None else None
        features = (lambda: reader.pooled[0]) if reader is not None else None  # the pass over the prompts
        return loaded.policy.first_step([o[0] for o in options], tuned, features), reader

    def _run_generate(
        self, loaded: LoadedModel, kwargs: dict[str, Any], seed: int, reader: ProbeReader | None,
        cancel: threading.Event, streamer: _BatchStreamer, failure: list[BaseException],
    ) -> None:
        """The generation thread: waits for the model, generates, and always ends the stream."""
        try:
            if not self._model_lock.acquire(cancel):
                return
            try:
                if not cancel.is_set():
                    torch.manual_seed(seed)
                    with torch.inference_mode(), reader or contextlib.nullcontext():
                        loaded.model.generate(**kwargs)
            finally:
                self._model_lock.release()
        except BaseException as exc:  # re-raised in the consumer's thread
            failure.append(exc)
        finally:
            streamer.end()

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
            "min_new_tokens": min(settings.min_new_tokens, settings.max_new_tokens),
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
