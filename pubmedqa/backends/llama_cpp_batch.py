"""Several greedy answers decoded together on one llama.cpp context: the evaluation's path on the llama.cpp engine.

One answer at a time, each decoding step reads all the weights (262k-row output matrix included) for one token, so
a CPU decodes at its memory bandwidth (about 65 tokens/s for Gemma 3 270M on 2 cores). Here the rows of a batch keep
their own sequence in the KV cache (the context has one cell stream per sequence, ``n_seq_max``) and every step
decodes one token of each unfinished row in a single ``llama_decode``, so the weights are read once per step for all
of them; a sequence whose answer ends takes the next row's prompt at once, so the steps stay full. The prompts are
still decoded one by one, each from an emptied stream, which keeps the decision probe's features per prompt
(``llama_cpp_features.py``) and costs nothing: a long prompt is compute-bound already.

Greedy decoding, the first step's decision processor and the answer-only repetition penalty behave exactly as in
the one-row path (``LlamaCppBackend._generate_row``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pubmedqa.prompts import cut_at_stop

#: Rows decoded together: beyond this, a step is compute-bound and grows with the rows (measured on 2 cores).
PARALLEL_ROWS = 8


def penalise_repeats(logits: np.ndarray, tokens: Sequence[int], penalty: float) -> None:
    """CTRL's repetition penalty on the answer's own ``tokens``, in place, as transformers'
    ``RepetitionPenaltyLogitsProcessor`` applies it (llama.cpp's penalties sampler would also count the prompt)."""
    seen = np.unique(np.asarray(tokens))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)


def end_of_generation_tokens(llm: Any) -> np.ndarray:
    """Every token llama.cpp ends a generation on (end of sequence, end of turn, ...), for a minimum answer length."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.int64)


class BatchDecoder:
    """Decodes prompts into their own sequences and then their answers step by step, all rows in one call per step.

    ``llm`` is a ``llama_cpp.Llama`` whose context was created with ``n_seq_max >= rows`` (``open_llama``)."""

    def __init__(self, llm: Any, n_batch: int):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch

        self._llm = llm
        self._n_batch = n_batch
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._owner = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)  # frees the batch with itself
        self.end_tokens = end_of_generation_tokens(llm)

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        import llama_cpp

        batch = self._owner.batch
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        code = llama_cpp.llama_decode(self._llm.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code}) for {len(entries)} tokens")

    def logits(self, index: int) -> np.ndarray:
        """The logits of the ``index``-th output of the last decode (-1: the last): a writable view of llama.cpp's
        own buffer, which its sampler reads."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self._llm.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),))

    def prompt(self, sequence: int, ids: Sequence[int]) -> np.ndarray:
        """Decode ``ids`` into ``sequence`` (empty) in micro-batch-sized pieces; a copy of the last position's logits."""
        for start in range(0, len(ids), self._n_batch):
            piece = ids[start : start + self._n_batch]
            last = start + len(piece) == len(ids)
            self._decode([(t, start + i, sequence, last and i == len(piece) - 1) for i, t in enumerate(piece)])
        return self.logits(-1).copy()

    def clear(self, sequence: int) -> None:
        """Empty ``sequence``'s cells, for the next prompt."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._llm.ctx), sequence, -1, -1)

    def answers(
        self,
        rows: int,
        start: Callable[[int, int], tuple[int, np.ndarray]],
        max_new_tokens: int,
        repetition_penalty: float,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        min_new_tokens: int = 0,
        sequences: int = PARALLEL_ROWS,
    ) -> list[str]:
        """Greedy answers of ``rows`` rows, up to ``sequences`` at once; the raw decoded text of each.

        ``start(row, sequence)`` decodes the row's prompt into the (empty) ``sequence`` and returns the prompt's length
        and the first step's logits (the decision processor already applied). A sequence whose answer has ended takes
        the next row at once (continuous batching): otherwise every step of a group waits for its longest answer with
        fewer and fewer rows, while a step costs little more for 8 rows than for 1."""
        import llama_cpp

        tokens: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        row_of: dict[int, int] = {}
        positions: dict[int, int] = {}
        current: dict[int, np.ndarray] = {}
        waiting = iter(range(rows))

        def take_next(sequence: int) -> None:
            row = next(waiting, None)
            if row is not None:
                self.clear(sequence)
                row_of[sequence] = row
                positions[sequence], current[sequence] = start(row, sequence)

        for sequence in range(min(sequences, rows)):
            take_next(sequence)
        while current:
            following: list[tuple[int, int]] = []
            ended: list[int] = []
            for sequence, logits in current.items():
                row = row_of[sequence]
                if tokens[row] and repetition_penalty != 1.0:
                    penalise_repeats(logits, tokens[row], repetition_penalty)
                if len(tokens[row]) < min_new_tokens:
                    logits[self.end_tokens] = -np.inf
                token = int(np.argmax(logits))
                if not llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    tokens[row].append(token)
                    texts[row] = decode(tokens[row])
                    if not cut_at_stop(texts[row], stops)[1] and len(tokens[row]) < max_new_tokens:
                        following.append((sequence, token))
                        continue
                ended.append(sequence)
            current = {}
            for sequence in ended:  # after every row has read its logits: a prompt's decode overwrites them
                take_next(sequence)
            if following:
                self._decode([(token, positions[sequence], sequence, True) for sequence, token in following])
                for index, (sequence, _) in enumerate(following):
                    positions[sequence] += 1
                    current[sequence] = self.logits(index)
        return texts
