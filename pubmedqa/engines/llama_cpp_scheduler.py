"""Continuous batching across requests on the llama.cpp engine: one scheduler thread owns the engine's contexts (the
base's, LoRA off, and the fine-tuned one's, LoRA on) and every answer from every entry point is a row on one of them
(:class:`~pubmedqa.engines.llama_cpp_context_rows.Row`, with the context's sequences in ``llama_cpp_context_rows.py``).

Each step of a context: waiting rows take free sequences (visitors first; a visitor waiting for a sequence takes one
from a background row, which starts again later), with a copy of the prompts' shared start where theirs begins with
it (read once per context); every decoding row chooses its next token from its own logits with its own settings
(:func:`~pubmedqa.engines.llama_cpp_batch.constrain_step`, then the highest logit or its own seeded llama.cpp
sampler); rows that ended, were stopped or whose client went away free their sequence; queued jobs (token scoring)
run on the context's spare sequence; at most :data:`PREFILL_CHUNK` prompt tokens are read (chunked prefill, so a long
abstract does not freeze the others' streams); then the last token of every decoding row is decoded in one
``llama_decode``. The contexts are stepped in turn on all cores, or, when there are as many cores as contexts with
work (a 2-core Space and both variants asked for), at once on a core each. Why and how far it pays: docs/hardware.md
("Many visitors at once").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pubmedqa.engines.llama_cpp_batch import BatchDecoder, constrain_step
from pubmedqa.engines.llama_cpp_context_rows import PREFILL_CHUNK, ContextRows, Job, Row, decode_piece
from pubmedqa.prompts import cut_at_stop

logger = logging.getLogger(__name__)


def _one_openmp_thread() -> None:
    """Keep this thread's OpenMP work (torch's: llama.cpp's one-thread steps use none) on this thread. torch and
    llama.cpp share the process's one libgomp, and a team started here, beside the scheduler's own, puts more OpenMP
    threads than cores in the process: libgomp then lets every barrier sleep, and every later decode takes ~1.6x as
    long (measured: docs/hardware.md)."""
    import ctypes

    from torch import get_num_threads

    get_num_threads()  # torch sets this thread's OpenMP thread count the first time it asks: before ours
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)
    except (OSError, AttributeError):  # no libgomp (another OpenMP runtime, or none): nothing to keep apart
        logger.debug("No libgomp to set the helper thread's OpenMP threads on")


class Scheduler:
    """The thread that decodes on the engine's contexts (see the module's docstring), with a helper for steps taken
    at once. :meth:`submit` a row, :meth:`run_job` for a job; everything else happens on the threads.

    ``prefix``, the start most prompts share, is read into each context first (:meth:`ContextRows.cache_prefix`).
    The contexts' own thread count (what they were made with) is the cores they step on."""

    def __init__(
        self,
        contexts: dict[Any, ContextRows],
        detokenize: Callable[[list[int]], str],
        n_vocab: int,
        prefix: Sequence[int] = (),
    ):
        self._contexts = contexts
        self._detokenize = detokenize
        self._n_vocab = n_vocab
        self._cores = max(c.decoder.threads for c in contexts.values())
        self._prefix = list(prefix)
        self._changed = threading.Condition()
        self._helper = ThreadPoolExecutor(
            max(1, len(contexts) - 1), thread_name_prefix="llama-cpp-step", initializer=_one_openmp_thread
        )
        self.ready = threading.Event()  # set once the prefix is cached and rows are served
        self._thread = threading.Thread(target=self._run, name="llama-cpp-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- submitting
    def submit(self, key: Any, row: Row) -> None:
        """Queue ``row`` on context ``key``; it joins the running rows at the next step with a free sequence."""
        context = self._contexts[key]
        with self._changed:
            (context.background if row.background else context.waiting).append(row)
            self._changed.notify_all()

    def run_job(self, key: Any, run: Callable[[BatchDecoder, int], Any]) -> Any:
        """``run(decoder, sequence)`` on context ``key`` between two steps; its result, or its exception raised here."""
        job = Job(run)
        with self._changed:
            self._contexts[key].jobs.append(job)
            self._changed.notify_all()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def active_rows(self, key: Any) -> int:
        """Rows holding a sequence on context ``key`` now."""
        return len(self._contexts[key].active)

    def steps(self, key: Any = None) -> int:
        """Steps taken by context ``key`` (all contexts: None) so far, for tests and benchmarks."""
        return sum(c.steps for k, c in self._contexts.items() if key is None or k == key)

    # ------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        for context in self._contexts.values():
            try:
                context.cache_prefix(self._prefix)
            except Exception:  # noqa: BLE001 - the rows then read their prompts whole
                logger.exception("Could not cache the prompts' shared start on the %s context", context.name)
        self.ready.set()
        while True:
            with self._changed:
                while not any(c.has_work() for c in self._contexts.values()):
                    self._changed.wait()
            busy = [c for c in self._contexts.values() if c.has_work()]
            if len(busy) > 1 and self._cores == len(busy):
                # A core each, each context stepping at its own pace while all have work: on 2 cores two one-thread
                # steps at once take less than two two-thread steps in turn. Only this thread ever decodes on several
                # threads: a second thread that did would put more OpenMP threads than cores in the process, and
                # libgomp then lets its barriers sleep (every later decode ~1.6x slower).
                for context in busy:
                    context.decoder.set_threads(1)
                over = threading.Event()
                helpers = [self._helper.submit(self._step_while_all_busy, c, busy, over) for c in busy[1:]]
                self._step_while_all_busy(busy[0], busy, over)
                for helper in helpers:
                    helper.result()
            else:
                for context in busy:
                    context.decoder.set_threads(self._cores)
                    self._step_safely(context)

    def _step_while_all_busy(self, context: ContextRows, busy: list[ContextRows], over: threading.Event) -> None:
        """Step ``context`` until one of ``busy`` has no work left or another of these loops ended (``over``): a
        context that gets work again meanwhile must not wait for the others' loops."""
        try:
            self._step_safely(context)
            while not over.is_set() and all(c.has_work() for c in busy):
                self._step_safely(context)
        finally:
            over.set()

    def _step_safely(self, context: ContextRows) -> None:
        try:
            self._step(context)
        except Exception:  # noqa: BLE001 - a bug here must not stop every later request
            logger.exception("The %s context's step failed; its rows end with the error", context.name)
            self._fail_all(context)
        context.steps += 1

    def _step(self, context: ContextRows) -> None:
        self._admit(context)
        for row in list(context.active):
            if row.cancel.is_set():
                self._finish(context, row)
            elif row.logits is not None and not row.undecoded:
                self._choose(context, row)
        self._run_jobs(context)
        self._read_prompts(context)
        self._decode(context)

    def _admit(self, context: ContextRows) -> None:
        with self._changed:
            for waiting in (context.waiting, context.background):
                for row in [r for r in waiting if r.cancel.is_set()]:
                    waiting.remove(row)
                    self._end(row)
            # A visitor never waits for background work: the newest background row gives its sequence up.
            while context.waiting and not context.free:
                victims = [r for r in context.active if r.background]
                if not victims:
                    break
                victim = victims[-1]
                self._release(context, victim)
                victim._reset()
                context.background.appendleft(victim)
            while context.free and (context.waiting or context.background):
                row = (context.waiting or context.background).popleft()
                row.sequence = context.free.pop(0)
                context.decoder.clear(row.sequence)
                context.start_from_prefix(row)
                context.active.append(row)

    def _choose(self, context: ContextRows, row: Row) -> None:
        """Row's next token from its own logits; ends the row at an end of generation, a stop sequence or its limit."""
        settings, decoder = row.settings, context.decoder
        constrain_step(row.logits, row.tokens, settings.repetition_penalty, settings.min_new_tokens, decoder.end_tokens)
        if row.sampler is None:
            # llama.cpp's greedy sampler's choice too (the first highest logit), without the 262k-entry candidate
            # list it builds per call.
            token = int(np.argmax(row.logits))
        else:
            from pubmedqa.engines.llama_cpp_native import candidate_array, sample_logits

            if context.candidates is None:
                context.candidates = candidate_array(self._n_vocab)
            token = sample_logits(row.sampler, context.candidates, row.logits)
        if decoder.is_end(token):
            self._finish(context, row)
            return
        row.tokens.append(token)
        row.text = self._detokenize(row.tokens)
        row.undecoded = True
        row.notify(row)
        if cut_at_stop(row.text, row.stops)[1] or len(row.tokens) >= settings.max_new_tokens:
            self._finish(context, row)
        elif row.position >= context.window:
            self._finish(context, row, RuntimeError(
                f"the answer reached the model's context window ({context.window} tokens)"))

    def _run_jobs(self, context: ContextRows) -> None:
        while context.jobs:
            with self._changed:
                job = context.jobs.popleft()
            try:
                context.decoder.clear(context.job_sequence)
                job.result = job.run(context.decoder, context.job_sequence)
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                job.error = exc
            finally:
                context.decoder.clear(context.job_sequence)
                job.finished.set()

    def _read_prompts(self, context: ContextRows) -> None:
        """Read waiting prompts one after the other in :data:`PREFILL_CHUNK`-token pieces (one prompt at a time: the
        probe reader follows one prompt). While other rows decode, about one piece per step; with none decoding, the
        first prompt whole, so that a visitor alone waits for nothing."""
        budget = PREFILL_CHUNK if any(row.logits is not None for row in context.active) else None
        for row in [r for r in context.active if r.logits is None]:
            if len(row.ids) >= context.window:
                self._finish(context, row, ValueError(
                    f"the prompt ({len(row.ids)} tokens) does not fit the model's window ({context.window} tokens)"))
                continue
            try:
                while row.read < len(row.ids) and (budget is None or budget > 0):
                    read = self._read_piece(context, row)
                    budget = None if budget is None else budget - read
                if row.read < len(row.ids):
                    return
                self._first_step(context, row)
            except Exception as exc:  # noqa: BLE001 - this row fails, the others go on
                self._finish(context, row, exc)
            budget = PREFILL_CHUNK if budget is None else budget  # a row decodes now
            if budget <= 0:
                return

    def _read_piece(self, context: ContextRows, row: Row) -> int:
        """Decode the row's next piece of prompt; how many tokens it held."""
        decoder, reader = context.decoder, context.reader if row.reads_features else None
        start = row.read
        if reader is None:
            row.read = decode_piece(decoder, row.ids, start, row.sequence)
        else:
            # A row that got the cached prompt start's cells starts from the reader's sums over it.
            copied = start == row.copied > 0
            with reader.armed(resume=start > 0, start=context.prefix_state if copied else None):
                row.read = decode_piece(decoder, row.ids, start, row.sequence)
        if row.read == len(row.ids):
            row.logits = decoder.logits(-1).copy()  # the next decode overwrites llama.cpp's buffer
        return row.read - start

    def _first_step(self, context: ContextRows, row: Row) -> None:
        features = None
        if row.reads_features and context.reader is not None:
            features = context.reader.features(expected_tokens=len(row.ids))
        if row.first_step is not None:
            row.logits = row.first_step(row.logits, features)
        if not row.generate:
            self._finish(context, row)
        else:  # its first token at once, decoded in this step: not after the other context's step
            self._choose(context, row)

    def _compact(self, context: ContextRows) -> None:
        """Keep the rows on sequences 0..n-1: llama.cpp decodes consecutive sequences in one graph, and each gap
        costs a graph (a weight pass) more per step. The row on the highest sequence moves into the lowest gap."""
        while context.active and context.free and context.free[0] < max(r.sequence for r in context.active):
            row = max(context.active, key=lambda r: r.sequence)
            target = context.free.pop(0)
            context.decoder.move(row.sequence, target)
            context.free_sequence(row.sequence)
            row.sequence = target

    def _decode(self, context: ContextRows) -> None:
        self._compact(context)
        # In sequence order: llama.cpp puts sequences of separate streams in one graph only while each entry's
        # sequence follows the last one's.
        going = sorted((row for row in context.active if row.undecoded), key=lambda row: row.sequence)
        if not going:
            return
        entries = [(row.tokens[-1], row.position, row.sequence, True) for row in going]
        try:
            context.decoder.decode(entries)
        except RuntimeError:
            # Find the row(s) llama.cpp refuses, decoding each alone (its logits copied before the next decode).
            for row, entry in zip(going, entries):
                try:
                    context.decoder.decode([entry])
                    row.logits, row.undecoded = context.decoder.logits(0).copy(), False
                except RuntimeError as exc:
                    self._finish(context, row, exc)
            return
        for index, row in enumerate(going):
            row.logits, row.undecoded = context.decoder.logits(index), False

    # ------------------------------------------------------------------------------------------- ending
    def _release(self, context: ContextRows, row: Row) -> None:
        context.active.remove(row)
        if row.sequence is not None:
            context.decoder.clear(row.sequence)
            context.free_sequence(row.sequence)

    def _finish(self, context: ContextRows, row: Row, error: BaseException | None = None) -> None:
        if row.done:
            return
        self._release(context, row)
        if error is not None:
            logger.warning("An answer on the %s context failed: %s", context.name, error)
        self._end(row, error)

    @staticmethod
    def _end(row: Row, error: BaseException | None = None) -> None:
        row.done, row.error = True, error
        row.notify(row)

    def _fail_all(self, context: ContextRows) -> None:
        error = RuntimeError("the model failed while decoding (logged); please try again")
        for row in list(context.active):
            self._finish(context, row, error)
