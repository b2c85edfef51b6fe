"""Several greedy answers decoded together on one llama.cpp context: the evaluation's path on the llama.cpp engine.

One answer at a time, each decoding step reads all the weights (262k-row output matrix included) for one token, so
a CPU decodes at its memory bandwidth (about 65 tokens/s for Gemma 3 270M on 2 cores). Here the rows of a batch keep
their own sequence in the KV cache (the context has one cell stream per sequence, ``n_seq_max``) and every step
decodes one token of each unfinished row in a single ``llama_decode``, so the weights are read once per step for all
of them. The prompts are still decoded one by one, each from an empty stream, which keeps the decision probe's
features per prompt (``llama_cpp_features.py``) and costs nothing: a long prompt is compute-bound already.

Greedy decoding, the first step's decision processor and the answer-only repetition penalty behave exactly as in
the one-row path (``LlamaCppBackend._generate_row``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

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

    def answers(
        self,
        prompt_ids: Sequence[Sequence[int]],
        first_logits: np.ndarray,
        max_new_tokens: int,
        repetition_penalty: float,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        min_new_tokens: int = 0,
    ) -> list[str]:
        """Greedy answers of the rows whose prompts are in sequences 0..n-1, starting from each row's first-step
        logits (rows x vocab, the decision processor already applied); the raw decoded text of each."""
        import llama_cpp

        rows = len(prompt_ids)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        positions = [len(ids) for ids in prompt_ids]
        current: dict[int, np.ndarray] = {row: first_logits[row] for row in range(rows)}
        for _ in range(max_new_tokens):
            following: list[tuple[int, int]] = []
            for row, logits in current.items():
                if tokens[row] and repetition_penalty != 1.0:
                    penalise_repeats(logits, tokens[row], repetition_penalty)
                if len(tokens[row]) < min_new_tokens:
                    logits[self.end_tokens] = -np.inf
                token = int(np.argmax(logits))
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    continue
                tokens[row].append(token)
                texts[row] = decode(tokens[row])
                if not cut_at_stop(texts[row], stops)[1] and len(tokens[row]) < max_new_tokens:
                    following.append((row, token))
            if not following:
                break
            self._decode([(token, positions[row], row, True) for row, token in following])
            current = {}
            for index, (row, _) in enumerate(following):
                positions[row] += 1
                current[row] = self.logits(index)
        return texts


def first_step_logits(
    decoder: BatchDecoder,
    prompt_ids: Sequence[Sequence[int]],
    reader: Any,
    read_features: bool,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Each prompt decoded into its own sequence: the last positions' logits (rows x vocab) and, with
    ``read_features``, the probe's features (rows x 2 n_embd) read during those decodes."""
    logits, features = [], []
    for sequence, ids in enumerate(prompt_ids):
        with reader.armed() if read_features else contextlib.nullcontext():
            logits.append(decoder.prompt(sequence, ids))
        if read_features:
            features.append(reader.features(expected_tokens=len(ids)))
    return np.stack(logits), torch.cat(features) if features else None
