"""The ``openai`` engine (``--engine openai``): an OpenAI-compatible server (vLLM, Text Generation Inference, or
:mod:`app.openai_api`) serves the base model and the LoRA adapter under two model names, and this process only fits
prompts.

vLLM: ``vllm serve BASE --enable-lora --lora-modules pubmedqa-tuned=ADAPTER_DIR`` serves ``BASE`` and
``pubmedqa-tuned`` (the adapter's name in the app's own /v1 API too); TGI: ``LORA_ADAPTERS=pubmedqa-tuned=ADAPTER_DIR``.
Prompts are rendered and fitted here with the base model's tokenizer (the one shared prompt format), then sent to the
``/completions`` endpoint as text. Decisions come from the server's log-probabilities: the log-likelihood of each
option after the prompt (``echo`` with ``logprobs``, what the in-process engines compute), or, when the server cannot
echo, the option tokens among the top log-probabilities of one generated token.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import torch

from pubmedqa.adapter import Adapter, AdapterError
from pubmedqa.config import ModelSettings
from pubmedqa.decisions.policy import DecisionPolicy
from pubmedqa.engines.base import Engine, EngineError, GenerationSettings, LoadedModel
from pubmedqa.model_loading import load_tokenizer
from pubmedqa.prompts import ANSWER_OPTIONS, FittedPrompt, answer_prefix, cut_at_stop, stable_prefix
from pubmedqa.variants import Variant

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # the most vLLM and OpenAI return; options outside it count as "less likely than any listed"
MAX_PARALLEL_REQUESTS = 32
#: ``--remote_decisions auto``'s one test of echo: past ECHO_PROBE_S seconds for this prompt, decisions come from the
#: top log-probabilities (llama-cpp-python's server: 11 s for a 43-token prompt, minutes with an abstract).
ECHO_PROBE = "Question: Does aspirin reduce the risk of stroke?\nAnswer: yes"
ECHO_PROBE_S = 1.5


class OpenAIEngine(Engine):
    """Base and fine-tuned are two model names on one server; requests for both run concurrently."""

    pair_mode = "two concurrent requests to the model server (base and adapter model names)"
    name = "openai"
    serves_weights_here = False  # the server's weights, which this app cannot see

    def __init__(self, settings: ModelSettings):
        super().__init__(settings)
        self._client: Any = None
        self._echo_supported = settings.remote_decisions != "top"
        self._echo_probed = False
        self._probe_lock = threading.Lock()
        self._one_prompt_per_request = False  # the server refuses a list of prompts (llama-cpp-python's): found once

    # ----------------------------------------------------------------------------------------- loading
    def _load(self) -> LoadedModel:
        from openai import OpenAI

        started = time.perf_counter()
        s = self.settings
        tokenizer, _, _, _ = load_tokenizer(s)
        # The key is handed to the client only; it is never logged or shown.
        self._client = OpenAI(
            base_url=s.base_url, api_key=os.environ.get(s.api_key_env) or "EMPTY", timeout=s.request_timeout,
            max_retries=0,
        )
        served = self._served_models()
        window = int(served.get(s.remote_model, {}).get("max_model_len") or s.max_input_tokens + 1024)
        adapter_loaded = bool(s.adapter_model)
        if not s.adapter_model:
            self._adapter_error = "no adapter model configured: set --adapter_model / PUBMEDQA_ADAPTER_MODEL"
        elif served and s.adapter_model not in served:
            adapter_loaded = False
            self._adapter_error = (
                f"the server at {s.base_url} does not serve {s.adapter_model!r} (it serves {', '.join(sorted(served))})"
            )
        if served and s.remote_model not in served:
            logger.warning("The server at %s does not list %r; requests for the base model may fail.", s.base_url, s.remote_model)
        policy = DecisionPolicy.from_adapter(self._local_adapter() if adapter_loaded else None, reads_hidden_states=False)
        seconds = time.perf_counter() - started
        logger.info("Remote engine ready: %s at %s (adapter model: %s)", s.remote_model, s.base_url, s.adapter_model or "none")
        return LoadedModel(
            None, tokenizer, f"{s.remote_model} at {s.base_url}", "served remotely", window, adapter_loaded, seconds,
            policy,
        )

    def _local_adapter(self) -> Adapter | None:
        """The local adapter folder whose calibration applies to the server's scores; optional (the server's adapter
        model decides), so a missing one is only logged."""
        if self.settings.adapter_source is None:
            return None
        try:
            return Adapter.resolve(self.settings.adapter_source, weights=False)
        except AdapterError as exc:
            logger.warning("No decision calibration for the server's adapter: %s", exc)
            return None

    def adapter_unavailable_reason(self) -> str | None:
        return self._adapter_error  # the server's adapter model name decides, not a local folder

    def _served_models(self) -> dict[str, dict[str, Any]]:
        """The server's models by name, or {} when it cannot be asked now (each request then says why)."""
        try:
            return {m.id: m.model_dump() for m in self._client.models.list().data}
        except Exception as exc:  # an unreachable server must not stop the app from starting
            logger.warning("Could not list the models of %s: %s", self.settings.base_url, _describe(exc, self.settings))
            return {}

    def _model_name(self, variant: Variant) -> str:
        return self.settings.adapter_model if variant is Variant.TUNED else self.settings.remote_model

    def _call(self, **request: Any) -> Any:
        """One completions request; any client error becomes a EngineError with a readable message."""
        try:
            return self._client.completions.create(**request)
        except Exception as exc:
            raise EngineError(_describe(exc, self.settings), getattr(exc, "status_code", None)) from None

    # ---------------------------------------------------------------------------------------- generation
    def score_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        self._require_adapter(variants)
        with ThreadPoolExecutor(max_workers=max(1, min(batch_size, MAX_PARALLEL_REQUESTS))) as pool:
            scores = list(pool.map(self._option_log_scores, prompts, variants))
        tuned = [v is Variant.TUNED for v in variants]
        return self.load().policy.decide(torch.tensor(scores, dtype=torch.float64), tuned)

    def _option_log_scores(self, prompt: FittedPrompt, variant: Variant) -> list[float]:
        """The options' log-scores after ``prompt``: by ``echo`` while the server serves it well, else (or with
        ``--remote_decisions top``) from the top log-probabilities of one generated token."""
        if self._echo_supported and self.settings.remote_decisions == "auto":
            with self._probe_lock:  # one probe; concurrent scorers wait for its verdict
                if not self._echo_probed:
                    self._probe_echo(variant)
        if self._echo_supported:
            try:
                logprobs = self._option_loglikelihoods(prompt.text, variant)
            except EngineError as exc:
                if self.settings.remote_decisions == "echo":
                    raise
                logprobs = self._option_top_logprobs(prompt.text, variant)  # the server down: this fails too
                self._stop_echo(f"echo + logprobs failed: {exc}")
        else:
            logprobs = self._option_top_logprobs(prompt.text, variant)
        return [logprobs[option] for option in ANSWER_OPTIONS]

    def _probe_echo(self, variant: Variant) -> None:
        """Once: whether the server scores a short prompt's positions fast enough for echo to be the way (vLLM and
        this app take milliseconds; llama-cpp-python's server seconds, as it sorts the whole vocabulary at each)."""
        self._echo_probed = True
        started = time.perf_counter()
        try:
            self._call(model=self._model_name(variant), prompt=ECHO_PROBE, max_tokens=1, temperature=0.0, echo=True,
                       logprobs=1)
        except EngineError as exc:
            self._stop_echo(f"echo + logprobs failed: {exc}")
            return
        if (elapsed := time.perf_counter() - started) > ECHO_PROBE_S:
            self._stop_echo(f"echo + logprobs took {elapsed:.1f} s for a {len(ECHO_PROBE)}-character prompt")

    def _stop_echo(self, why: str) -> None:
        if self._echo_supported:
            logger.warning("Decisions from the server's top log-probabilities from now on (%s); "
                           "--remote_decisions echo keeps the exact option likelihoods.", why)
        self._echo_supported = False

    def _option_loglikelihoods(self, text: str, variant: Variant) -> dict[str, float]:
        """Log-likelihood of each option after the prompt, from the echoed prompt log-probabilities."""
        prefix = answer_prefix(self.load().tokenizer)
        candidates = [text + prefix + option for option in ANSWER_OPTIONS]
        choices = self._complete_each(
            candidates, model=self._model_name(variant), max_tokens=1, temperature=0.0, echo=True, logprobs=1
        )
        result = {}
        for option, candidate, choice in zip(ANSWER_OPTIONS, candidates, choices):
            end = len(candidate)
            lp = choice.logprobs
            if lp is None or lp.token_logprobs is None or lp.text_offset is None:
                raise EngineError("The model server returned no log-probabilities for the answer options.")
            picked = [v for v, at in zip(lp.token_logprobs, lp.text_offset) if len(text) <= at < end and v is not None]
            if not picked:
                raise EngineError("The model server returned no log-probabilities for the answer options.")
            result[option] = sum(picked)
        return result

    def _complete_each(self, prompts: list[str], **request: Any) -> list[Any]:
        """One completion choice per prompt, in order: one request with the list where the server takes lists (vLLM,
        TGI, this app), else one request per prompt. A server that refuses the list but takes its first prompt alone
        (llama-cpp-python's takes one prompt per request) is remembered as such."""
        if self._one_prompt_per_request or len(prompts) == 1:
            return [self._call(prompt=p, **request).choices[0] for p in prompts]
        try:
            response = self._call(prompt=prompts, **request)
        except EngineError as exc:
            if exc.status is None or exc.status < 400:
                raise
            first = self._call(prompt=prompts[0], **request).choices[0]  # refused too: not the list's fault
            self._one_prompt_per_request = True
            logger.warning("The model server does not take a list of prompts (%s); sending one prompt per request.",
                           exc.status)
            return [first] + [self._call(prompt=p, **request).choices[0] for p in prompts[1:]]
        return sorted(response.choices, key=lambda c: c.index)

    def _option_top_logprobs(self, text: str, variant: Variant) -> dict[str, float]:
        """The options among the top log-probabilities of the first generated token (a one-token answer)."""
        response = self._call(
            model=self._model_name(variant), prompt=text, max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS
        )
        tops = (response.choices[0].logprobs.top_logprobs or [{}])[0] or {}
        found: dict[str, float] = {}
        for token, value in tops.items():
            option = token.strip().lower()
            if option in ANSWER_OPTIONS:
                found[option] = max(value, found.get(option, -math.inf))
        floor = min(tops.values(), default=0.0) - 1.0  # unlisted: less likely than anything the server listed
        return {option: found.get(option, floor) for option in ANSWER_OPTIONS}

    def stream_batch(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[str]]:
        """One streaming request per row, all at once (the server batches them); rows grow independently."""
        self._require_adapter(variants)
        stops = self.stop_sequences()
        cancel = cancel or threading.Event()
        updates: queue.Queue[tuple[int, str | BaseException | None]] = queue.Queue()

        def run(row: int, prompt: FittedPrompt, variant: Variant) -> None:
            request = {
                "model": self._model_name(variant), "prompt": prompt.text, "max_tokens": settings.max_new_tokens,
                "temperature": float(settings.temperature), "seed": settings.seed, "stream": True,
            }
            if settings.temperature > 0:
                request["top_p"] = float(settings.top_p)
            extra = {}  # vLLM's (and, for the penalty, TGI's) extensions of the OpenAI API
            if settings.repetition_penalty != 1.0:
                extra["repetition_penalty"] = float(settings.repetition_penalty)
            if settings.min_new_tokens:
                extra["min_tokens"] = min(settings.min_new_tokens, settings.max_new_tokens)
            if extra:
                request["extra_body"] = extra
            if stops:
                request["stop"] = list(stops)
            try:
                stream = self._call(**request)
                try:
                    for chunk in stream:
                        if cancel.is_set():
                            break
                        if chunk.choices and chunk.choices[0].text:
                            updates.put((row, chunk.choices[0].text))
                finally:
                    stream.close()
            except Exception as exc:  # includes a connection dropped mid-stream
                updates.put((row, exc if isinstance(exc, EngineError) else EngineError(_describe(exc, self.settings))))
            finally:
                updates.put((row, None))

        workers = [threading.Thread(target=run, args=(i, p, v), daemon=True) for i, (p, v) in enumerate(zip(prompts, variants))]
        for worker in workers:
            worker.start()
        texts = [""] * len(prompts)
        running, failure = len(workers), None
        try:
            while running:
                row, item = updates.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    failure = failure or item
                else:
                    texts[row] += item
                    yield [stable_prefix(cut_at_stop(t, stops)[0], stops).strip() for t in texts]
        finally:
            if running:  # the consumer closed the stream early: end the requests (a set flag reads as "stopped")
                cancel.set()
        if failure:
            raise failure
        yield [cut_at_stop(t, stops)[0].strip() for t in texts]


def _describe(exc: Exception, settings: ModelSettings) -> str:
    """A one-line, secret-free explanation of a failed request to the model server."""
    import openai

    where = f"the model server at {settings.base_url}"
    if isinstance(exc, openai.APITimeoutError):
        return f"{where} did not answer within {settings.request_timeout:g} s; try again or raise --request_timeout."
    if isinstance(exc, openai.APIConnectionError):
        return f"{where} is unreachable; check --base_url / PUBMEDQA_BASE_URL and that the server is running."
    if isinstance(exc, openai.AuthenticationError):
        return f"{where} refused the API key (401); check the variable named by --api_key_env."
    if isinstance(exc, openai.APIStatusError):
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        return f"{where} refused the request ({exc.status_code}: {message or exc.message})."
    return f"{where} failed: {type(exc).__name__}: {exc}"
