"""The llama.cpp engine: the base model's 4-bit GGUF file served in this process by llama-cpp-python, the fastest
engine on a CPU (about five times the transformers 4-bit engine on 2 cores, see ``benchmarks/engines.py``).

One model is loaded once, with two contexts over its weights: the base's (no LoRA) and, when an adapter is loaded, the
fine-tuned one's, whose LoRA (a GGUF LoRA derived from the PEFT adapter folder, ``pubmedqa/gguf/lora.py``) is set once
and stays on (a LoRA belongs to a context in llama.cpp, and switching it re-plans the compute graph). Every answer from
every entry point (Chat, Compare, the APIs, an evaluation) is a row on its variant's context, and one scheduler
(``llama_cpp_scheduler.py``) decodes the rows of all requests together, ``parallel_rows`` per context (continuous
batching: a row joins at the next step and frees its sequence when it ends). Decision scoring is a row's prompt read
alone. The fine-tuned rows' yes/no/maybe is decided by the adapter's decision policy, from the first step's logits and
the probe's features read during the prompt's own decode (``llama_cpp_features.py``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pubmedqa.adapter import Adapter
from pubmedqa.config import EMBEDDED_MODEL, ModelSettings
from pubmedqa.decisions.options import single_token_options
from pubmedqa.decisions.policy import DecisionPolicy, FirstStepDecision
from pubmedqa.embedded_model import DESCRIPTION as EMBEDDED_DESCRIPTION
from pubmedqa.engines.base import Engine, GenerationSettings, LoadedModel, TokenScores
from pubmedqa.engines.llama_cpp_batch import BatchDecoder
from pubmedqa.engines.llama_cpp_context_rows import SPARE_SEQUENCES, ContextRows, Row
from pubmedqa.engines.llama_cpp_scheduler import Scheduler
from pubmedqa.gguf.source import check_gguf, gguf_file
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import FittedPrompt, cut_at_stop, prompt_ids, shared_prompt_start, stable_prefix
from pubmedqa.variants import Variant

logger = logging.getLogger(__name__)

N_BATCH = 512  # tokens per llama_decode call (and micro-batch)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing or broken build both mean "use the other engine"
        return False
    return True


class GgufTokenizer:
    """The GGUF's own tokenizer (llama.cpp's), offering the part of the transformers tokenizer interface that prompt
    fitting, option scoring and decoding use. Reading a transformers tokenizer out of a GGUF takes about a minute;
    this one is ready with the model."""

    def __init__(self, llm: Any):
        self._llm = llm
        metadata = llm.metadata
        self.chat_template: str | None = metadata.get("tokenizer.chat_template") or None
        self.eos_token_id: int = llm.token_eos()
        self.bos_token_id: int = llm.token_bos()
        self.eos_token = self._piece(self.eos_token_id)
        self.bos_token = self._piece(self.bos_token_id)
        pad = int(metadata.get("tokenizer.ggml.padding_token_id", self.eos_token_id))
        self.pad_token_id = pad
        self.model_max_length = context_window(llm)
        # A SentencePiece vocabulary that adds a word boundary in front of every text (Llama 2, Mistral, TinyLlama; not
        # Gemma's): llama.cpp adds it to a piece tokenised on its own too, so " yes" would be "▁" + "▁yes" where the
        # model reads the one token "▁yes" after "Answer:". A piece's own leading space is that boundary instead.
        self._adds_space_prefix = metadata.get("tokenizer.ggml.model") == "llama" and str(
            metadata.get("tokenizer.ggml.add_space_prefix", "true")
        ).lower() == "true"

    def __len__(self) -> int:
        """The vocabulary's size, as ``len()`` of a transformers tokenizer gives it."""
        return self._llm.n_vocab()

    def _piece(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        if not add_special_tokens and self._adds_space_prefix and text.startswith(" "):
            text = text[1:]  # a continuation: llama.cpp puts the word boundary back (see __init__)
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return {"input_ids": ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="ignore")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        import jinja2

        template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template or "")
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


