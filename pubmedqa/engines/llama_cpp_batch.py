"""One llama.cpp context's decoding, as the scheduler (``llama_cpp_scheduler.py``) drives it: a
:class:`BatchDecoder` decodes (token, position, sequence) entries of several sequences in one ``llama_decode`` and
reads their logits, and :func:`constrain_step` is the rule every answer's next step obeys (the answer-only repetition
penalty, a minimum answer length). Why rows are batched and how far it pays: docs/hardware.md ("The llama.cpp engine's
decode loop").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Positions whose logits one ``llama_decode`` of :meth:`BatchDecoder.score` outputs (64 rows: 64 MB at 262k).
SCORE_CHUNK = 64


def penalise_repeats(logits: np.ndarray, tokens: Sequence[int], penalty: float) -> None:
    """CTRL's repetition penalty on the answer's own ``tokens``, in place, as transformers'
    ``RepetitionPenaltyLogitsProcessor`` applies it (llama.cpp's penalties sampler would also count the prompt)."""
    seen = np.unique(np.asarray(tokens))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)


def constrain_step(
    logits: np.ndarray, tokens: Sequence[int], repetition_penalty: float, min_new_tokens: int, end_tokens: np.ndarray
) -> None:
    """The rules every answer's next step obeys, in place on its logits before a token is chosen: the answer-only
    repetition penalty, and no end of generation before ``min_new_tokens``."""
    if tokens and repetition_penalty != 1.0:
        penalise_repeats(logits, tokens, repetition_penalty)
    if len(tokens) < min_new_tokens:
        logits[end_tokens] = -np.inf


def end_of_generation_tokens(llm: Any) -> np.ndarray:
    """Every token llama.cpp ends a generation on (end of sequence, end of turn, ...), for a minimum answer length."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.int64)


class BatchDecoder:
    """One llama.cpp context's decoding: prompts into their own (emptied) sequences, and one token of each of
    several sequences per ``llama_decode``.

    ``llm`` is a ``llama_cpp.Llama`` whose context was created with ``n_seq_max`` sequences (``open_llama``);
    ``context``, another context on the same model, is decoded instead of ``llm``'s own (``llama_cpp_native``)."""

    def __init__(self, llm: Any, n_batch: int, context: Any = None):
        import llama_cpp

        from pubmedqa.engines.llama_cpp_native import new_batch

        self._llm = llm
        self._context = context
        self._n_batch = n_batch
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._owner = new_batch(n_batch)  # frees the batch with itself
        self.end_tokens = end_of_generation_tokens(llm)
        self._threads = int(llama_cpp.llama_n_threads(self.context.ctx))

    @property
    def context(self) -> Any:
        """The ``llama_cpp._internals.LlamaContext`` decoded into."""
        from pubmedqa.engines.llama_cpp_native import main_context

        return self._context or main_context(self._llm)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries; :meth:`logits` then reads a wanted
        entry's logits by its position in ``entries`` (-1: the last one), as llama.cpp indexes them."""
        import llama_cpp

        batch = self._owner.batch
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        code = llama_cpp.llama_decode(self.context.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code}) for {len(entries)} tokens")

    def logits(self, index: int) -> np.ndarray:
        """The logits of the last decode's entry at batch position ``index`` (-1: the last output): a writable view of
        llama.cpp's own buffer, which its sampler reads."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.context.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),))

    def prompt(self, sequence: int, ids: Sequence[int], outputs: int = 1) -> np.ndarray:
        """Decode ``ids`` into ``sequence`` (empty) in micro-batch-sized pieces; copies of the logits of its last
        ``outputs`` positions (``outputs`` x vocab; one row, 1-D, by default)."""
        first_output = len(ids) - outputs
        rows: list[np.ndarray] = []
        for start in range(0, len(ids), self._n_batch):
            piece = ids[start : start + self._n_batch]
            wanted = [start + i >= first_output for i in range(len(piece))]
            self.decode([(t, start + i, sequence, wanted[i]) for i, t in enumerate(piece)])
            # Read before the next piece's decode overwrites them; llama.cpp indexes them by batch position.
            rows += [self.logits(i).copy() for i in range(len(piece)) if wanted[i]]
        return rows[0] if outputs == 1 else np.stack(rows)

    def score(self, sequence: int, ids: Sequence[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """``ids`` decoded into ``sequence`` (empty: the scheduler's job sequence) with every position's logits,
        :data:`SCORE_CHUNK` positions per ``llama_decode`` so that llama.cpp's output buffer stays small (a 262k
        vocabulary is 1 MB a row); each chunk's rows scored at once (:func:`score_rows`) before the next overwrites them."""
        import llama_cpp
        import torch

        from pubmedqa.engines.base import score_rows

        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        for start in range(0, len(ids), SCORE_CHUNK):
            piece = ids[start : start + SCORE_CHUNK]
            self.decode([(t, start + i, sequence, True) for i, t in enumerate(piece)])
            pointer = llama_cpp.llama_get_logits(self.context.ctx)
            rows = torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(len(piece), self._llm.n_vocab())))
            chunk_logprobs, chunk_tops = score_rows(rows, ids[start + 1 : start + 1 + len(piece)], top)
            logprobs += chunk_logprobs
            tops += chunk_tops
        return logprobs, tops

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of sequence, end of turn, ...)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def copy(self, source: int, target: int) -> None:
        """Give ``target`` (empty) ``source``'s cells: a copy of its whole cell stream, made at the next decode."""
        import llama_cpp

        llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(self.context.ctx), source, target, -1, -1)

    def move(self, source: int, target: int) -> None:
        """Move ``source``'s cells to ``target`` (empty)."""
        self.copy(source, target)
        self.clear(source)

    @property
    def threads(self) -> int:
        """The threads a decode runs on (as the context was made, until :meth:`set_threads`)."""
        return self._threads

    def set_threads(self, threads: int) -> None:
        """Decode on ``threads`` threads from now on."""
        import llama_cpp

        if threads != self._threads:
            llama_cpp.llama_set_n_threads(self.context.ctx, threads, threads)
            self._threads = threads

    def clear(self, sequence: int) -> None:
        """Empty ``sequence``'s cells, for the next prompt."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.context.ctx), sequence, -1, -1)
