"""The llama.cpp engine: the base model's 4-bit GGUF file served in this process by llama-cpp-python, the fastest
engine on a CPU (about five times the transformers 4-bit engine on 2 cores, see ``benchmarks/engines.py``).

One model is loaded once and one context serves one request at a time. The LoRA adapter is loaded beside it (a
GGUF LoRA derived from the PEFT adapter folder, ``pubmedqa/gguf/lora.py``) and switched per row: on for fine-tuned, off for
base, with the KV cache cleared in between, since a prompt cached under the other variant would be wrong. A Compare
pair is the exception: its fine-tuned answer decodes on a second context over the same weights, whose LoRA stays on,
so both answers stream side by side (one token of each in turn). Every answer is decoded by the one loop of
``llama_cpp_batch.py`` (:class:`~pubmedqa.engines.llama_cpp_batch.DecodeLoop`): an evaluation batch of one variant
as up to ``PARALLEL_ROWS`` rows decoded together, a streamed answer as a loop of one row, a Compare pair as a loop on
each context stepped in turn; decision scoring is the loop's prompt phase alone. The fine-tuned rows' yes/no/maybe
is decided by the adapter's decision policy, from the last position's logits and the probe's features read during
the prompt's own decode (``llama_cpp_features.py``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pubmedqa.adapter import Adapter
from pubmedqa.config import EMBEDDED_MODEL, ModelSettings
from pubmedqa.decisions.options import single_token_options
from pubmedqa.decisions.policy import DecisionPolicy, FirstStepDecision
from pubmedqa.embedded_model import DESCRIPTION as EMBEDDED_DESCRIPTION
from pubmedqa.engines.base import Engine, GenerationSettings, LoadedModel, TokenScores
from pubmedqa.engines.llama_cpp_batch import PARALLEL_ROWS, Answer, BatchDecoder, DecodeLoop, RowStart
from pubmedqa.engines.worker_stream import drain
from pubmedqa.gguf.source import check_gguf, gguf_file
from pubmedqa.model_loading import ModelLoadError
from pubmedqa.prompts import FittedPrompt, cut_at_stop, prompt_ids
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
    """Loads the GGUF once; generates for base or fine-tuned per row, one request at a time."""

    pair_mode = "two llama.cpp contexts on the one model (LoRA off / on), the two answers decoded side by side"
    name = "llama.cpp"
    batches_rows = False

    def __init__(self, settings: ModelSettings):
        super().__init__(settings)
        self._llm: Any = None
        self._reader: Any = None
        self._lora: Any = None
        self._lora_on: bool | None = None
        self._rows: BatchDecoder | None = None
        self._pair: tuple[BatchDecoder, Any] | None = None

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
        try:
            llm, reader = open_llama(
                str(path), self.settings.max_input_tokens + 1024, os.cpu_count(), policy.feature_layer,
                n_batch=N_BATCH, n_seq_max=PARALLEL_ROWS,
            )
        except Exception as exc:
            raise ModelLoadError(f"{path} could not be loaded by llama.cpp ({type(exc).__name__}: {exc})") from exc
        self._llm, self._reader = llm, reader
        self._rows = BatchDecoder(llm, N_BATCH)
        tokenizer = GgufTokenizer(llm)
        adapter_loaded = adapter is not None and self._attach_adapter(path, adapter)
        if adapter_loaded:
            n_layer, n_embd = llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_embd(llm.model)
            policy = policy.checked(n_layer, n_embd, single_token_options(tokenizer) is not None)
        else:
            policy = DecisionPolicy()
        description = EMBEDDED_DESCRIPTION if self.settings.base_model == EMBEDDED_MODEL else path.name
        seconds = time.perf_counter() - started
        logger.info("Model ready in %.1f s (%s, llama.cpp, adapter: %s)", seconds, description, adapter_loaded)
        return LoadedModel(
            None, tokenizer, description, f"{file_type(llm)} GGUF, llama.cpp", context_window(llm), adapter_loaded, seconds,
            policy,
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

    # ---------------------------------------------------------------------------------------------- steps
    def _select(self, variant: Variant) -> None:
        """Switch the LoRA for ``variant`` and start from an empty KV cache (a cached prompt belongs to one variant)."""
        import llama_cpp

        from pubmedqa.engines.llama_cpp_native import main_context

        lora_on = variant is Variant.TUNED
        if lora_on != self._lora_on:
            if lora_on:
                adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora)
                llama_cpp.llama_set_adapters_lora(self._llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
            else:
                llama_cpp.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
            self._lora_on = lora_on
        main_context(self._llm).kv_cache_clear()

    # ---------------------------------------------------------------------------------------- decisions
    def score_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        loaded = self.load()
        self._require_adapter(variants)
        options = single_token_options(loaded.tokenizer)
        if options is None:
            raise NotImplementedError("the llama.cpp engine scores one-token answer options only")
        columns = [ids[0] for ids in options]
        tuned = [v is Variant.TUNED for v in variants]
        scores, features = [], []
        with self._model_lock:
            for prompt, variant, is_tuned in zip(prompts, variants, tuned):
                self._select(variant)
                # The decode loop's prompt phase, and nothing after it: the option scores are the first step's logits.
                ids = prompt_ids(prompt, loaded.tokenizer)
                logits, row_features = self._rows.read_prompt(0, ids, _probe_reader(loaded, self._reader, is_tuned))
                scores.append(torch.from_numpy(logits[columns]))
                features.append(row_features)
        stacked = _stack_features(features)
        return loaded.policy.decide(torch.stack(scores), tuned, stacked)

    def generate_with_decisions(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
    ) -> tuple[list[str], list[dict[str, float]]]:
        """Answers and decisions in one pass over each prompt: the decision is read off the first step's logits.
        Rows of one variant (the evaluation's batches) are decoded together (``llama_cpp_batch.py``)."""
        if settings.temperature > 0 or single_token_options(self.load().tokenizer) is None:
            return super().generate_with_decisions(prompts, variants, settings)
        if len(prompts) > 1 and len(set(variants)) == 1:
            return self._answer_together(prompts, variants[0], settings)
        decisions: list[dict[str, float]] = []
        texts: list[str] = []
        for texts in self._stream(prompts, variants, settings, None, decisions):
            pass
        return texts, decisions

    def _answer_together(
        self, prompts: Sequence[FittedPrompt], variant: Variant, settings: GenerationSettings
    ) -> tuple[list[str], list[dict[str, float]]]:
        """Greedy answers and decisions of rows of one variant, up to :data:`PARALLEL_ROWS` decoded together."""
        loaded = self.load()
        self._require_adapter([variant])
        tuned = variant is Variant.TUNED
        stops = self.stop_sequences()
        decisions: list[dict[str, float]] = [{} for _ in prompts]

        def start(row: int, sequence: int) -> tuple[int, np.ndarray]:
            length, logits, decision = self._start_row(loaded, self._rows, self._reader, prompts[row], tuned, sequence)
            decisions[row] = decision.decisions()[0]  # not None: the caller checked the options
            return length, logits

        loop = DecodeLoop(
            self._rows, start, range(len(prompts)), settings, loaded.tokenizer.decode, stops, sequences=PARALLEL_ROWS
        )
        with self._model_lock:
            self._select(variant)
            for _ in loop:
                pass
        return [cut_at_stop(loop.answers[row].text, stops)[0].strip() for row in range(len(prompts))], decisions

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
        with self._model_lock:
            self._select(variant)
            rows = self._rows.prompt(0, ids, outputs=keep).reshape(keep, -1)
        logprobs = torch.log_softmax(torch.from_numpy(rows), dim=-1)
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
        with self._model_lock:
            self._select(variant)
            logprobs, tops = self._rows.score(0, ids, top)
        return TokenScores(logprobs, tops)

    # --------------------------------------------------------------------------------------- generation
    def stream_batch(
        self,
        prompts: Sequence[FittedPrompt],
        variants: Sequence[Variant],
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[str]]:
        """The rows one after the other, each with its own variant (a base and a fine-tuned row side by side); every
        row's answer so far is yielded after each token. ``cancel`` (or closing the iterator) ends them all within one
        token."""
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
    ) -> Iterator[list[str]]:
        self._require_adapter(variants)
        variants = list(variants) * (len(prompts) if len(variants) == 1 else 1)
        stops = self.stop_sequences()
        cancel = cancel or threading.Event()
        updates: queue.Queue[list[str] | None] = queue.Queue()
        failure: list[BaseException] = []
        texts = [""] * len(prompts)
        # A base and a fine-tuned answer (Compare) are decoded side by side, each on its own context; other rows in turn.
        side_by_side = len(prompts) == 2 and set(variants) == {Variant.BASE, Variant.TUNED} and self._lora is not None
        groups = [[0, 1]] if side_by_side else [[row] for row in range(len(prompts))]

        def run() -> None:
            try:
                if not self._model_lock.acquire(cancel):
                    return
                try:
                    for group in groups:
                        if cancel.is_set():
                            break
                        jobs = [(row, prompts[row], variants[row]) for row in group]
                        for decision in self._answer(jobs, settings, cancel, stops, texts, updates):
                            if decisions is not None and decision is not None:
                                decisions.append(decision.decisions()[0])
                finally:
                    self._model_lock.release()
            except BaseException as exc:  # re-raised in the consumer's thread
                failure.append(exc)
            finally:
                updates.put(None)

        worker = threading.Thread(target=run, name="llama-cpp-generate", daemon=True)
        worker.start()
        yield from drain(updates, worker, cancel, failure, len(prompts), self.stop_sequences())

    def _answer(
        self,
        jobs: Sequence[tuple[int, FittedPrompt, Variant]],
        settings: GenerationSettings,
        cancel: threading.Event,
        stops: Sequence[str],
        texts: list[str],
        updates: queue.Queue,
    ) -> list[FirstStepDecision | None]:
        """The answers of ``jobs`` (row, prompt, variant; at most one per variant) into ``texts[row]``, each a decode
        loop of one row, stepped in turn, queueing every row's text after each token; the first step's decision
        processor of each.

        The base variant decodes on the main context with the LoRA off, the fine-tuned one on the main context with
        the LoRA on when it answers alone, or on the second context (LoRA always on) beside a base answer. Each
        answer's first token is queued before the next prompt is read, so a Compare shows both within about one
        prompt's decode of each other."""
        loaded = self.load()
        first_steps: list[FirstStepDecision | None] = []

        def starter(decoder: BatchDecoder, reader: Any, prompt: FittedPrompt, tuned: bool) -> RowStart:
            def start(_row: int, sequence: int) -> tuple[int, np.ndarray]:
                length, logits, decision = self._start_row(loaded, decoder, reader, prompt, tuned, sequence)
                first_steps.append(decision)
                return length, logits

            return start

        loops: list[Iterator[list[Answer]]] = []
        for row, prompt, variant in jobs:
            tuned = variant is Variant.TUNED
            if tuned and len(jobs) > 1:
                decoder, reader = self._second_context()
            else:
                self._select(variant)
                decoder, reader = self._rows, self._reader
            start = starter(decoder, reader, prompt, tuned)
            loop = iter(DecodeLoop(decoder, start, [row], settings, loaded.tokenizer.decode, stops, _sampler(settings)))
            # Its prompt and first token now, before the next prompt is read.
            if self._advance(loop, texts, updates, cancel):
                loops.append(loop)
        while loops and not cancel.is_set():
            loops = [loop for loop in loops if self._advance(loop, texts, updates, cancel)]
        return first_steps

    @staticmethod
    def _advance(
        loop: Iterator[list[Answer]], texts: list[str], updates: queue.Queue, cancel: threading.Event
    ) -> bool:
        """One step of ``loop`` unless cancelled, queueing every row's text if its answer grew; whether the loop may
        step again."""
        if cancel.is_set():
            return False
        grown = next(loop, None)
        if grown is None:
            return False
        for answer in grown:
            texts[answer.row] = answer.text
        if grown:
            updates.put(list(texts))
        return True

    def _second_context(self) -> tuple[BatchDecoder, Any]:
        """The context the fine-tuned side of a Compare pair decodes on, created at the first pair: one more sequence's
        cache and compute buffers on the same weights, its LoRA set once and left on (a LoRA belongs to a context in
        llama.cpp, and switching it makes llama.cpp re-plan its compute graph: too slow at every token)."""
        import llama_cpp

        from pubmedqa.engines.llama_cpp_features import reader_for
        from pubmedqa.engines.llama_cpp_native import second_context

        if self._pair is None:
            layer = self.load().policy.feature_layer
            reader = reader_for(self._llm, layer) if layer is not None else None
            context = second_context(self._llm, context_window(self._llm), reader.callback if reader else None)
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora)
            llama_cpp.llama_set_adapters_lora(context.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
            self._pair = (BatchDecoder(self._llm, N_BATCH, context), reader)
            logger.info("Second llama.cpp context ready for side-by-side Compare (LoRA on)")
        return self._pair

    def _start_row(
        self, loaded: LoadedModel, decoder: BatchDecoder, reader: Any, prompt: FittedPrompt, tuned: bool, sequence: int
    ) -> tuple[int, np.ndarray, FirstStepDecision | None]:
        """A decode loop's row start: the prompt phase (:meth:`BatchDecoder.read_prompt`, as decision scoring reads
        it, with ``reader``, the context's probe reader, for a fine-tuned row), then the first step's decision
        processor on the first step's logits. The prompt's length, those logits and the processor (None without
        one-token options)."""
        ids = prompt_ids(prompt, loaded.tokenizer)
        logits, features = decoder.read_prompt(sequence, ids, _probe_reader(loaded, reader, tuned))
        decision = self._first_step(loaded, tuned, features)
        if decision is not None:
            logits = decision(None, torch.from_numpy(logits[None]))[0].numpy()
        return len(ids), logits, decision

    @staticmethod
    def _first_step(loaded: LoadedModel, tuned: bool, features: torch.Tensor | None) -> FirstStepDecision | None:
        options = single_token_options(loaded.tokenizer)
        if options is None:
            return None
        return loaded.policy.first_step([o[0] for o in options], [tuned], (lambda: features) if features is not None else None)


def _sampler(settings: GenerationSettings) -> Any:
    """llama.cpp's sampler chain for a sampled answer (top-p, temperature, seeded); None for a greedy one, which the
    decode loop chooses itself (the highest logit, as llama.cpp's greedy sampler would)."""
    from pubmedqa.engines.llama_cpp_native import new_sampler

    return new_sampler(settings.temperature, settings.top_p, settings.seed) if settings.temperature > 0 else None


def _probe_reader(loaded: LoadedModel, reader: Any, tuned: bool) -> Any:
    """The probe reader a prompt's decode arms: ``reader`` (its context's) for a fine-tuned row where the policy
    reads the probe's features, else None (nothing to read, so nothing is collected)."""
    return reader if tuned and loaded.policy.feature_layer is not None else None


def _stack_features(features: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One row per prompt (zeros where a row needs none: the policy reads the fine-tuned rows only)."""
    present = [f for f in features if f is not None]
    if not present:
        return None
    width = present[0].shape[-1]
    return torch.cat([f.reshape(1, width) if f is not None else torch.zeros(1, width) for f in features])


def context_window(llm: Any) -> int:
    """Tokens one request may use: one sequence's share of a context that holds several."""
    import llama_cpp

    return int(llama_cpp.llama_n_ctx_seq(llm.ctx))


def file_type(llm: Any) -> str:
    """The GGUF's quantisation as gguf-py names its ``general.file_type``, e.g. 'Q4_K_M'."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(llm.metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        return "quantised"