class LlamaCppEngine(Engine):
    """Loads the GGUF once; answers every request's rows together, base and fine-tuned each on its own context."""

    pair_mode = ("two llama.cpp contexts on the one model (LoRA off / on), both answers decoded side by side with "
                 "every other visitor's")
    name = "llama.cpp"

    def __init__(self, settings: ModelSettings):
        super().__init__(settings)
        self._llm: Any = None
        self._lora: Any = None
        self._tuned_context: Any = None
        self._scheduler: Scheduler | None = None

    def check_sources(self) -> None:
        if self.settings.base_model != EMBEDDED_MODEL:
            check_gguf(self.settings.base_model)  # a Hub GGUF is downloaded by the load, after the page is up

    def _load(self) -> LoadedModel:
        import llama_cpp

        from pubmedqa.engines.llama_cpp_features import open_llama
        from pubmedqa.engines.llama_cpp_native import check_bindings

        started = time.perf_counter()
        try:
            check_bindings()
        except RuntimeError as exc:
            raise ModelLoadError(str(exc)) from exc
        path = gguf_file(self.settings.base_model, self.settings.cache_dir)
        adapter = self.resolve_adapter()
        policy = DecisionPolicy.from_adapter(adapter, self.name)
        rows = self.settings.parallel_rows
        try:
            # One sequence per row and the spare ones (token scoring, the cached prompt start); the base's context
            # needs no probe reader.
            llm, _ = open_llama(
                str(path), self.settings.max_input_tokens + 1024, os.cpu_count(), None, n_batch=N_BATCH,
                n_seq_max=rows + SPARE_SEQUENCES,
            )
        except Exception as exc:
            raise ModelLoadError(f"{path} could not be loaded by llama.cpp ({type(exc).__name__}: {exc})") from exc
        self._llm = llm
        tokenizer = GgufTokenizer(llm)
        window = context_window(llm)
        contexts = {Variant.BASE: ContextRows("base", BatchDecoder(llm, N_BATCH), None, rows, window)}
        adapter_loaded = adapter is not None and self._attach_adapter(path, adapter)
        if adapter_loaded:
            n_layer, n_embd = llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_embd(llm.model)
            policy = policy.checked(n_layer, n_embd, single_token_options(tokenizer) is not None)
            contexts[Variant.TUNED] = self._tuned_rows(policy.feature_layer, rows, window)
        else:
            policy = DecisionPolicy()
        self._scheduler = Scheduler(contexts, tokenizer.decode, llm.n_vocab(), shared_prompt_start(tokenizer))
        description = EMBEDDED_DESCRIPTION if self.settings.base_model == EMBEDDED_MODEL else path.name
        seconds = time.perf_counter() - started
        logger.info("Model ready in %.1f s (%s, llama.cpp, adapter: %s, %d rows per context)", seconds, description,
                    adapter_loaded, rows)
        return LoadedModel(
            None, tokenizer, description, f"{file_type(llm)} GGUF, llama.cpp", window, adapter_loaded, seconds, policy,
        )

    def _attach_adapter(self, base_path: Path, adapter: Adapter) -> bool:
        """Load the adapter as a GGUF LoRA beside the model; on failure the base keeps serving and the fine-tuned
        variant says why."""
        import llama_cpp

        from pubmedqa.gguf.lora import cached_gguf_lora

        try:
            lora_path = cached_gguf_lora(adapter, base_path, self.settings.cache_dir)
            lora = llama_cpp.llama_adapter_lora_init(self._llm.model, str(lora_path).encode())
            if not lora:
                raise RuntimeError(f"llama.cpp refused {lora_path} (tensor names or shapes do not match the model)")
        except Exception as exc:  # noqa: BLE001 - any failure leaves the base serving, with the reason shown
            self._adapter_error = (
                f"the adapter {adapter.source!r} could not be loaded on llama.cpp ({type(exc).__name__}: {exc}); "
                "fix --adapter / PUBMEDQA_ADAPTER"
            )
            logger.error("Serving the base model only: %s", self._adapter_error)
            return False
        self._lora = lora
        logger.info("LoRA adapter loaded from %s (GGUF LoRA %s)", adapter.source, lora_path)
        return True

    def _tuned_rows(self, feature_layer: int | None, rows: int, window: int) -> ContextRows:
        """The fine-tuned variant's context: the same weights, its own cache of ``rows`` + 1 sequences, the LoRA set
        once and left on, and the probe's reader where the policy reads one."""
        import llama_cpp

        from pubmedqa.engines.llama_cpp_features import reader_for
        from pubmedqa.engines.llama_cpp_native import second_context

        try:
            reader = reader_for(self._llm, feature_layer) if feature_layer is not None else None
        except ValueError as exc:
            raise ModelLoadError(f"the adapter's decision probe does not fit this model: {exc}") from exc
        context = second_context(self._llm, window, rows + SPARE_SEQUENCES, reader.callback if reader else None)
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora)
        llama_cpp.llama_set_adapters_lora(context.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        self._tuned_context = context  # the context keeps only raw pointers to what it was created with
        return ContextRows("fine-tuned", BatchDecoder(self._llm, N_BATCH, context), reader, rows, window)

    @property
    def concurrent_requests(self) -> int:
        """A full batch of rows on each context."""
        return 2 * self.settings.parallel_rows

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of the loaded model's contexts (loading it first if needed)."""
        self.load()
        return self._scheduler

    # ---------------------------------------------------------------------------------------- decisions
    def score_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        """Each prompt read as a row of its own (background work: visitors' rows go first); the option scores are
        the first step's logits."""
        loaded = self.load()
        options = single_token_options(loaded.tokenizer)
        if options is None:
            raise NotImplementedError("the llama.cpp engine scores one-token answer options only")
        columns = [ids[0] for ids in options]
        read: list[tuple[torch.Tensor, torch.Tensor | None]] = [None] * len(prompts)  # type: ignore[list-item]

        def keep(index: int) -> Callable[[np.ndarray, torch.Tensor | None], np.ndarray]:
            def first_step(logits: np.ndarray, features: torch.Tensor | None) -> np.ndarray:
                read[index] = (torch.from_numpy(logits[columns]), features)
                return logits

            return first_step

        reading = self._run_rows(
            prompts, variants, GenerationSettings(max_new_tokens=1), None, keep, background=True, generate=False
        )
        for _ in reading:
            pass
        tuned = [v is Variant.TUNED for v in variants]
        stacked = _stack_features([features for _, features in read])
        return loaded.policy.decide(torch.stack([scores for scores, _ in read]), tuned, stacked)

    def generate_with_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
    ) -> tuple[list[str], list[dict[str, float]]]:
        """Answers and decisions in one pass over each prompt (the decision is read off the first step's logits),
        as background rows: an evaluation in the app gives way to visitors."""
        if single_token_options(self.load().tokenizer) is None:
            return super().generate_with_decisions(prompts, variants, settings)
        decisions: list[dict[str, float]] = []
        texts: list[str] = []
        for texts in self._stream(prompts, variants, settings, None, decisions, background=True):
            pass
        return texts, decisions

    def token_logprobs(
        self, text: str, variant: Variant, top: int = 0, tail: int = 16
    ) -> tuple[list[tuple[str, int, float | None]], dict[str, float]]:
        """Each token of ``text`` with its character offset and log-probability under ``variant`` (None for the
        first, and before the last ``tail`` tokens), and the ``top`` most likely next tokens: what an
        OpenAI-compatible server returns for ``echo`` and ``logprobs``, as the transformers engine gives it."""
        loaded = self.load()
        self._require_adapter([variant])
        tokenizer = loaded.tokenizer
        ids = tokenizer(text)["input_ids"]
        keep = min(tail, len(ids) - 1) + 1  # the rows predicting the last ``keep - 1`` tokens, and the next one
        rows = self.scheduler.run_job(variant, lambda decoder, sequence: decoder.prompt(sequence, ids, outputs=keep))
        logprobs = torch.log_softmax(torch.from_numpy(rows.reshape(keep, -1)), dim=-1)
        first_scored = len(ids) - keep + 1  # logits row r predicts token first_scored + r
        pieces, offset = [], 0
        for i, token in enumerate(ids):
            piece = tokenizer.decode([token], skip_special_tokens=False)
            value = logprobs[i - first_scored, token].item() if i >= first_scored else None
            pieces.append((piece, offset, value))
            offset += len(piece) if i > 0 or token != tokenizer.bos_token_id else 0
        best = torch.topk(logprobs[-1], top) if top else None
        following = {tokenizer.decode([i]): v for v, i in zip(best.values.tolist(), best.indices.tolist())} if best else {}
        return pieces, following

    def score_tokens(self, ids: Sequence[int], variant: Variant, top: int = 0) -> TokenScores:
        self._require_adapter([variant])
        if not ids:
            return TokenScores([], [])
        logprobs, tops = self.scheduler.run_job(variant, lambda decoder, sequence: decoder.score(sequence, ids, top))
        return TokenScores(logprobs, tops)

    # --------------------------------------------------------------------------------------- generation
    def stream_batch(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[str]]:
        """Every prompt a row with its own variant (a base and a fine-tuned row side by side), decoded with every
        other request's rows; every row's answer so far is yielded as it grows. ``cancel`` (or closing the
        iterator) ends them within one step."""
        yield from self._stream(prompts, variants, settings, cancel)

    def stream_decided(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        decisions: list[dict[str, float]] | None = None,
    ) -> Iterator[list[str]]:
        """:meth:`stream_batch`, each row's decision read off its answer's first step (the prompt is read once)."""
        if single_token_options(self.load().tokenizer) is None:
            yield from super().stream_decided(prompts, variants, settings, cancel, decisions)
            return
        yield from self._stream(prompts, variants, settings, cancel, decisions)

    def _stream(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None,
        decisions: list[dict[str, float]] | None = None,
        background: bool = False,
    ) -> Iterator[list[str]]:
        """The answers of ``prompts`` (cut at a stop sequence, without a half-written one) as they grow, then the
        final ones; with ``decisions``, each row's decision appended in row order once every row has one (not
        after a cancel)."""
        loaded = self.load()
        variants = list(variants) * (len(prompts) if len(variants) == 1 else 1)
        stops = self.stop_sequences()
        first_steps: list[FirstStepDecision | None] = [None] * len(prompts)

        def decide(index: int) -> Callable[[np.ndarray, torch.Tensor | None], np.ndarray]:
            tuned = variants[index] is Variant.TUNED

            def first_step(logits: np.ndarray, features: torch.Tensor | None) -> np.ndarray:
                decision = self._first_step(loaded, tuned, features)
                first_steps[index] = decision
                return logits if decision is None else decision(None, torch.from_numpy(logits[None]))[0].numpy()

            return first_step

        cancel = cancel if cancel is not None else threading.Event()
        texts: list[str] = [""] * len(prompts)
        for texts in self._run_rows(prompts, variants, settings, cancel, decide, background=background):
            yield [stable_prefix(cut_at_stop(t, stops)[0], stops).strip() for t in texts]
        if decisions is not None and not cancel.is_set() and all(step is not None for step in first_steps):
            decisions.extend(step.decisions()[0] for step in first_steps)
        yield [cut_at_stop(t, stops)[0].strip() for t in texts]

    def _run_rows(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None,
        first_step: Callable[[int], Callable[[np.ndarray, torch.Tensor | None], np.ndarray]],
        background: bool,
        generate: bool = True,
    ) -> Iterator[list[str]]:
        """Each prompt a :class:`Row` on its variant's context, ``first_step(index)`` its first step; every row's raw
        text after each of their updates, until all are done; then a row's error is raised. Closing the iterator
        sets ``cancel``, which frees the rows at the next step."""
        loaded = self.load()
        self._require_adapter(variants)
        stops = self.stop_sequences()
        cancel = cancel if cancel is not None else threading.Event()
        updates: queue.Queue[bool] = queue.Queue()
        reads = loaded.policy.feature_layer is not None
        rows = [
            Row(prompt_ids(prompt, loaded.tokenizer), settings, stops, lambda row: updates.put(row.done), cancel,
                first_step(index), reads and variant is Variant.TUNED, background, generate)
            for index, (prompt, variant) in enumerate(zip(prompts, variants))
        ]
        for row, variant in zip(rows, variants):
            self.scheduler.submit(variant, row)
        pending, finished = len(rows), False
        try:
            while pending:
                pending -= updates.get()
                while pending and not updates.empty():  # a consumer that fell behind takes the latest texts at once
                    pending -= updates.get()
                yield [row.text for row in rows]
            finished = True
        finally:
            if not finished:  # the consumer closed the stream (Stop, the visitor left): free the rows
                cancel.set()
        failed = next((row.error for row in rows if row.error is not None), None)
        if failed is not None:
            raise failed

    @staticmethod
    def _first_step(loaded: LoadedModel, tuned: bool, features: torch.Tensor | None) -> FirstStepDecision | None:
        options = single_token_options(loaded.tokenizer)
        if options is None:
            return None
        return loaded.policy.first_step([o[0] for o in options], [tuned], (lambda: features) if features is not None else None)


def _stack_features(features: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One row per prompt (zeros where a row needs none: the policy reads the fine-tuned rows only)."""
    present = [f for f in features if f is not None]
    if not present:
        return None
    width = present[0].shape[-1]
    return torch.cat([f.reshape(1, width) if f is not None else torch.zeros(1, width) for f in features])


def context_window(llm: Any) -> int:
    """Tokens one answer may use: one sequence's share of a context that holds several (the scheduler holds every row
    to it, so that the rows always fit together)."""
    import llama_cpp

    return int(llama_cpp.llama_n_ctx(llm.ctx) // llama_cpp.llama_n_seq_max(llm.ctx))


def file_type(llm: Any) -> str:
    """The GGUF's quantisation as gguf-py names its ``general.file_type``, e.g. 'Q4_K_M'."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(llm.metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        return "quantised"

